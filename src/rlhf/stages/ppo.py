"""Stage 4: PPO against the reward model, with a per-token KL penalty to the frozen SFT reference.

    rlhf ppo --config configs/tiny_ppo.yaml [key=value ...]

One iteration, as numbered steps (Ziegler et al. 2019, https://arxiv.org/abs/1909.08593; Stiennon et al. 2020;
Ouyang et al. 2022, https://arxiv.org/abs/2203.02155):
  1. sample `samples_per_prompt` responses per prompt (default 1) with the fast sampler (log-probs at the
     sampling temperature come with it);
  2. reference log-probs (frozen SFT copy) and values (value model) over the response columns;
  3. score with the reward model (or a callable in tests), apply the missing-EOS rule, scale, clip;
  4. rewards: -beta * KL on every response token + the score on the last real one (or, with kl.penalty=loss,
     the score only and beta * exact KL in the loss of step 5); GAE (or, with advantage=rloo, each response's
     return minus the mean return of the other responses to its prompt, and no value model); whitened advantages;
  5. `epochs` passes over shuffled minibatches (gradient accumulation inside each): clipped surrogate + clipped
     value loss (+ PPO-ptx), gradient clipping, one optimizer step per minibatch, LR schedule;
  6. update beta (fixed or adaptive KL control), log metrics and a few samples, checkpoint.

The sampler's log-probs ARE the old-policy log-probs: with dropout off and the same temperature, a sampled token's
log_softmax(logits / T) equals that of a full forward pass (fp32 difference ~1e-6, tested), so no extra forward
pass is spent on them (`recompute_logprobs=true` spends it). With bf16 they carry bf16 rounding, but so would a
recomputation: on the benchmark set-up sampler vs bf16 training pass differ by 0.003 nats on average (max 0.014;
ratio std 0.004, 50x inside the 0.2 clip), the same size as the training pass's own bf16-vs-fp32 error (0.002).

On CPU, models that do not depend on each other run side by side, one core each (rollout.concurrently): while the
policy samples, the reference, value and reward trunks run the prompt columns (a KV prefix); then the reference
beside the value + reward models; in step 5 the policy's optimizer steps beside the value model's. Each model's
arithmetic is unchanged, so the results do not depend on it (tested bit-equal against 1 thread).

This module holds the config, the loop over iterations (step 6, checkpoints, resume) and the command; steps 1-5 and
the models are in `rlhf.stages.ppo_iteration`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rlhf import distributed as dist
from rlhf.checkpoint import latest_checkpoint, load_state, save_checkpoint, save_hf
from rlhf.config import ModelConfig, option
from rlhf.distributed import TrainingStageConfig
from rlhf.errors import UserError
from rlhf.kl_control import make_kl_controller
from rlhf.lora import merge_and_save
from rlhf.rollout import PtxBatches, Rollout, SharedValueHead, ValueModel, keep_freed_memory
from rlhf.stages.ppo_iteration import (
    ScoreFn,
    _check_finite,
    _value_params,
    collect_rollout,
    iteration_metrics,
    load_models,
    ppo_update,
)
from rlhf.tracking import log, progress, truncate_metrics

STAGE = "ppo"


@dataclass
class KLConfig:
    """The KL penalty beta * KL(pi || pi_ref) and how it is controlled."""

    mode: str = option("adaptive", "fixed beta, or adaptive towards `target`", choices=("fixed", "adaptive"))
    coef: float = option(0.05, "initial beta", low=0.0)
    target: float = option(6.0, "adaptive: target KL per response (nats)", low=1e-6)
    horizon: int = option(10_000, "adaptive: samples over which beta may move by 20%", low=1)
    penalty: str = option(
        "reward",
        "where the penalty acts: `reward` puts the sampled per-token k1 into the rewards (InstructGPT); `loss` "
        "adds beta x the exact KL over the vocabulary at every response position to the policy loss (no sampling "
        "noise; the rollout keeps the reference's B x T x vocab log-probs)",
        choices=("reward", "loss"),
    )
    stop_above: float = option(
        0.0, "stop the run when the mean KL per response exceeds this; 0 = never", low=0.0
    )


@dataclass
class PPOConfig(TrainingStageConfig):
    """PPO of the SFT policy against a reward model (see `rlhf ppo --help`). `lora.*` trains adapters on the
    policy (the reference is then its base with adapters off); `num_processes` splits each iteration's prompts
    over data-parallel ranks (docs/scaling.md)."""

    model: ModelConfig = option(
        ModelConfig(), "the policy to start from (model.path); also the reference by default"
    )
    reference: str = option(
        "",
        "frozen KL reference folder; empty = model.path (set it to the SFT model when a later loop round "
        "starts PPO from the previous round's policy)",
    )
    reward_model: str = option("", "trained reward model folder (rlhf reward's model/)")
    value_model: str = option("", "folder to start the value model from; empty = the reward model")
    value_head: str = option(
        "separate", "separate value model, or a head on the policy trunk", choices=("separate", "shared")
    )
    advantage: str = option(
        "gae",
        "gae: a value model and GAE (InstructGPT); rloo: `samples_per_prompt` responses per prompt, each one's "
        "advantage its return minus the mean return of the others (REINFORCE leave-one-out baseline, Ahmadian et "
        "al. 2024) under the same clipped updates; no value model is loaded, run or trained",
        choices=("gae", "rloo"),
    )
    samples_per_prompt: int = option(
        1,
        "responses sampled per prompt in an iteration (batch_size counts responses); rloo needs >= 2",
        low=1,
    )
    prompts: str = option("", "prompt file: JSONL {prompt}, demonstration formats, or plain lines")
    max_prompt_tokens: int = option(128, "prompts longer than this (in tokens) are skipped", low=4)
    iterations: int = option(20, "PPO iterations (one rollout batch each)", low=1)
    batch_size: int = option(
        16, "responses per iteration (prompts x samples_per_prompt), split over the processes", low=1
    )
    max_new_tokens: int = option(48, "response length limit", low=1)
    temperature: float = option(0.7, "sampling temperature, used in every log-prob pass", low=1e-3)
    epochs: int = option(1, "PPO epochs over each rollout batch", low=1)
    minibatches: int = option(4, "minibatches per epoch (one optimizer step each)", low=1)
    grad_accum: int = option(1, "micro-batches per minibatch (gradient accumulation)", low=1)
    lr: float = option(1e-5, "policy learning rate", low=0.0)
    value_lr: float = option(1e-5, "value model learning rate", low=0.0)
    lr_schedule: str = option("constant", "LR schedule", choices=("constant", "linear", "cosine"))
    warmup_steps: int = option(0, "optimizer steps of linear warm-up", low=0)
    weight_decay: float = option(0.0, "AdamW weight decay", low=0.0)
    adam_eps: float = option(
        1e-8,
        "Adam's epsilon: above the gradients' RMS it damps the steps of parameters whose gradients are tiny and "
        "noisy (the LM-head rows of rarely sampled tokens) instead of scaling them to full size",
        low=0.0,
    )
    freeze_embeddings: bool = option(
        False,
        "keep the policy's token and position embeddings (and a tied LM head) fixed: the softmax gives every "
        "vocabulary row a small noisy gradient that Adam would turn into lr-sized moves",
    )
    max_grad_norm: float = option(1.0, "gradient clipping norm; 0 = off", low=0.0)
    clip: float = option(0.2, "policy ratio clip epsilon", low=0.0)
    value_clip: float = option(0.2, "value clip around the rollout values", low=0.0)
    vf_coef: float = option(0.1, "value loss coefficient", low=0.0)
    gamma: float = option(1.0, "GAE discount", low=0.0, high=1.0)
    lam: float = option(0.95, "GAE lambda", low=0.0, high=1.0)
    whiten_advantages: bool = option(True, "whiten advantages over real tokens")
    whiten_rewards: bool = option(False, "whiten per-token rewards (keeping their mean)")
    reward_scale: float = option(1.0, "multiply scores by this", low=0.0)
    reward_clip: float = option(0.0, "clip scores to [-x, x]; 0 = off", low=0.0)
    missing_eos: str = option(
        "penalty",
        "responses without EOS: subtract a penalty, replace the score, or nothing",
        choices=("penalty", "replace", "none"),
    )
    missing_eos_value: float = option(1.0, "the penalty (or the replacement score)")
    kl: KLConfig = option(KLConfig(), "KL control")
    ptx_coef: float = option(0.0, "PPO-ptx: weight of the pre-training LM loss; 0 = off", low=0.0)
    ptx_corpus: str = option("data/corpus/children_stories_5books.txt", "PPO-ptx corpus (plain text)")
    ptx_batch: int = option(4, "PPO-ptx sequences per minibatch", low=1)
    ptx_seq_len: int = option(64, "PPO-ptx sequence length", low=8)
    bf16: bool = option(
        False, "bf16 autocast for sampling, scoring and training (CPU with AVX512-BF16, CUDA)"
    )
    attention: str = option(
        "auto",
        "attention kernel of the policy, reference, value and reward models in scoring and training; auto = "
        "eager on CPU (SDPA's CPU kernel is slower at these sizes, its bf16 backward several times), sdpa elsewhere",
        choices=("auto", "eager", "sdpa"),
    )
    recompute_logprobs: bool = option(
        False, "recompute old log-probs with a forward pass instead of the sampler's"
    )
    gold: str = option("", "also log the gold score of a labeller rubric (e.g. sentiment); empty = off")
    log_every: int = option(1, "iterations between printed samples", low=1)
    log_samples: int = option(2, "samples printed every log step", low=0)
    save_every: int = option(10, "iterations between checkpoints", low=1)
    keep_checkpoints: int = option(2, "checkpoints kept", low=1)
    snapshot_every: int = option(0, "iterations between kept policy snapshots (snapshots/); 0 = off", low=0)

    def validate(self) -> None:
        super().validate()
        if self.batch_size % self.minibatches:
            raise UserError(
                f"config field 'batch_size' ({self.batch_size}) must be a multiple of 'minibatches'"
            )
        if self.batch_size % self.samples_per_prompt:
            raise UserError(
                f"config field 'batch_size' ({self.batch_size}) must be a multiple of 'samples_per_prompt'"
            )
        if self.advantage == "rloo" and self.samples_per_prompt < 2:
            raise UserError(
                "config field 'samples_per_prompt': advantage=rloo compares the responses to one prompt, "
                "give it 2 or more"
            )
        per_mb = self.batch_size // self.minibatches
        if per_mb % self.grad_accum:
            raise UserError(
                f"config field 'grad_accum': {per_mb} responses per minibatch do not split into it"
            )


def _adamw(params: Any, lr: float, config: PPOConfig) -> torch.optim.AdamW:
    """AdamW with the fused kernel (CPU and CUDA): one pass over all parameters instead of a dozen ops each."""
    return torch.optim.AdamW(params, lr=lr, weight_decay=config.weight_decay, eps=config.adam_eps, fused=True)


def _schedule(config: PPOConfig, total_steps: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / (config.warmup_steps + 1)
        progress_ = (step - config.warmup_steps) / max(1, total_steps - config.warmup_steps)
        if config.lr_schedule == "linear":
            return max(0.0, 1.0 - progress_)
        if config.lr_schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress_)))
        return 1.0

    return factor


def run(config: PPOConfig, score_fn: ScoreFn | None = None) -> dict:
    """Train; returns {"model": final policy folder, "value": ..., "final": last metrics, "stopped": reason}.

    `score_fn(prompts, generation) -> (B,)` replaces the reward model (tests, programmatic rewards)."""
    from rlhf.data.template import encode_prompt
    from rlhf.modeling import local_path

    local_path(config.model.path or "(model.path not set)", "SFT policy (model.path)")
    if config.reference:
        local_path(config.reference, "KL reference model (reference)")
    if score_fn is None:
        local_path(config.reward_model or "(reward_model not set)", "reward model (reward_model)")
    prompts = read_prompts(config.prompts)  # bad input fails before the run folder is touched
    accelerator = dist.build_accelerator(config)
    world, rank = accelerator.num_processes, accelerator.process_index
    if config.batch_size % (world * config.minibatches * config.grad_accum):
        raise UserError(
            f"config field 'batch_size': {config.batch_size} responses do not split into {world} processes x "
            f"{config.minibatches} minibatches x {config.grad_accum} micro-batches"
        )
    group = config.samples_per_prompt
    prompts_per_iteration = config.batch_size // group
    if prompts_per_iteration % world:
        raise UserError(
            f"config field 'batch_size': {prompts_per_iteration} prompts per iteration do not split into "
            f"{world} processes"
        )
    out = dist.start_run_on_main(accelerator, config, STAGE)
    checkpoint = latest_checkpoint(out) if config.resume else None
    if config.resume and checkpoint is None:
        log.info("resume: no checkpoint in %s, starting fresh", out / "checkpoints")
    if str(config.device).startswith("cpu"):
        keep_freed_memory()  # no page faults for every fresh (B, T, V) buffer (rollout.keep_freed_memory)
    models = load_models(config, checkpoint, with_reward=score_fn is None)
    tok = models.tokenizer
    encoded = [(p, encode_prompt(tok, p)) for p in prompts]
    kept = [(p, ids) for p, ids in encoded if len(ids) <= config.max_prompt_tokens]
    if len(kept) < len(encoded):
        log.info(
            "skipped %d prompts longer than %d tokens", len(encoded) - len(kept), config.max_prompt_tokens
        )
    if not kept:
        raise UserError(f"{config.prompts}: no prompt fits max_prompt_tokens={config.max_prompt_tokens}")
    gold_fn = _gold(config.gold)
    generator = torch.Generator().manual_seed(config.seed + 1_000_003 * rank)  # each rank samples its own
    ptx = None
    if config.ptx_coef > 0:
        ptx = PtxBatches(config.ptx_corpus, tok, config.ptx_batch, config.ptx_seq_len, generator)

    optimizers = [_adamw([p for p in models.policy.parameters() if p.requires_grad], config.lr, config)]
    if models.value is not None:
        optimizers.append(_adamw(_value_params(models), config.value_lr, config))
    total_steps = config.iterations * config.epochs * config.minibatches
    schedulers = [torch.optim.lr_scheduler.LambdaLR(o, _schedule(config, total_steps)) for o in optimizers]
    kl_ctl = make_kl_controller(config.kl.mode, config.kl.coef, config.kl.target, config.kl.horizon)
    start_iter = 0
    if checkpoint is not None:
        state = load_state(checkpoint)
        for obj, key in (*zip(optimizers, ("policy_opt", "value_opt")), (kl_ctl, "kl")):
            obj.load_state_dict(state[key])
        for sched, key in zip(schedulers, ("policy_sched", "value_sched")):
            sched.load_state_dict(state[key])
        if isinstance(models.value, SharedValueHead):
            models.value.load_state_dict(state["value_head"])
        states = state.get("generators", [state["generator"]])  # one per rank when saved by several
        if len(states) == world or rank == 0:
            generator.set_state(states[rank] if len(states) == world else state["generator"])
        start_iter = state["step"]
        if accelerator.is_main_process:
            truncate_metrics(out / "metrics.jsonl", start_iter)
        log.info("resumed from %s (iteration %d)", checkpoint, start_iter)

    def state_dict(step: int) -> dict:
        state = {
            **{key: opt.state_dict() for key, opt in zip(("policy_opt", "value_opt"), optimizers)},
            **{key: sched.state_dict() for key, sched in zip(("policy_sched", "value_sched"), schedulers)},
            "kl": kl_ctl.state_dict(),
            "generator": generator.get_state(),
            "data_position": step * prompts_per_iteration,  # prompts read so far
        }
        if isinstance(models.value, SharedValueHead):
            state["value_head"] = models.value.state_dict()
        if world > 1:  # a collective: every rank builds the state, the main process saves it
            state["generators"] = dist.gather_generator_states(accelerator, generator)
        return state

    def sync_grads() -> None:
        dist.all_reduce_gradients(accelerator, [*models.policy.parameters(), *_value_params(models)])

    def parts() -> dict:
        out_parts = {"policy": (models.peft or models.policy, tok)}  # LoRA: the adapters only
        if isinstance(models.value, ValueModel):
            out_parts["value"] = (models.value.model, tok)
        return out_parts

    metrics_log = dist.metrics_logger(accelerator, out)
    bar = progress(config.iterations, "ppo", initial=start_iter, unit="it")
    metrics: dict = {}
    stopped = None
    try:
        for it in range(start_iter, config.iterations):
            first = it * prompts_per_iteration
            batch = [
                kept[_prompt_index(first + j, len(kept), config.seed)] for j in range(prompts_per_iteration)
            ]
            if world > 1:  # this rank's share of the iteration's prompts
                batch = dist.rank_slice(batch, accelerator)
            batch = [item for item in batch for _ in range(group)]  # each prompt's responses side by side
            batch_prompts, batch_ids = [p for p, _ in batch], [ids for _, ids in batch]
            rollout, gen, timing = collect_rollout(
                models, batch_prompts, batch_ids, config, kl_ctl.value, generator, score_fn
            )
            try:
                _check_finite(rollout)
                t0 = time.perf_counter()
                recompute = (
                    (models.policy, getattr(models.value, "model", None))
                    if config.gradient_checkpointing
                    else ()
                )
                with dist.checkpointing_in_eval_mode(*(m for m in recompute if m is not None)):
                    update = ppo_update(
                        models,
                        rollout,
                        config,
                        optimizers,
                        schedulers,
                        generator,
                        ptx,
                        sync_grads if world > 1 else None,
                    )
                timing["training"] = time.perf_counter() - t0
            except FloatingPointError as exc:
                last = latest_checkpoint(out)
                raise UserError(
                    f"non-finite {exc} at iteration {it + 1}: stopping; the last good checkpoint is "
                    f"{last if last else '(none yet)'}, resume from it with a lower lr or a larger kl.coef"
                ) from None
            metrics = iteration_metrics(rollout, update, kl_ctl.value, timing)
            if gold_fn is not None:
                metrics["objective/gold_score"] = sum(map(gold_fn, batch_prompts, gen.texts)) / len(gen.texts)
            if world > 1:  # equal shares: the mean over ranks is the mean over the whole batch (same on all)
                metrics = dist.mean_across(accelerator, metrics)
            kl_ctl.update(metrics["objective/kl"], config.batch_size)
            metrics["lr"] = schedulers[0].get_last_lr()[0]
            metrics_log.log(it + 1, metrics)
            _progress(bar, metrics)
            if config.log_samples and (it + 1) % config.log_every == 0:
                _log_samples(it + 1, batch_prompts, gen.texts, rollout, config.log_samples)
            if (
                config.snapshot_every
                and (it + 1) % config.snapshot_every == 0
                and accelerator.is_main_process
            ):
                _snapshot(out, it + 1, models.peft or models.policy, tok, metrics)
            if (it + 1) % config.save_every == 0 or it + 1 == config.iterations:
                state = state_dict(it + 1)
                if accelerator.is_main_process:
                    save_checkpoint(out, it + 1, parts(), state, keep=config.keep_checkpoints)
                accelerator.wait_for_everyone()
            if config.kl.stop_above and metrics["objective/kl"] > config.kl.stop_above:
                stopped = f"KL {metrics['objective/kl']:.2f} > kl.stop_above={config.kl.stop_above} at iteration {it + 1}"
                log.warning("stopping early: %s", stopped)
                break
    finally:
        bar.close()
        metrics_log.close()
    model_dir = out / "model"
    value_dir = out / "value"
    dist.check_in_sync(accelerator, [*models.policy.parameters(), *_value_params(models)], "policy/value")
    if not accelerator.is_main_process:  # one writer
        accelerator.wait_for_everyone()
        return {"model": str(model_dir), "value": str(value_dir), "rank": rank}
    merge_and_save(models.peft or models.policy, tok, model_dir)  # LoRA: adapters folded in, plain HF weights
    if isinstance(models.value, ValueModel):
        save_hf(models.value.model, tok, value_dir)
    elif isinstance(models.value, SharedValueHead):
        value_dir.mkdir(parents=True, exist_ok=True)
        torch.save(models.value.state_dict(), value_dir / "value_head.pt")
    log.info("policy saved to %s", model_dir)
    accelerator.wait_for_everyone()
    return {"model": str(model_dir), "value": str(value_dir), "final": metrics, "stopped": stopped}


def _prompt_index(position: int, n: int, seed: int) -> int:
    """The prompt at `position` of the stream: each pass over the file is a fresh seeded shuffle, so the data
    position alone (iteration x batch size) says where a resumed run continues."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + position // n)
    return int(torch.randperm(n, generator=generator)[position % n])


