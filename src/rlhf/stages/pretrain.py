"""Stage 1, `rlhf pretrain`: train a base causal LM on plain-text files.

The story of one run:
1. read the corpus, cut it into documents, hold out a deterministic validation split (`rlhf.data.corpus`);
2. train a byte-level BPE on the training split (or load the given tokenizer / the checkpoint's own);
3. tokenize once: every document becomes [BOS] text [EOS], all concatenated into one token stream per split;
4. build the preset model (or load `model.path`) and AdamW (no decay on biases and LayerNorm gains);
5. loop: batches of `block_size + 1`-token windows in a shuffled order per epoch, gradient accumulation, clipping,
   linear warm-up then cosine decay to `min_lr`; log train loss, tokens/s; evaluate val loss/perplexity against the
   unigram baseline; checkpoint every N steps (model + tokenizer + optimizer, scheduler, data position, RNG);
6. save the final model to `runs/<name>/pretrain/model/` and print a sample continuation of `sample_prompt`.

`resume=true` restarts from the newest checkpoint: on CPU in fp32 the continued run is bit-identical to an
uninterrupted one (same weights, optimizer moments, schedule position and data order).

Scaling switches (docs/scaling.md): `num_processes=N` (or `accelerate launch -m rlhf pretrain`) is data parallel:
`batch_size` is per process, every rank draws the same global batch of batch_size x N windows and trains on its
slice, so N x b makes the optimizer steps of 1 x N*b. `lora.enabled=true` trains adapters only (rarely useful for
pre-training: mostly for continued pre-training of a big model on new text); `gradient_checkpointing`, `bf16`.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from rlhf import distributed as dist
from rlhf.checkpoint import latest_checkpoint, load_state, save_checkpoint
from rlhf.config import ModelConfig, option
from rlhf.data.corpus import read_corpus, split_corpus
from rlhf.distributed import TrainingStageConfig
from rlhf.errors import UserError
from rlhf.lora import merge_and_save
from rlhf.modeling import (
    autocast,
    build_model,
    context_length,
    count_parameters,
    load_causal_lm,
    load_tokenizer,
    resize_for_tokenizer,
    train_tokenizer,
)
from rlhf.stagecli import parse_stage_args
from rlhf.tracking import log, progress, stage_dir, truncate_metrics

STAGE = "pretrain"
DEFAULT_CORPUS = "data/corpus/children_stories_5books.txt"
ADAM_BETAS = (0.9, 0.95)  # beta2 = 0.95 as in GPT-3 / nanoGPT: steadier with small batches than 0.999


@dataclass
class PretrainConfig(TrainingStageConfig):
    POSITIONAL = ("data",)

    model: ModelConfig = option(ModelConfig(), "model to train (built from a preset, or a local checkpoint)")
    data: list[str] = option([DEFAULT_CORPUS], "plain-text UTF-8 corpus files (comma-separated on the CLI)")
    val_fraction: float = option(
        0.05, "share of the corpus held out for validation, in contiguous pieces", low=0.01, high=0.5
    )
    block_size: int = option(128, "tokens per training window (at most the model's context)", low=8)
    batch_size: int = option(16, "windows per micro-batch and process", low=1)
    grad_accum: int = option(1, "micro-batches per optimizer step", low=1)
    max_steps: int = option(1000, "optimizer steps", low=1)
    lr: float = option(1e-3, "peak learning rate", low=0.0)
    min_lr: float = option(1e-4, "learning rate at the end of the cosine decay", low=0.0)
    warmup_steps: int = option(50, "steps of linear warm-up from 0 to lr", low=0)
    weight_decay: float = option(0.1, "AdamW weight decay (not applied to biases and LayerNorm)", low=0.0)
    grad_clip: float = option(1.0, "clip the global gradient norm to this; 0 = off", low=0.0)
    log_every: int = option(10, "steps between train-loss log lines", low=1)
    eval_every: int = option(100, "steps between validation passes (and one at the end)", low=1)
    eval_batches: int = option(8, "validation micro-batches per pass (fewer if the split is smaller)", low=1)
    checkpoint_every: int = option(200, "steps between checkpoints; 0 = only at the end", low=0)
    sample_prompt: str = option("Once upon a time", "prompt continued by the final model; empty = none")
    sample_tokens: int = option(60, "tokens generated for the final sample", low=1)
    sample_temperature: float = option(0.8, "temperature of the final sample; 0 = greedy", low=0.0)

    def validate(self) -> None:
        super().validate()
        if self.min_lr > self.lr:
            raise UserError(f"config field 'min_lr': {self.min_lr} is above lr={self.lr}")
        context = self.model.context or 0
        if context and self.block_size > context:
            raise UserError(f"config field 'block_size': {self.block_size} exceeds model.context={context}")


# ---------------------------------------------------------------------------------------------------------------
# Data: one token stream per split, windows of block_size + 1 tokens in a per-epoch shuffled order.


def encode_documents(tokenizer: Any, docs: list[str]) -> np.ndarray:
    """[BOS] doc [EOS] for every document, concatenated (int32)."""
    if not docs:
        return np.zeros(0, dtype=np.int32)
    ids = tokenizer(docs, add_special_tokens=False)["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    stream = [tok for doc in ids for tok in (bos, *doc, eos)]
    return np.asarray(stream, dtype=np.int32)


class WindowSampler:
    """Non-overlapping windows of `block + 1` tokens, shuffled once per epoch; its state is just (epoch, pos).

    Each epoch starts at a random offset below `block`, so windows straddle different boundaries every epoch.
    The order depends only on (seed, epoch): resuming needs no generator state.
    """

    def __init__(self, tokens: np.ndarray, block: int, seed: int):
        self.tokens = torch.from_numpy(tokens.astype(np.int64))
        self.block, self.seed = block, seed
        self.epoch, self.pos = 0, 0
        self._order: torch.Tensor | None = None

    def _epoch_order(self) -> tuple[int, torch.Tensor]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        spare = len(self.tokens) - 1 - self.block  # room for the offset after the first window
        offset = int(torch.randint(0, min(self.block, spare) + 1, (1,), generator=gen)) if spare > 0 else 0
        count = (len(self.tokens) - 1 - offset) // self.block
        starts = offset + torch.arange(count) * self.block
        return offset, starts[torch.randperm(count, generator=gen)]

    def next_batch(self, batch_size: int) -> torch.Tensor:
        rows = []
        while len(rows) < batch_size:
            if self._order is None:
                self._order = self._epoch_order()[1]
            if self.pos >= len(self._order):
                self.epoch, self.pos, self._order = self.epoch + 1, 0, None
                continue
            start = int(self._order[self.pos])
            rows.append(self.tokens[start : start + self.block + 1])
            self.pos += 1
        return torch.stack(rows)  # (B, block + 1)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.pos, self._order = state["epoch"], state["pos"], None


def val_windows(tokens: np.ndarray, block: int, limit: int) -> torch.Tensor:
    """The first `limit` consecutive windows of the validation stream (the same every pass)."""
    count = min(limit, (len(tokens) - 1) // block)
    t = torch.from_numpy(tokens.astype(np.int64))
    return torch.stack([t[i * block : i * block + block + 1] for i in range(count)])  # (N, block + 1)


def unigram_loss(train_tokens: np.ndarray, targets: torch.Tensor, vocab: int) -> float:
    """Cross-entropy (nats/token) of `targets` under the training split's add-one-smoothed token frequencies.

    A model that ignores context cannot beat this; a language model must go well below it.
    """
    counts = np.bincount(train_tokens, minlength=vocab).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(-logp[targets.reshape(-1).numpy()].mean())


# ---------------------------------------------------------------------------------------------------------------
# Optimisation.


def make_optimizer(model: torch.nn.Module, config: PretrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices (weights, embeddings) only; biases and LayerNorm gains are 1-D."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=config.lr, betas=ADAM_BETAS)


def lr_factor(step: int, config: PretrainConfig) -> float:
    """Multiplier of `lr` for the optimizer step with 0-based index `step`: linear warm-up, cosine to min_lr."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    span = max(1, config.max_steps - config.warmup_steps)
    progress_ = min(1.0, (step - config.warmup_steps) / span)
    floor = config.min_lr / config.lr if config.lr > 0 else 0.0
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress_))


