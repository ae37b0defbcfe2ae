"""`rlhf reward`: train a Bradley-Terry reward model on rankings of K responses, as InstructGPT does.

    rlhf reward model.path=runs/demo/sft/model comparisons=runs/demo/label/comparisons.jsonl

1. Read comparisons (ours, TRL pairs or HH-RLHF transcripts, see rlhf.data.comparisons); hold out a validation set.
2. Tokenize each response once through the template (`response_token_ids` verbatim when the record has them).
   Sequences longer than `max_length` keep the whole prompt and lose the end of the response; a prompt that leaves
   no room for a response is an error naming the record.
3. Each step takes `batch_size` rankings, forwards all their responses in one batch (each response once, never
   once per pair) and minimises the mean over rankings of the mean over their C(K,2) pairs of
   -log sigmoid(r_better - r_worse - margin) (losses.ranking_loss). Ties give no pair.
4. Evaluate held-out pairwise accuracy, mean margin and a calibration table (calibration.json).
5. Fit the normalisation (mean 0, std 1 on SFT-policy responses) and save `model/` (rlhf_reward.json beside it).
"""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from rlhf.checkpoint import latest_checkpoint, load_state, save_checkpoint
from rlhf.config import ModelConfig, option
from rlhf.data.records import read_samples
from rlhf.data.template import encode_prompt, encode_response
from rlhf.distributed import TrainingStageConfig
from rlhf.errors import UserError
from rlhf.losses import ranking_loss, ranking_pair_mask
from rlhf.modeling import autocast
from rlhf.reward_model import RewardModel, reward_model_from_causal_lm
from rlhf.stagecli import parse_stage_args
from rlhf.stages.reward_data import Ranking, batch_scores, set_attention, split, tokenize_rankings
from rlhf.tracking import log, progress, truncate_metrics