def read_prompts(path: str) -> list[str]:
    """Prompt texts from any file `rlhf sample` reads (rlhf.data.demonstrations.read_prompts)."""
    from rlhf.data.demonstrations import read_prompts as read_prompt_file

    if not path:
        raise UserError(
            "config field 'prompts': give a prompt file (JSONL with a 'prompt' field, or plain lines)"
        )
    prompts = [text for _, text in read_prompt_file(path)]
    if not prompts:
        raise UserError(f"{path}: no prompts")
    return prompts


def _gold(name: str) -> Callable[[str, str], float] | None:
    if not name:
        return None
    if name != "sentiment":
        raise UserError(f"config field 'gold': unknown rubric '{name}' (sentiment)")
    from rlhf.labellers import gold_score

    return gold_score


def _progress(bar: Any, m: dict) -> None:
    total = max(m["time/iteration"], 1e-9)
    bar.set_postfix_str(
        f"score={m['objective/score']:.3f} kl={m['objective/kl']:.2f} "
        f"gen/score/train={100 * m['time/generation'] / total:.0f}/{100 * m['time/scoring'] / total:.0f}/"
        f"{100 * m['time/training'] / total:.0f}% {m['perf/rollout_tok_s']:.0f}tok/s",
        refresh=False,
    )
    bar.update(1)