def lm_loss(model: Any, windows: torch.Tensor, bf16: bool, device: str) -> torch.Tensor:
    """Mean next-token cross-entropy of (B, T+1) windows; the loss is computed in fp32 even under autocast."""
    windows = windows.to(device)
    inputs, targets = windows[:, :-1], windows[:, 1:]  # (B, T), (B, T)
    with autocast(bf16, device):
        logits = model(input_ids=inputs).logits  # (B, T, V)
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))


@torch.no_grad()
def evaluate(model: Any, windows: torch.Tensor, batch_size: int, bf16: bool, device: str) -> float:
    was_training = model.training
    model.eval()
    losses = [
        lm_loss(model, windows[i : i + batch_size], bf16, device).item() * len(windows[i : i + batch_size])
        for i in range(0, len(windows), batch_size)
    ]
    model.train(was_training)
    return sum(losses) / len(windows)


# ---------------------------------------------------------------------------------------------------------------
# The run.


def _tokenizer(config: PretrainConfig, train_docs: list[str], ckpt: Path | None) -> Any:
    """The checkpoint's tokenizer when resuming, else the given one (or `model.path`'s), else a BPE trained here."""
    m = config.model
    if ckpt is not None or m.tokenizer or m.path:
        return load_tokenizer(ckpt or m.tokenizer or m.path)
    started = time.perf_counter()
    tokenizer = train_tokenizer(train_docs, vocab_size=m.vocab_size)
    log.info("trained a byte-level BPE (vocab %d) in %.1fs", len(tokenizer), time.perf_counter() - started)
    return tokenizer


