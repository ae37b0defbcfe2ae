"""`rlhf dpo`: Direct Preference Optimization on the same comparison records the reward model learns from.

DPO (Rafailov et al. 2023, https://arxiv.org/abs/2305.18290) trains the policy directly on preference pairs: the
implicit reward of a response is beta * log(pi(y|x) / ref(y|x)), and the loss is the Bradley-Terry likelihood of
the labelled order under that reward. No reward model, no sampling.

The run, as numbered steps:
 1. read comparisons; expand each K-way ranking to its (better, worse) pairs, ties skipped; tokenize through the
    template; hold out whole prompts for validation;
 2. compute the reference log-probs of every pair ONCE (with LoRA: the base with adapters disabled) and cache them
    in memory and in `reference_logprobs.pt` (reused on resume when the pairs and model are unchanged), so no
    reference model stays in memory during training;
 3. each optimizer step: one forward over chosen and rejected sequences together, DPO loss, backward, clip, step;
    data-parallel over Accelerate ranks, each taking its slice of the global batch;
 4. log rewards/* and train/*; evaluate val/* on held-out pairs; checkpoint; final policy in `model/`.
The pairs, their batch layout and their log-probs are in `rlhf.stages.dpo_pairs`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from rlhf.config import ModelConfig, option
from rlhf.distributed import TrainingStageConfig
from rlhf.errors import UserError
from rlhf.stages.dpo_pairs import Pair, all_pair_logprobs, build_pairs, pair_logprobs, split_records

log = logging.getLogger("rlhf")

REF_CACHE = "reference_logprobs.pt"


@dataclass
class DPOConfig(TrainingStageConfig):
    """Direct Preference Optimization of a policy on ranked comparisons (`bf16`, `gradient_checkpointing`,
    `num_processes`, `accelerate_config`, `lora.*`: see TrainingStageConfig and docs/scaling.md; bf16 autocast
    needs AVX512-BF16/AMX to be fast on CPU, or CUDA)."""

    POSITIONAL: ClassVar[tuple[str, ...]] = ("comparisons",)

    comparisons: list[str] = option([], "comparison file(s): ours, TRL {prompt,chosen,rejected} or HH-RLHF")
    val_file: str = option("", "held-out comparison file; empty = hold out `val_fraction` of the prompts")
    val_fraction: float = option(
        0.1, "share of prompts held out when no val file is given", low=0.0, high=0.9
    )
    model: ModelConfig = option(
        ModelConfig(), "the policy to start from (model.path: e.g. runs/<name>/sft/model)"
    )
    reference: str = option(
        "",
        "reference policy folder of the implicit reward; empty = the starting policy (with LoRA: the base with "
        "adapters disabled). `rlhf loop` sets it to the SFT model when round r > 1 starts from round r-1's policy",
    )
    beta: float = option(0.1, "DPO temperature: strength of the implicit KL tie to the reference", low=1e-6)
    loss_type: str = option(
        "sigmoid", "sigmoid = DPO; ipo = IPO (squared, per-token)", choices=("sigmoid", "ipo")
    )
    label_smoothing: float = option(
        0.0, "conservative DPO: assumed share of flipped labels", low=0.0, high=0.49
    )
    steps: int = option(200, "optimizer steps", low=1)
    batch_size: int = option(8, "pairs per micro-batch per process", low=1)
    grad_accum: int = option(1, "micro-batches per optimizer step", low=1)
    lr: float = option(5e-5, "peak learning rate (AdamW)", low=0.0)
    lr_schedule: str = option(
        "linear", "after warmup: linear decay to 0, or constant", choices=("linear", "constant")
    )
    warmup_steps: int = option(10, "linear warm-up steps", low=0)
    weight_decay: float = option(0.0, "AdamW weight decay", low=0.0)
    max_grad_norm: float = option(1.0, "gradient clipping norm; 0 = off", low=0.0)
    max_length: int = option(256, "prompt + response tokens kept (responses are cut)", low=4)
    max_prompt_length: int = option(128, "prompt tokens kept (the start is cut, BOS kept)", low=2)
    eval_batch_size: int = option(16, "pairs per no-grad forward (reference and validation)", low=1)
    log_every: int = option(10, "log train metrics every N steps", low=1)
    eval_every: int = option(50, "validate every N steps (and at the end); 0 = only at the end", low=0)
    save_every: int = option(100, "checkpoint every N steps (and at the end)", low=1)
    share_prompt: bool = option(
        True,
        "run each prompt once for both responses (KV cache with gradients); off with gradient checkpointing "
        "or several processes",
    )
    attention: str = option(
        "auto",
        "attention kernel: auto = eager on CPU (SDPA's CPU kernels are slower at these sizes, its bf16 backward "
        "several times), sdpa elsewhere",
        choices=("auto", "eager", "sdpa"),
    )

    def validate(self) -> None:
        super().validate()
        if not self.comparisons:
            raise UserError("config field 'comparisons': give the comparison file(s) to learn from")
        if not self.model.path:
            raise UserError(
                "config field 'model.path': DPO starts from a trained policy (e.g. runs/<name>/sft/model)"
            )
        if self.max_prompt_length >= self.max_length:
            raise UserError("config field 'max_prompt_length': must be smaller than max_length")


# ---------------------------------------------------------------------------------------------------------------
# 2. Reference log-probs, computed once


def _fingerprint(config: DPOConfig, pairs: list[Pair]) -> str:
    h = hashlib.sha256()
    stamps = []
    for folder in (Path(config.model.path), Path(config.reference) if config.reference else None):
        if folder is None:
            continue
        weights = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin"))
        stamps.append(
            [str(folder.resolve()), [(p.name, p.stat().st_size, int(p.stat().st_mtime)) for p in weights]]
        )
    layout = config.share_prompt and not config.gradient_checkpointing  # the same numbers up to rounding
    h.update(json.dumps([stamps, config.bf16, config.lora.enabled, layout]).encode())
    for p in pairs:
        h.update(json.dumps([p.prompt_ids, p.chosen_ids, p.rejected_ids]).encode())
    return h.hexdigest()


def reference_logprobs(
    config: DPOConfig,
    model: Any,
    pad_id: int,
    train: list[Pair],
    val: list[Pair],
    out: Path,
    accelerator: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(N_train, 2) and (N_val, 2) reference log-probs, from the run folder's cache when it matches."""
    from rlhf.lora import is_lora_model, reference_logprobs_with_adapters_disabled

    path = out / REF_CACHE
    key = _fingerprint(config, train + val)
    if path.exists():
        cached = torch.load(path, map_location="cpu", weights_only=True)
        if cached.get("fingerprint") == key:
            log.info("reference log-probs: reusing %s", path)
            return cached["train"], cached["val"]
    start = time.perf_counter()
    share = shares_prompt(config, accelerator)
    if config.reference:  # a separate reference (e.g. SFT while the policy starts from an earlier round's)
        from rlhf.modeling import load_causal_lm

        ref_model = prepare_model(load_causal_lm(config.reference), config).eval().to(accelerator.device)
        ref = all_pair_logprobs(ref_model, train + val, pad_id, config.eval_batch_size, accelerator, share)
        del ref_model
    elif is_lora_model(model):
        with reference_logprobs_with_adapters_disabled(model) as base:
            ref = all_pair_logprobs(base, train + val, pad_id, config.eval_batch_size, accelerator, share)
    else:  # full fine-tuning: the reference is the policy before its first step, so compute it now
        was_training = model.training
        model.eval()
        ref = all_pair_logprobs(model, train + val, pad_id, config.eval_batch_size, accelerator, share)
        model.train(was_training)
    train_ref, val_ref = ref[: len(train)], ref[len(train) :]
    if accelerator.is_main_process:
        tmp = path.with_name(f".{path.name}.tmp")
        torch.save({"fingerprint": key, "train": train_ref, "val": val_ref}, tmp)
        tmp.replace(path)
    accelerator.wait_for_everyone()
    log.info("reference log-probs of %d pairs in %.1f s", len(train) + len(val), time.perf_counter() - start)
    return train_ref, val_ref