def _log_samples(step: int, prompts: list[str], texts: list[str], rollout: Rollout, n: int) -> None:
    kl = rollout.kl.sum(1)
    for i in range(min(n, len(texts))):
        log.info(
            "iter %d sample %d | score %.3f kl %.2f | %s -> %s",
            step,
            i,
            rollout.raw_scores[i].item(),
            kl[i].item(),
            prompts[i][:60].replace("\n", " "),
            texts[i][:100].replace("\n", " "),
        )


def _snapshot(out: Path, step: int, policy: Any, tok: Any, metrics: dict) -> None:
    import json

    folder = out / "snapshots" / f"iter-{step:06d}"
    merge_and_save(policy, tok, folder, keep_adapters=True)  # LoRA: a merged copy; training goes on
    keys = ("objective/score", "objective/kl", "objective/kl_k3", "objective/gold_score")
    record = {"step": step, "path": str(folder), **{k: metrics[k] for k in keys if k in metrics}}
    with open(out / "snapshots" / "index.jsonl", "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")


def main(argv: list[str]) -> int:
    from rlhf.stagecli import parse_stage_args

    config = parse_stage_args(PPOConfig, argv, "rlhf ppo", __doc__.split("\n\n")[0])
    if config is None:
        return 0
    code = dist.relaunch(config, STAGE, argv)
    if code is not None:
        return code
    summary = run(config)
    if "final" not in summary:  # a non-main rank
        return 0
    print(f"ppo: policy in {summary['model']}; final {_short(summary['final'])}")  # noqa: T201
    return 0


def _short(metrics: dict) -> str:
    keys = ("objective/score", "objective/kl", "objective/gold_score", "response/eos_rate")
    return ", ".join(f"{k.split('/')[1]}={metrics[k]:.3f}" for k in keys if k in metrics)