def _model(config: PretrainConfig, tokenizer: Any, ckpt: Path | None) -> Any:
    """The checkpoint's model when resuming, else `model.path`, else a fresh `model.preset`. With LoRA the base is
    always `model.path` (or the preset, built from the same seed) and a checkpoint holds only the adapters."""
    from rlhf.lora import apply_lora, load_adapter_checkpoint

    m = config.model
    full_ckpt = ckpt if not config.lora.enabled else None
    if full_ckpt is not None or m.path:
        model = load_causal_lm(full_ckpt or m.path)
    else:
        model = build_model(m.preset, tokenizer, context=m.context, dropout=m.dropout)
    resize_for_tokenizer(model, tokenizer)
    model = apply_lora(model, config.lora)
    if ckpt is not None and config.lora.enabled:
        load_adapter_checkpoint(model, ckpt)
    return model


def _save_final(model: Any, tokenizer: Any, folder: Path) -> Any:
    """Write the final model next to its destination, then swap it in (a kill never leaves half a model)."""
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model = merge_and_save(model, tokenizer, tmp)  # LoRA adapters folded in: a plain HF checkpoint
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return model


@torch.no_grad()
def sample_text(model: Any, tokenizer: Any, prompt: str, tokens: int, temperature: float, seed: int) -> str:
    """A continuation of `prompt` (greedy when temperature is 0), decoded without special tokens."""
    device = next(model.parameters()).device
    ids = torch.tensor([[tokenizer.bos_token_id, *tokenizer(prompt, add_special_tokens=False)["input_ids"]]])
    torch.manual_seed(seed)
    model.eval()
    out = model.generate(
        input_ids=ids.to(device),
        attention_mask=torch.ones_like(ids).to(device),
        max_new_tokens=tokens,
        do_sample=temperature > 0,
        temperature=temperature if temperature > 0 else None,
        top_k=40 if temperature > 0 else None,
        top_p=None,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return prompt + tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def run(config: PretrainConfig) -> dict:
    """Pre-train and return {"model": folder, "val_loss", "val_ppl", "unigram_loss", "steps", "sample", ...}."""
    started = time.perf_counter()
    accelerator = dist.build_accelerator(config)
    world = accelerator.num_processes
    split = split_corpus(read_corpus(config.data), config.val_fraction)
    out = stage_dir(config, STAGE)
    ckpt = latest_checkpoint(out) if config.resume else None
    # Everything that can reject the input happens before the run folder is touched.
    tokenizer = _tokenizer(config, split.train, ckpt)
    train_tokens = encode_documents(tokenizer, split.train)
    val_tokens = encode_documents(tokenizer, split.val)
    block = config.block_size
    if len(train_tokens) < block + 1:
        raise UserError(
            f"corpus too small: {len(train_tokens) + len(val_tokens)} tokens in all, {len(train_tokens)} for "
            f"training, fewer than one block of block_size+1={block + 1} (add text or lower block_size)"
        )
    if len(val_tokens) < block + 1:
        raise UserError(
            f"validation split too small: {len(val_tokens)} tokens, fewer than one block of {block + 1} "
            "(raise val_fraction, lower block_size, or add text)"
        )

    out = dist.start_run_on_main(accelerator, config, STAGE)  # seeds the RNGs: the model is built after this
    if config.resume and ckpt is None:
        log.info("resume: no checkpoint in %s, starting fresh", out / "checkpoints")
    model = _model(config, tokenizer, ckpt)
    if block > context_length(model):
        raise UserError(
            f"config field 'block_size': {block} exceeds the model's context {context_length(model)}"
        )
    if config.gradient_checkpointing:
        dist.enable_gradient_checkpointing(model)
    device = str(accelerator.device)
    model.to(device).train()
    log.info(
        "corpus: %d train documents (%d chars, %d tokens), %d validation documents (%d chars, %d tokens)",
        len(split.train),
        split.train_chars,
        len(train_tokens),
        len(split.val),
        split.val_chars,
        len(val_tokens),
    )
    log.info("model: %.2fM parameters, context %d", count_parameters(model) / 1e6, context_length(model))

    optimizer = make_optimizer(model, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, config))
    sampler = WindowSampler(train_tokens, block, config.seed)
    global_batch = config.batch_size * world  # every rank draws the same global batch and keeps its slice
    val = val_windows(val_tokens, block, config.eval_batches * global_batch)
    step, loss_sum, loss_count = 0, 0.0, 0
    if ckpt is not None:
        state = load_state(ckpt)  # also restores the python/numpy/torch RNGs
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        sampler.load_state_dict(state["data"])
        step, loss_sum, loss_count = state["step"], state["loss_sum"], state["loss_count"]
        if accelerator.is_main_process:
            truncate_metrics(out / "metrics.jsonl", step)
        log.info("resumed from %s (step %d)", ckpt, step)

    metrics = dist.metrics_logger(accelerator, out)
    unigram = unigram_loss(train_tokens, val[:, 1:], len(tokenizer))
    val_loss = float("nan")

    def validate() -> float:
        """The held-out loss, computed by the main process on the plain model (the others wait)."""
        loss = 0.0  # not NaN on the other ranks: NaN below means "never measured" on every rank alike
        if accelerator.is_main_process:
            loss = evaluate(dist.unwrap(accelerator, model), val, config.batch_size, config.bf16, device)
        accelerator.wait_for_everyone()
        return loss

    if step == 0:
        val_loss = validate()
        metrics.log(0, {"val/loss": val_loss, "val/ppl": math.exp(val_loss), "val/unigram_loss": unigram})
        log.info(
            "step 0: val loss %.3f; unigram baseline %.3f (ppl %.1f)", val_loss, unigram, math.exp(unigram)
        )

    model, optimizer = accelerator.prepare(model, optimizer)  # the scheduler stays out: one step per step
    tokens_per_step = global_batch * config.grad_accum * block
    bar = progress(config.max_steps, STAGE, initial=step) if accelerator.is_main_process else None
    window_start, window_steps = time.perf_counter(), 0
    while step < config.max_steps:
        for j in range(config.grad_accum):
            windows = sampler.next_batch(global_batch)
            if world > 1:
                rank = accelerator.process_index  # this rank's contiguous share (equal sizes)
                windows = windows[rank * config.batch_size : (rank + 1) * config.batch_size]
            # DDP averages the ranks' gradients: equal shares make it the mean over the whole global batch
            with dist.maybe_no_sync(accelerator, model, sync=j == config.grad_accum - 1):
                loss = lm_loss(model, windows, config.bf16, device)
                accelerator.backward(loss / config.grad_accum)
            loss_sum, loss_count = loss_sum + loss.item(), loss_count + 1
        grad_norm = accelerator.clip_grad_norm_(
            model.parameters(), config.grad_clip if config.grad_clip > 0 else float("inf")
        )
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        window_steps += 1
        if bar is not None:
            bar.update(1)

        timed_window = True
        if step % config.log_every == 0 or step == config.max_steps:
            seconds = time.perf_counter() - window_start
            tok_s = window_steps * tokens_per_step / max(seconds, 1e-9)
            train_loss = dist.mean_across(accelerator, {"loss": loss_sum / loss_count})["loss"]
            metrics.log(
                step,
                {
                    "train/loss": train_loss,
                    "train/ppl": math.exp(min(train_loss, 50.0)),
                    "train/lr": lr,
                    "train/grad_norm": float(grad_norm),
                    "perf/tokens_per_s": tok_s,
                    "perf/epoch": sampler.epoch + sampler.pos / max(1, len(train_tokens) // block),
                },
            )
            if bar is not None:
                bar.set_postfix(loss=f"{train_loss:.3f}", tok_s=f"{tok_s:,.0f}")
            loss_sum, loss_count = 0.0, 0
            timed_window = False
        if step % config.eval_every == 0 or step == config.max_steps:
            val_loss = validate()
            metrics.log(step, {"val/loss": val_loss, "val/ppl": math.exp(val_loss)})
            timed_window = False
            log.info(
                "step %d: val loss %.3f ppl %.1f (unigram %.3f)", step, val_loss, math.exp(val_loss), unigram
            )
        if (config.checkpoint_every and step % config.checkpoint_every == 0) or step == config.max_steps:
            state = {
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "data": sampler.state_dict(),
                "loss_sum": loss_sum,
                "loss_count": loss_count,
            }
            part = dist.savable(accelerator, model)
            if accelerator.is_main_process:
                save_checkpoint(out, step, {"": (part, tokenizer)}, state)
            accelerator.wait_for_everyone()
            timed_window = False
        if not timed_window:  # tokens/s counts training time only
            window_start, window_steps = time.perf_counter(), 0
    if bar is not None:
        bar.close()

    if math.isnan(val_loss):  # resumed a finished run: nothing was trained, measure it anyway
        val_loss = validate()
    final = out / "model"
    part = dist.savable(accelerator, model)
    if not accelerator.is_main_process:  # one writer; the others are done
        accelerator.wait_for_everyone()
        return {"model": str(final), "steps": step}
    plain = _save_final(part, tokenizer, final)
    sample = ""
    if config.sample_prompt:
        sample = sample_text(
            plain,
            tokenizer,
            config.sample_prompt,
            config.sample_tokens,
            config.sample_temperature,
            config.seed,
        )
        log.info("sample: %s", sample)
    metrics.close()
    minutes = (time.perf_counter() - started) / 60
    log.info(
        "done in %.1f min: val loss %.3f, ppl %.2f; model in %s", minutes, val_loss, math.exp(val_loss), final
    )
    accelerator.wait_for_everyone()
    return {
        "model": str(final),
        "val_loss": val_loss,
        "val_ppl": math.exp(val_loss),
        "unigram_loss": unigram,
        "steps": step,
        "minutes": minutes,
        "sample": sample,
    }


def main(argv: list[str]) -> int:
    config = parse_stage_args(
        PretrainConfig, argv, "rlhf pretrain", "Pre-train a base causal LM on plain-text files."
    )
    if config is None:
        return 0
    code = dist.relaunch(config, STAGE, argv)
    if code is not None:
        return code
    summary = run(config)
    if "val_loss" not in summary:  # a non-main rank
        return 0
    print(  # noqa: T201
        f"val loss {summary['val_loss']:.3f} (ppl {summary['val_ppl']:.2f}; unigram baseline "
        f"{summary['unigram_loss']:.3f}) after {summary['steps']} steps in {summary['minutes']:.1f} min\n"
        f"model: {summary['model']}"
    )
    if summary["sample"]:
        print(f"sample: {summary['sample']}")  # noqa: T201
    return 0
