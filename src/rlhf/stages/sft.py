"""`rlhf sft`: supervised fine-tuning on human demonstrations (prompt -> ideal response).

1. Read demonstrations (any format of `rlhf.data.demonstrations`), tokenize each through the one template:
   prompt ids (masked, label -100) + response ids + EOS (the loss), so the model learns the format and to stop.
2. Hold out `val_fraction` of them; batches are padded only to their own longest example (dynamic padding).
3. AdamW with linear warm-up then cosine decay; gradient accumulation weights every response token equally.
4. Evaluate the held-out loss every `eval_every` steps; keep the best weights; stop after `patience` evaluations
   without improvement (small demonstration sets over-fit quickly); restore the best weights at the end.
5. Checkpoints (model, optimizer, scheduler, RNG, step, best weights) every `save_every` steps; `resume=true`
   continues from the newest one and ends where an uninterrupted run would.

Output: `runs/<name>/sft/model/` (Hugging Face folder with the tokenizer), metrics.jsonl, tb/, log.txt.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from typing import Any

import torch

from rlhf.checkpoint import latest_checkpoint, load_state, save_checkpoint
from rlhf.config import ModelConfig, option
from rlhf.data.demonstrations import read_demonstrations
from rlhf.data.records import Demonstration
from rlhf.data.template import encode_prompt, encode_response
from rlhf.distributed import TrainingStageConfig
from rlhf.errors import UserError
from rlhf.modeling import autocast, context_length, load_causal_lm, load_policy
from rlhf.stagecli import parse_stage_args
from rlhf.tracking import log, progress, stage_dir, truncate_metrics

IGNORE = -100  # label of tokens that carry no loss (prompt, padding)


@dataclass
class SFTConfig(TrainingStageConfig):
    # inherited: bf16, gradient_checkpointing, num_processes, accelerate_config, lora (docs/scaling.md)
    model: ModelConfig = option(
        ModelConfig(), "model to fine-tune; empty path = <runs_dir>/<name>/pretrain/model"
    )
    data: list[str] = option(
        ["data/sft/self-instruct_seed_tasks.jsonl"],
        "demonstration files (JSONL prompt/response, chat messages, Self-Instruct, LIMA)",
    )
    val_fraction: float = option(
        0.1, "share of demonstrations held out for the validation loss", low=0.0, high=0.9
    )
    epochs: float = option(3.0, "passes over the training demonstrations", low=0.0)
    max_steps: int = option(0, "stop after this many optimizer steps; 0 = epochs decide", low=0)
    batch_size: int = option(8, "demonstrations per micro-batch", low=1)
    grad_accum: int = option(1, "micro-batches per optimizer step", low=1)
    max_length: int = option(256, "longest prompt+response in tokens (0 = the model's context)", low=0)
    lr: float = option(1e-4, "peak learning rate", low=0.0)
    min_lr_ratio: float = option(0.1, "cosine decays to lr * min_lr_ratio", low=0.0, high=1.0)
    warmup_steps: int = option(10, "linear warm-up steps", low=0)
    weight_decay: float = option(0.0, "AdamW weight decay", low=0.0)
    grad_clip: float = option(1.0, "clip the gradient norm (0 = off)", low=0.0)
    eval_every: int = option(20, "evaluate the held-out loss every N steps (0 = only at the end)", low=0)
    patience: int = option(3, "stop after N evaluations without a better held-out loss (0 = never)", low=0)
    save_every: int = option(50, "write a checkpoint every N steps (0 = only at the end)", low=0)
    log_every: int = option(10, "log training metrics every N steps", low=1)
    sample_prompts: int = option(
        8, "at the end, sample this many held-out prompts and log the EOS rate (0 = off)", low=0
    )

    def validate(self) -> None:
        super().validate()
        if not self.data:
            raise UserError("config field 'data': give at least one demonstration file")
        if self.epochs == 0 and self.max_steps == 0:
            raise UserError("config field 'epochs': 0 epochs and max_steps=0 would train nothing")


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]


def build_example(tokenizer: Any, demo: Demonstration, max_length: int) -> Example | None:
    """Prompt ids (label -100) + response ids + EOS (labels = ids); None when the prompt leaves no room."""
    prompt = encode_prompt(tokenizer, demo.prompt)
    response = encode_response(tokenizer, demo.response, add_eos=True)
    room = max_length - len(prompt)
    if room < 2:
        return None
    response = response[:room]  # a cut response loses its EOS: the model is not taught to stop mid-sentence
    return Example(prompt + response, [IGNORE] * len(prompt) + response)


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example of this batch (dynamic padding): ids, attention mask, labels."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def response_loss_sum(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """(sum of next-token losses over labelled tokens, their count): prompt and padding carry no loss.

    For GPT-2-family models the LM head runs only on the positions that carry loss (the head's GEMM over a
    vocabulary of 8k is a third of a small model's step; prompts are skipped instead of computed and masked).
    """
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE  # (B, L-1)
    if type(model).__name__ == "GPT2LMHeadModel":
        hidden = model.transformer(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])[0]
        logits = model.lm_head(hidden[:, :-1][keep])  # (N, V): only the labelled positions
        flat_targets = targets[keep]
    else:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        logits, flat_targets = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)
    loss = torch.nn.functional.cross_entropy(
        logits.float(), flat_targets, ignore_index=IGNORE, reduction="sum"
    )
    return loss, int(keep.sum())


def load_examples(config: SFTConfig, tokenizer: Any, max_length: int) -> tuple[list[Example], list[Example]]:
    demos = [d for path in config.data for d in read_demonstrations(path)]
    examples = [e for e in (build_example(tokenizer, d, max_length) for d in demos) if e is not None]
    if len(examples) < len(demos):
        log.warning(
            "skipped %d demonstrations whose prompt fills max_length=%d",
            len(demos) - len(examples),
            max_length,
        )
    if not examples:
        raise UserError("no demonstration fits max_length; raise max_length")
    order = list(range(len(examples)))
    random.Random(config.seed).shuffle(order)
    n_val = round(len(examples) * config.val_fraction) if len(examples) > 1 else 0
    n_val = min(max(n_val, 1 if config.val_fraction > 0 and len(examples) > 1 else 0), len(examples) - 1)
    val = [examples[i] for i in order[:n_val]]
    train = [examples[i] for i in order[n_val:]]
    return train, val


def micro_batches(train: list[Example], batch_size: int, seed: int, epoch: int) -> list[list[Example]]:
    """The epoch's micro-batches: a permutation fixed by (seed, epoch), so a resumed run sees the same order."""
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed * 1000 + epoch)).tolist()
    return [[train[i] for i in order[s : s + batch_size]] for s in range(0, len(order), batch_size)]