# ---------------------------------------------------------------------------------------------------------------
# 3-4. Training


def _pair_metrics(config: DPOConfig, logps: torch.Tensor, lengths: torch.Tensor, ref: torch.Tensor) -> tuple:
    from rlhf.losses import dpo_loss

    chosen, rejected = logps.float().chunk(2)
    len_c, len_r = lengths.chunk(2)
    ref = ref.to(chosen.device, torch.float32)
    losses, r_c, r_r = dpo_loss(
        chosen,
        rejected,
        ref[:, 0],
        ref[:, 1],
        config.beta,
        config.label_smoothing,
        config.loss_type,
        len_c,
        len_r,
    )
    stats = {
        "rewards/chosen": r_c.mean(),
        "rewards/rejected": r_r.mean(),
        "rewards/margins": (r_c - r_r).mean(),
        "rewards/accuracies": (r_c > r_r).float().mean(),
        "logps/chosen": chosen.detach().mean(),
        "logps/rejected": rejected.detach().mean(),
    }
    return losses, stats


def evaluate(
    config: DPOConfig, model: Any, pairs: list[Pair], ref: torch.Tensor, pad_id: int, accelerator
) -> dict:
    """val/* metrics over held-out pairs: loss, implicit-reward accuracy and margin."""
    from rlhf.losses import dpo_loss

    if not pairs:
        return {}
    was_training = model.training
    model.eval()
    share = shares_prompt(config, accelerator)
    pol = all_pair_logprobs(model, pairs, pad_id, config.eval_batch_size, accelerator, share).float()
    model.train(was_training)
    lengths = torch.tensor([[len(p.chosen_ids), len(p.rejected_ids)] for p in pairs])
    ref = ref.float()
    losses, r_c, r_r = dpo_loss(
        pol[:, 0], pol[:, 1], ref[:, 0], ref[:, 1], config.beta, config.label_smoothing, config.loss_type,
        lengths[:, 0], lengths[:, 1],
    )  # fmt: skip
    return {
        "val/loss": losses.mean().item(),
        "val/accuracy": (r_c > r_r).float().mean().item(),
        "val/margin": (r_c - r_r).mean().item(),
        "val/rewards_chosen": r_c.mean().item(),
        "val/rewards_rejected": r_r.mean().item(),
    }