CALIBRATION_BINS = (0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


@dataclass
class RewardConfig(TrainingStageConfig):
    """Train a reward model from ranked comparisons (`bf16`, `gradient_checkpointing`, `num_processes`, `lora.*`:
    see TrainingStageConfig and docs/scaling.md)."""

    POSITIONAL: ClassVar[tuple[str, ...]] = ("comparisons",)

    model: ModelConfig = option(
        ModelConfig(), "the starting model: a causal LM (e.g. our SFT model/) or an RM"
    )
    comparisons: list[str] = option([], "comparison file(s): ours, TRL {prompt,chosen,rejected} or HH-RLHF")
    val_file: str = option(
        "", "held-out comparison file; empty = hold out `val_fraction` of the training data"
    )
    val_fraction: float = option(
        0.1, "fraction of rankings held out when no val_file is given", low=0.0, high=0.9
    )
    epochs: int = option(1, "passes over the training rankings (when max_steps is 0)", low=1)
    max_steps: int = option(0, "optimizer steps; 0 = `epochs` passes", low=0)
    lr: float = option(1e-4, "peak learning rate (AdamW)", low=0.0)
    weight_decay: float = option(0.0, "AdamW weight decay", low=0.0)
    warmup_steps: int = option(10, "linear warm-up steps, then linear decay to 0", low=0)
    batch_size: int = option(8, "rankings per optimizer step and process (all C(K,2) pairs of each)", low=1)
    max_length: int = option(0, "longest prompt+response in tokens; 0 = the model's context", low=0)
    long_prompts: str = option(
        "error", "a prompt that leaves no room for a response within max_length", choices=("error", "skip")
    )
    margin: float = option(0.0, "margin m in -log sigmoid(r_w - r_l - m)")
    max_grad_norm: float = option(1.0, "gradient clipping; 0 = off", low=0.0)
    share_prompt: bool = option(
        True,
        "forward each ranking's prompt once, shared by its K responses (KV cache); off while training with "
        "gradient_checkpointing (no cache there)",
    )
    attention: str = option(
        "auto",
        "attention kernel; auto = eager on CPU (faster than SDPA's CPU kernel at these sizes), sdpa elsewhere",
        choices=("auto", "eager", "sdpa"),
    )
    eval_every: int = option(50, "evaluate every N steps; 0 = only at the end", low=0)
    ckpt_every: int = option(100, "checkpoint every N steps; 0 = never", low=0)
    eval_batch_size: int = option(32, "responses per forward when evaluating", low=1)
    normalise: str = option(
        "mean_std", "score normalisation fitted after training", choices=("none", "mean", "mean_std")
    )
    norm_samples: str = option(
        "", "samples JSONL whose responses define mean 0 / std 1; empty = see norm_policy"
    )
    norm_policy: str = option(
        "",
        "policy whose training responses define the normalisation; empty = policies naming 'sft', else all",
    )

    def validate(self) -> None:
        super().validate()
        if not self.model.path:
            raise UserError(
                "config field 'model.path': give the starting model folder (our SFT model/ or an RM)"
            )
        if not self.comparisons:
            raise UserError("config field 'comparisons': give at least one comparison file")


# ---------------------------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def evaluate(rm: RewardModel, data: list[Ranking], config: RewardConfig) -> tuple[dict, list[dict]]:
    """Pairwise accuracy (score ties count half), loss, mean margin and a calibration table over held-out pairs."""
    was_training = rm.model.training
    rm.model.eval()
    diffs: list[torch.Tensor] = []
    losses, n_rankings = 0.0, 0
    per_batch = max(1, config.eval_batch_size // max(len(r.ranks) for r in data))
    for start in range(0, len(data), per_batch):
        scores, ranks = batch_scores(rm, data[start : start + per_batch], config.bf16, config.share_prompt)
        loss, _ = ranking_loss(scores, ranks, config.margin)
        better = ranking_pair_mask(ranks)  # (B, K, K)
        rows = int(better.flatten(1).any(-1).sum())
        losses += loss.item() * rows
        n_rankings += rows
        diffs.append((scores.unsqueeze(2) - scores.unsqueeze(1))[better])
    rm.model.train(was_training)
    diff = torch.cat(diffs).float()  # r_better - r_worse for every held-out pair
    accuracy = ((diff > 0).float() + 0.5 * (diff == 0).float()).mean().item()
    table = calibration_table(diff)
    ece = sum(row["count"] * abs(row["predicted"] - row["observed"]) for row in table) / max(len(diff), 1)
    metrics = {
        "val/accuracy": accuracy,
        "val/loss": losses / max(n_rankings, 1),
        "val/margin": diff.mean().item(),
        "val/ece": ece,
        "val/pairs": float(len(diff)),
    }
    return metrics, table


def calibration_table(diff: torch.Tensor) -> list[dict]:
    """Bins of the RM's confidence in its own pick, sigmoid(|r_a - r_b|), against how often the pick was right."""
    confidence = torch.sigmoid(diff.abs())
    right = (diff > 0).float() + 0.5 * (diff == 0).float()
    rows = []
    for low, high in zip(CALIBRATION_BINS[:-1], CALIBRATION_BINS[1:]):
        inside = (confidence >= low) & ((confidence < high) | (high == 1.0))
        count = int(inside.sum())
        rows.append(
            {
                "bin": f"{low:.1f}-{high:.1f}",
                "count": count,
                "predicted": confidence[inside].mean().item() if count else (low + high) / 2,
                "observed": right[inside].mean().item() if count else float("nan"),
            }
        )
    return [r for r in rows if r["count"]]


# ---------------------------------------------------------------------------------------------------------------
# Normalisation


@torch.no_grad()
def _raw_scores(rm: RewardModel, sequences: list[list[int]], batch: int, bf16: bool) -> torch.Tensor:
    rm.model.eval()
    out = []
    for start in range(0, len(sequences), batch):
        with autocast(bf16, str(rm.device)):
            out.append(rm.raw_scores(*rm.pad(sequences[start : start + batch])).float().cpu())
    return torch.cat(out)


def fit_normalisation(rm: RewardModel, config: RewardConfig, train: list[Ranking], max_length: int) -> dict:
    """Set rm.shift / rm.gain so SFT-policy responses score mean 0 (std 1); return what it was fitted on."""
    if config.normalise == "none":
        rm.shift, rm.gain = 0.0, 1.0
        return {"normalise": "none"}
    if config.norm_samples:
        records = read_samples(config.norm_samples)
        sequences = [
            (encode_prompt(rm.tokenizer, s.prompt) + (r.token_ids or encode_response(rm.tokenizer, r.text)))[
                :max_length
            ]
            for s in records
            for r in s.responses
        ]
        fitted_on = f"samples {config.norm_samples}"
    else:
        items = [(seq, policy) for r in train for seq, policy in zip(r.sequences, r.policies)]
        if config.norm_policy:
            sequences = [seq for seq, policy in items if policy == config.norm_policy]
            fitted_on = f"training responses of policy {config.norm_policy}"
            if not sequences:
                raise UserError(
                    f"config field 'norm_policy': no training response comes from '{config.norm_policy}'"
                )
        else:
            sequences = [seq for seq, policy in items if "sft" in policy.lower()]
            fitted_on = "training responses of SFT policies"
            if not sequences:
                sequences = [seq for seq, _ in items]
                fitted_on = "all training responses (no policy name contains 'sft')"
    raw = _raw_scores(rm, sequences, config.eval_batch_size, config.bf16)
    rm.shift = raw.mean().item()
    rm.gain = 1.0
    if config.normalise == "mean_std" and len(raw) > 1:
        rm.gain = 1.0 / max(raw.std().item(), 1e-6)
    log.info("normalisation: shift %.4f gain %.4f fitted on %d %s", rm.shift, rm.gain, len(raw), fitted_on)
    return {"normalise": config.normalise, "fitted_on": fitted_on, "n": len(raw)}


# ---------------------------------------------------------------------------------------------------------------
# Training


def _schedule(step: int, warmup: int, total: int) -> float:
    if warmup and step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


def _start_model(config: RewardConfig, ckpt: Any) -> RewardModel:
    """The RM to train: a fresh head on `model.path`'s trunk (or a trained RM), LoRA adapters when asked, and the
    newest checkpoint's weights when resuming (full weights, or adapters + head under LoRA)."""
    from rlhf.lora import apply_lora, load_adapter_checkpoint

    if ckpt and not config.lora.enabled:
        return RewardModel.load(ckpt)
    rm = reward_model_from_causal_lm(config.model.path, config.model.tokenizer)
    rm.model = apply_lora(rm.model, config.lora)  # trains the adapters and the (new) score head
    if ckpt:
        load_adapter_checkpoint(rm.model, ckpt)
    return rm


def run(config: RewardConfig) -> dict:
    from rlhf import distributed as dist

    accelerator = dist.build_accelerator(config)
    world = accelerator.num_processes
    out = dist.start_run_on_main(accelerator, config, "reward")
    device = accelerator.device
    train_records, val_records = split(config)
    ckpt = latest_checkpoint(out) if config.resume else None
    if config.resume and ckpt is None:
        log.info("resume: no checkpoint in %s, starting fresh", out)
    rm = _start_model(config, ckpt)
    rm.to(device)
    set_attention(rm, config.attention, str(device))
    share_prompt = config.share_prompt
    if config.gradient_checkpointing:
        dist.enable_gradient_checkpointing(rm.model)
        if share_prompt:
            log.info("gradient_checkpointing: training forwards whole sequences (no shared prompt cache)")
            share_prompt = False
    max_length = min(config.max_length or rm.context, rm.context)
    train = tokenize_rankings(rm, train_records, "training comparisons", max_length, config.long_prompts)
    val = (
        tokenize_rankings(rm, val_records, "validation comparisons", max_length, config.long_prompts)
        if val_records
        else []
    )
    # A step takes `batch_size` rankings per process: global batches of batch_size x world, each rank its slice.
    global_batch = config.batch_size * world
    steps_per_epoch = len(train) // global_batch + (
        len(train) % global_batch >= world
    )  # a tail feeds every rank
    if steps_per_epoch == 0:
        raise UserError(f"{len(train)} training rankings cannot feed {world} processes: lower num_processes")
    pairs_per_epoch = sum(len(r.sequences) * (len(r.sequences) - 1) // 2 for r in train)
    total = config.max_steps or config.epochs * steps_per_epoch
    log.info(
        "%d training rankings (K = %s, up to %d pairs per epoch), %d held out; %d steps of %d rankings",
        len(train),
        ",".join(map(str, sorted(Counter(len(r.ranks) for r in train)))),
        pairs_per_epoch,
        len(val),
        total,
        global_batch,
    )
    params = [(n, p) for n, p in rm.model.named_parameters() if p.requires_grad]
    decay = [p for n, p in params if p.ndim >= 2]
    no_decay = [p for n, p in params if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr,
        fused=device.type in ("cpu", "cuda"),
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: _schedule(s, config.warmup_steps, total)
    )
    step = 0
    if ckpt:
        state = load_state(ckpt)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step = state["step"]
        if accelerator.is_main_process:
            truncate_metrics(out / "metrics.jsonl", step)
        log.info("resumed from %s at step %d", ckpt, step)
    # The whole RewardModel goes to Accelerate: its forward (raw or shared-prompt scores) runs inside the wrapper.
    forward, optimizer = accelerator.prepare(rm, optimizer)  # the scheduler stays out: one step per step
    metrics_log = dist.metrics_logger(accelerator, out)
    bar = progress(total, "reward", initial=step) if accelerator.is_main_process else None
    rm.model.train()
    order: list[int] = []
    val_metrics: dict = {}

    def save(at: int) -> None:
        part = dist.savable(accelerator, forward, inner="model")
        if accelerator.is_main_process:
            save_checkpoint(
                out,
                at,
                {"": (part, rm.tokenizer)},
                {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
            )
        accelerator.wait_for_everyone()

    try:
        while step < total:
            epoch, position = divmod(step, steps_per_epoch)
            if position == 0 or not order:
                order = list(range(len(train)))
                random.Random(config.seed * 1000 + epoch).shuffle(order)
            batch = [train[i] for i in order[position * global_batch : (position + 1) * global_batch]]
            mine = dist.rank_split(batch, accelerator) if world > 1 else batch
            scores, ranks = batch_scores(rm, mine, config.bf16, share_prompt, forward)
            loss, stats = ranking_loss(scores, ranks, config.margin)
            # Every ranking weighs the same in the global mean: DDP averages the ranks' gradients, so a rank's
            # mean over its rankings is scaled by (its rankings x world / all rankings): 1 for equal shares.
            optimizer.zero_grad(set_to_none=True)
            accelerator.backward(loss * (len(mine) * world / len(batch)))
            grad_norm = (
                accelerator.clip_grad_norm_(rm.model.parameters(), config.max_grad_norm)
                if config.max_grad_norm
                else torch.tensor(0.0)
            )
            optimizer.step()
            scheduler.step()
            step += 1
            local = torch.stack(
                [
                    loss.detach().double() * len(mine),
                    stats["accuracy"].double() * stats["pairs"],
                    stats["margin"].double() * stats["pairs"],
                    stats["pairs"].double(),
                ]
            )
            summed = dist.sum_across(accelerator, local.cpu()).tolist()
            row = {
                "train/loss": summed[0] / len(batch),
                "train/accuracy": summed[1] / max(summed[3], 1.0),
                "train/margin": summed[2] / max(summed[3], 1.0),
                "train/pairs": summed[3],
                "train/grad_norm": float(grad_norm),
                "train/lr": scheduler.get_last_lr()[0],
                "train/epoch": step / steps_per_epoch,
            }
            if val and config.eval_every and step % config.eval_every == 0 and step < total:
                if accelerator.is_main_process:  # one rank evaluates (plain model, no collective)
                    val_metrics, _ = evaluate(rm, val, config)
                    row.update(val_metrics)
                    log.info(
                        "step %d: val accuracy %.3f margin %.3f",
                        step,
                        val_metrics["val/accuracy"],
                        val_metrics["val/margin"],
                    )
                accelerator.wait_for_everyone()
            metrics_log.log(step, row)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{row['train/loss']:.3f}", acc=f"{row['train/accuracy']:.2f}")
            if config.ckpt_every and step % config.ckpt_every == 0 and step < total:
                save(step)
        if bar is not None:
            bar.close()
        rm.merge_lora()  # plain weights from here on (adapters and head folded in)
        if not accelerator.is_main_process:  # one writer: evaluation, normalisation, the final model
            accelerator.wait_for_everyone()
            return {"model": str(out / "model"), "steps": step}
        table: list[dict] = []
        if val:
            val_metrics, table = evaluate(rm, val, config)
            metrics_log.log(step, val_metrics)
            log.info(
                "held-out: accuracy %.3f over %d pairs, mean margin %.3f, ECE %.3f",
                val_metrics["val/accuracy"],
                int(val_metrics["val/pairs"]),
                val_metrics["val/margin"],
                val_metrics["val/ece"],
            )
            for r in table:
                log.info(
                    "  confidence %s: %4d pairs, predicted %.3f, observed %.3f",
                    r["bin"],
                    r["count"],
                    r["predicted"],
                    r["observed"],
                )
        else:
            log.info("no held-out comparisons (val_fraction=0 and no val_file): accuracy not measured")
        (out / "calibration.json").write_text(json.dumps(table, indent=2) + "\n", encoding="utf-8")
        norm = fit_normalisation(rm, config, train, max_length)
        model_dir = rm.save(out / "model", extra={**norm, "val_accuracy": val_metrics.get("val/accuracy")})
    finally:
        metrics_log.close()
    log.info("reward model saved to %s", model_dir)
    accelerator.wait_for_everyone()
    return {
        "model": str(model_dir),
        "val_accuracy": val_metrics.get("val/accuracy"),
        "val_margin": val_metrics.get("val/margin"),
        "val_ece": val_metrics.get("val/ece"),
        "steps": step,
        "train_rankings": len(train),
        "val_rankings": len(val),
        "calibration": str(out / "calibration.json"),
    }


def main(argv: list[str]) -> int:
    config = parse_stage_args(
        RewardConfig, argv, "rlhf reward", "Train a Bradley-Terry reward model on ranked comparisons."
    )
    if config is None:
        return 0
    from rlhf.distributed import relaunch

    code = relaunch(config, "reward", argv)
    if code is not None:
        return code
    summary = run(config)
    if "val_accuracy" in summary:  # the main process reports; other ranks return a path only
        print(json.dumps(summary, indent=2))  # noqa: T201
    return 0