@torch.no_grad()
def evaluate(model: Any, val: list[Example], batch_size: int, pad_id: int, bf16: bool, device: str) -> float:
    if not val:
        return float("nan")
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for s in range(0, len(val), batch_size):
        batch = {k: v.to(device) for k, v in collate(val[s : s + batch_size], pad_id).items()}
        with autocast(bf16, device):
            loss, n = response_loss_sum(model, batch)
        total, count = total + float(loss), count + n
    model.train(was_training)
    return total / max(count, 1)


def lr_lambda(warmup: int, total: int, min_ratio: float):
    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress_ = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress_))

    return factor


def _model_path(config: SFTConfig) -> str:
    return config.model.path or str(stage_dir(config, "pretrain") / "model")


def run(config: SFTConfig) -> dict:
    from rlhf import distributed as dist
    from rlhf.lora import apply_lora, is_lora_model, load_adapter_checkpoint, merge_and_save

    accelerator = dist.build_accelerator(config)
    world = accelerator.num_processes
    out = dist.start_run_on_main(accelerator, config, "sft")
    device = str(accelerator.device)
    model, tokenizer = load_policy(_model_path(config), config.model.tokenizer)
    model = apply_lora(model, config.lora)
    if config.gradient_checkpointing:
        dist.enable_gradient_checkpointing(model)
    model.to(device)
    max_length = min(config.max_length or context_length(model), context_length(model))
    train, val = load_examples(config, tokenizer, max_length)
    per_epoch = math.ceil(len(train) / (config.batch_size * world))  # micro-batches of all ranks together
    total = math.ceil(config.epochs * per_epoch / config.grad_accum)
    if config.max_steps:
        total = min(total, config.max_steps) if config.epochs else config.max_steps
    total = max(total, 1)
    log.info(
        "sft: %d train / %d held-out demonstrations, %d steps (%d micro-batches of %d per epoch)",
        len(train), len(val), total, per_epoch, config.batch_size,
    )  # fmt: skip

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr,
        betas=(0.9, 0.95),
        fused=True,  # one kernel over all parameters (CPU and CUDA)
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(config.warmup_steps, total, config.min_lr_ratio)
    )
    step, best_val, bad_evals, best_state, start_val = 0, float("inf"), 0, None, None
    stopped_early = False
    ckpt = latest_checkpoint(out) if config.resume else None
    if config.resume and ckpt is None:
        log.info("resume: no checkpoint in %s, starting fresh", out)
    if ckpt is not None:
        state = load_state(ckpt)
        if is_lora_model(model):
            load_adapter_checkpoint(model, ckpt)
        else:
            model.load_state_dict(load_causal_lm(ckpt).state_dict())
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, best_val, bad_evals = state["step"], state["best_val"], state["bad_evals"]
        best_state, start_val = state["best_model"], state["start_val"]
        stopped_early = state["stopped_early"]
        truncate_metrics(out / "metrics.jsonl", step)
        log.info("resumed from %s at step %d", ckpt, step)

    metrics = dist.metrics_logger(accelerator, out)
    if start_val is None:  # the starting weights are the first candidate for "best"
        start_val = evaluate(model, val, config.batch_size, tokenizer.pad_token_id, config.bf16, device)
        metrics.log(0, {"val/loss": start_val})
        log.info("step 0: val/loss %.4f", start_val)
        if val:
            best_val = start_val
            best_state = {
                k: v.detach().cpu().clone() for k, v in dist.unwrap(accelerator, model).state_dict().items()
            }

    def save(at: int) -> None:
        part = dist.savable(accelerator, model)
        if accelerator.is_main_process:
            _save(at, part)
        accelerator.wait_for_everyone()

    def _save(at: int, part: Any) -> None:
        save_checkpoint(
            out,
            at,
            {"": (part, tokenizer)},
            {
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "best_val": best_val,
                "bad_evals": bad_evals,
                "best_model": best_state,
                "start_val": start_val,
                "stopped_early": stopped_early,
            },
        )

    model, optimizer = accelerator.prepare(model, optimizer)  # the scheduler stays out: one step per step
    model.train()
    bar = progress(total, "sft", initial=step)
    window_loss, window_tokens, window_start = 0.0, 0, time.perf_counter()
    while step < total and not stopped_early:
        # 1. The micro-batches of this optimizer step, fixed by the step number (resume-safe).
        group = []
        for j in range(config.grad_accum):
            micro = step * config.grad_accum + j
            epoch, index = divmod(micro, per_epoch)
            global_micro = micro_batches(train, config.batch_size * world, config.seed, epoch)[index]
            group.append(dist.rank_split(global_micro, accelerator) if world > 1 else global_micro)
        batches = [{k: v.to(device) for k, v in collate(g, tokenizer.pad_token_id).items()} for g in group]
        n_tokens = sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in batches)
        n_tokens = int(dist.sum_across(accelerator, torch.tensor([n_tokens], dtype=torch.float64)).item())
        # 2. Loss = mean over every response token of the step (all ranks), whatever micro-batch it sits in.
        # DDP averages gradients over ranks, hence the factor `world`.
        for j, batch in enumerate(batches):
            with dist.maybe_no_sync(accelerator, model, sync=j == len(batches) - 1):
                with autocast(config.bf16, device):
                    loss_sum, _ = response_loss_sum(model, batch)
                accelerator.backward(loss_sum * world / max(n_tokens, 1))
            window_loss += float(dist.sum_across(accelerator, loss_sum.detach().double().view(1)).item())
        window_tokens += n_tokens
        if config.grad_clip:
            accelerator.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        bar.update(1)
        if step % config.log_every == 0 or step == total:
            elapsed = time.perf_counter() - window_start
            seen = sum(int(b["attention_mask"].sum()) for b in batches)
            metrics.log(
                step,
                {
                    "train/loss": window_loss / max(window_tokens, 1),
                    "train/lr": scheduler.get_last_lr()[0],
                    "train/response_tokens_per_s": window_tokens / max(elapsed, 1e-9),
                    "train/batch_tokens": seen,
                },
            )
            window_loss, window_tokens, window_start = 0.0, 0, time.perf_counter()
        # 3. Held-out loss, best weights, early stopping.
        if val and ((config.eval_every and step % config.eval_every == 0) or step == total):
            val_loss = evaluate(model, val, config.batch_size, tokenizer.pad_token_id, config.bf16, device)
            if val_loss < best_val:
                best_val, bad_evals = val_loss, 0
                best_state = {
                    k: v.detach().cpu().clone()
                    for k, v in dist.unwrap(accelerator, model).state_dict().items()
                }
            else:
                bad_evals += 1
            metrics.log(step, {"val/loss": val_loss, "val/best_loss": best_val})
            log.info("step %d: val/loss %.4f (best %.4f)", step, val_loss, best_val)
            if config.patience and bad_evals >= config.patience and step < total:
                log.info("early stop: %d evaluations without a better held-out loss", bad_evals)
                stopped_early = True
        if (config.save_every and step % config.save_every == 0) or step == total or stopped_early:
            save(step)
        if stopped_early:
            break
    bar.close()

    # 4. Restore the best weights and write the final model.
    if best_state is not None:
        dist.unwrap(accelerator, model).load_state_dict(best_state)
        log.info("restored the best weights (val/loss %.4f)", best_val)
        if best_val >= start_val:
            log.warning("no step improved the held-out loss: the output is the starting model (lower lr?)")
    model.eval()
    final = out / "model"
    part = dist.savable(accelerator, model)
    if not accelerator.is_main_process:  # one writer; the others are done
        accelerator.wait_for_everyone()
        return {"model": str(final), "steps": step}
    model = merge_and_save(part, tokenizer, final)  # plain HF weights (LoRA merged)
    summary = {
        "model": str(final),
        "val_loss": best_val if val else float("nan"),
        "val_loss_start": start_val,
        "steps": step,
        "stopped_early": stopped_early,
    }
    if config.sample_prompts and val:
        summary["eos_rate"] = _eos_rate(
            model, tokenizer, val[: config.sample_prompts], config.seed, max_length
        )
        metrics.log(step, {"val/eos_rate": summary["eos_rate"]})
        log.info(
            "EOS rate on %d held-out prompts: %.2f", min(len(val), config.sample_prompts), summary["eos_rate"]
        )
    metrics.close()
    log.info("sft model: %s", final)
    accelerator.wait_for_everyone()
    return summary


def _eos_rate(model: Any, tokenizer: Any, examples: list[Example], seed: int, max_length: int) -> float:
    """Share of sampled responses (temperature 1) that end with EOS within 64 tokens."""
    from rlhf.sampling import generate

    prompts = [[t for t, lab in zip(e.input_ids, e.labels) if lab == IGNORE] for e in examples]
    gen = generate(
        model,
        tokenizer,
        prompts,
        max_new_tokens=min(64, max_length),
        generator=torch.Generator().manual_seed(seed),
    )
    return float(gen.finished.float().mean())


def main(argv: list[str]) -> int:
    config = parse_stage_args(
        SFTConfig,
        argv,
        "rlhf sft",
        "Supervised fine-tuning on demonstrations (loss on response tokens only).",
    )
    if config is None:
        return 0
    from rlhf.distributed import relaunch

    code = relaunch(config, "sft", argv)
    if code is not None:
        return code
    summary = run(config)
    if "val_loss" not in summary:  # a non-main rank
        return 0
    print(f"sft model: {summary['model']}  val_loss={summary['val_loss']:.4f}")  # noqa: T201
    return 0