def shares_prompt(config: DPOConfig, accelerator: Any) -> bool:
    """One prompt pass per pair (see shared_prompt_logprobs) where it is possible; the same choice everywhere in a
    run, so the reference and the policy log-probs are computed the same way (the margin is exactly 0 at step 0)."""
    return config.share_prompt and not config.gradient_checkpointing and accelerator.num_processes == 1


def prepare_model(model: Any, config: DPOConfig) -> Any:
    """The attention kernel of `config.attention` and torch's fused tanh-GELU (the same formula as GPT-2's
    Python-level "gelu_new", one kernel instead of eight): no change to the weights or the saved checkpoint."""
    from rlhf.rollout import fast_gelu

    kind = config.attention
    if kind == "auto":
        kind = "eager" if str(config.device).startswith("cpu") else "sdpa"
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(kind)
    return fast_gelu(model)


def _disable_dropout(model: Any) -> None:
    """DPO compares log-probs of the policy with the (dropout-free) reference: dropout would bias the ratio.
    LoRA's own dropout on the adapter input is kept."""
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Dropout) and "lora_dropout" not in name:
            module.p = 0.0


def _schedule(config: DPOConfig) -> Any:
    def factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / (config.warmup_steps + 1)
        if config.lr_schedule == "constant":
            return 1.0
        return max(0.0, (config.steps - step) / max(1, config.steps - config.warmup_steps))

    return factor


def _adamw(params: list[torch.nn.Parameter], config: DPOConfig) -> torch.optim.Optimizer:
    """AdamW with the fused kernel where this torch has it for the parameters' device (one pass per tensor)."""
    try:
        return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)


def _global_order(n: int, seed: int, start: int, count: int) -> list[int]:
    """Pair indices [start, start+count) of the endless sequence of per-epoch shuffles (resume = same order)."""
    out: list[int] = []
    epoch, offset = divmod(start, n)
    while len(out) < count:
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
        take = perm[offset : offset + count - len(out)]
        out.extend(take)
        epoch, offset = epoch + 1, 0
    return out


def run(config: DPOConfig) -> dict:
    from rlhf.checkpoint import latest_checkpoint, load_state, save_checkpoint
    from rlhf.data.comparisons import read_any_comparisons
    from rlhf.distributed import (
        build_accelerator,
        enable_gradient_checkpointing,
        maybe_no_sync,
        mean_across,
        rank_slice,
        savable,
        start_run_on_main,
        unwrap,
    )
    from rlhf.lora import apply_lora, is_lora_model, load_adapter_checkpoint, merge_and_save
    from rlhf.modeling import context_length, load_causal_lm, load_policy
    from rlhf.tracking import MetricsLogger, progress, truncate_metrics

    accelerator = build_accelerator(config)
    out = start_run_on_main(accelerator, config, "dpo")
    world = accelerator.num_processes

    # 1. pairs
    model, tokenizer = load_policy(config.model.path, config.model.tokenizer)
    if config.max_length > context_length(model):
        raise UserError(
            f"config field 'max_length': {config.max_length} exceeds the model's context {context_length(model)}"
        )
    records = [r for path in config.comparisons for r in read_any_comparisons(path)[0]]
    if config.val_file:
        train_records, val_records = records, read_any_comparisons(config.val_file)[0]
    else:
        train_records, val_records = split_records(records, config.val_fraction, config.seed)
    train = build_pairs(train_records, tokenizer, config.max_length, config.max_prompt_length)
    val = build_pairs(val_records, tokenizer, config.max_length, config.max_prompt_length)
    if not train:
        raise UserError(f"{', '.join(config.comparisons)}: no training pairs (every ranking is a full tie?)")
    log.info("%d training pairs, %d held-out pairs", len(train), len(val))
    pad_id = tokenizer.pad_token_id

    # 2. LoRA, then the reference log-probs (computed once, before any update)
    model = apply_lora(prepare_model(model, config), config.lora)
    _disable_dropout(model)
    ref_train, ref_val = reference_logprobs(config, model, pad_id, train, val, out, accelerator)

    checkpoint = latest_checkpoint(out) if config.resume else None
    if config.resume and checkpoint is None:
        log.info("resume: no checkpoint in %s, starting fresh", out)
    if checkpoint is not None:
        if is_lora_model(model):
            load_adapter_checkpoint(model, checkpoint)
        else:
            model.load_state_dict(load_causal_lm(checkpoint).state_dict())
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    model.train()

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = _adamw(params, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(config))
    step = 0
    if checkpoint is not None:
        state = load_state(checkpoint)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step = state["step"]
        log.info("resumed from %s at step %d", checkpoint, step)
    # the scheduler stays outside prepare(): Accelerate would step it once per process
    model, optimizer = accelerator.prepare(model, optimizer)

    metrics = MetricsLogger(out) if accelerator.is_main_process else None
    if metrics is not None:
        truncate_metrics(metrics.path, step)
    micro = config.batch_size * world  # pairs per micro-step, all ranks together
    share = shares_prompt(config, accelerator)
    bar = progress(config.steps, "dpo", initial=step) if accelerator.is_main_process else None
    window: dict[str, float] = {}
    tick, pairs_done = time.perf_counter(), 0
    val_metrics: dict[str, float] = {}

    def save(step: int) -> None:
        part = savable(accelerator, model)  # every rank: gathers shards under FSDP/DeepSpeed
        if accelerator.is_main_process:
            save_checkpoint(
                out, step, {"": (part, tokenizer)},
                {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
            )  # fmt: skip
        accelerator.wait_for_everyone()

    # 3. optimizer steps
    while step < config.steps:
        order = _global_order(
            len(train), config.seed, step * micro * config.grad_accum, micro * config.grad_accum
        )
        stats_sum: dict[str, float] = {}
        for m in range(config.grad_accum):
            idx = rank_slice(order[m * micro : (m + 1) * micro], accelerator)
            last = m == config.grad_accum - 1
            with maybe_no_sync(accelerator, model, sync=last):
                # autocast here, not only through the prepared model's forward: the unpadded path (rlhf.unpadded)
                # calls the trunk's layers directly
                with accelerator.autocast():
                    logps, lengths = pair_logprobs(model, [train[i] for i in idx], pad_id, share)
                losses, stats = _pair_metrics(config, logps, lengths, ref_train[idx])
                loss = losses.mean()
                accelerator.backward(loss / config.grad_accum)
            stats["train/loss"] = loss.detach()
            for k, v in stats.items():
                stats_sum[k] = stats_sum.get(k, 0.0) + float(v) / config.grad_accum
        grad_norm = (
            accelerator.clip_grad_norm_(params, config.max_grad_norm)
            if config.max_grad_norm > 0
            else torch.tensor(0.0)
        )
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        pairs_done += micro * config.grad_accum
        stats_sum["train/grad_norm"] = float(grad_norm)
        for k, v in mean_across(accelerator, stats_sum).items():
            window[k] = window.get(k, 0.0) + v
        window["_n"] = window.get("_n", 0.0) + 1
        if bar is not None:
            bar.update(1)
        # 4. log, validate, checkpoint
        if step % config.log_every == 0 or step == config.steps:
            n = window.pop("_n")
            row = {k: v / n for k, v in window.items()}
            row["train/lr"] = scheduler.get_last_lr()[0]
            row["perf/pairs_per_s"] = pairs_done / max(time.perf_counter() - tick, 1e-9)
            window, tick, pairs_done = {}, time.perf_counter(), 0
            if metrics is not None:
                metrics.log(step, row)
                if bar is not None:
                    bar.set_postfix(loss=f"{row['train/loss']:.4f}", acc=f"{row['rewards/accuracies']:.2f}")
        if val and ((config.eval_every and step % config.eval_every == 0) or step == config.steps):
            val_metrics = evaluate(config, model, val, ref_val, pad_id, accelerator)
            if metrics is not None:
                metrics.log(step, val_metrics)
                log.info("step %d: %s", step, ", ".join(f"{k}={v:.4f}" for k, v in val_metrics.items()))
        if step % config.save_every == 0 or step == config.steps:
            save(step)
    if bar is not None:
        bar.close()
    if not val_metrics and val:
        val_metrics = evaluate(config, model, val, ref_val, pad_id, accelerator)

    final = out / "model"
    if accelerator.is_main_process:
        tmp = out / ".model.tmp"
        merge_and_save(unwrap(accelerator, model), tokenizer, tmp)
        from rlhf.distributed import replace_folder

        replace_folder(tmp, final)
        metrics.close()
        log.info("final policy: %s", final)
    accelerator.wait_for_everyone()
    summary = {"model": str(final), "run_dir": str(out), "steps": step, "pairs": len(train), **val_metrics}
    return {k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in summary.items()}


def main(argv: list[str]) -> int:
    from rlhf.distributed import relaunch
    from rlhf.stagecli import parse_stage_args

    config = parse_stage_args(
        DPOConfig, argv, "rlhf dpo", "Direct Preference Optimization of a policy on ranked comparisons."
    )
    if config is None:
        return 0
    code = relaunch(config, "dpo", argv)
    if code is not None:
        return code
    summary = run(config)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(summary))  # noqa: T201 - the CLI's output
    return 0
