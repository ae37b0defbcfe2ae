"""Stage 4: PPO against the reward model, with a per-token KL penalty to the frozen SFT reference.

    rlhf ppo --config configs/tiny_ppo.yaml [key=value ...]

One iteration, as numbered steps (Ziegler et al. 2019, https://arxiv.org/abs/1909.08593; Stiennon et al. 2020;
Ouyang et al. 2022, https://arxiv.org/abs/2203.02155):
  1. sample one response per prompt with the fast sampler (log-probs at the sampling temperature come with it);
  2. reference log-probs (frozen SFT copy) and values (value model) over the response columns;
  3. score with the reward model (or a callable in tests), apply the missing-EOS rule, scale, clip;
  4. rewards: -beta * KL on every response token + the score on the last real one; GAE; whitened advantages;
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
"""

from __future__ import annotations

import contextlib
import copy
import functools
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
from rlhf.lora import merge_and_save, reference_logprobs_with_adapters_disabled
from rlhf.losses import (
    entropy_from_logprobs,
    explained_variance,
    kl_exact,
    kl_k3,
    masked_mean,
    masked_sum,
    policy_loss,
    value_loss,
)
from rlhf.modeling import autocast, load_policy
from rlhf.rollout import (
    PtxBatches,
    Rollout,
    SharedValueHead,
    ValueModel,
    concurrently,
    fast_gelu,
    finish_rollout,
    keep_freed_memory,
    prefix_cache,
    prompt_columns,
    response_logprobs,
    reward_scores,
    shape_scores,
)
from rlhf.tracking import log, progress, truncate_metrics

STAGE = "ppo"
ScoreFn = Callable[[list[str], Any], torch.Tensor]  # (prompts, Generation) -> (B,) scores


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
    prompts: str = option("", "prompt file: JSONL {prompt}, demonstration formats, or plain lines")
    max_prompt_tokens: int = option(128, "prompts longer than this (in tokens) are skipped", low=4)
    iterations: int = option(20, "PPO iterations (one rollout batch each)", low=1)
    batch_size: int = option(16, "prompts (= responses) per iteration, split over the processes", low=1)
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
        per_mb = self.batch_size // self.minibatches
        if per_mb % self.grad_accum:
            raise UserError(
                f"config field 'grad_accum': {per_mb} responses per minibatch do not split into it"
            )


# ---------------------------------------------------------------------------------------------------------------
# Models


@dataclass
class Models:
    policy: Any
    ref: Any
    value: Any  # ValueModel, or SharedValueHead on the policy trunk
    reward: Any  # RewardModel, or None when a score function is given
    tokenizer: Any
    peft: Any = None  # under LoRA: the PeftModel around `policy` (adapters, the reference, saving)


def _frozen(model: Any) -> Any:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def load_models(config: PPOConfig, checkpoint: Path | None, with_reward: bool) -> Models:
    """Policy (from SFT or the checkpoint), frozen reference, frozen RM, value model (from RM or checkpoint)."""
    from rlhf.reward_model import RewardModel, reward_model_from_causal_lm

    if not config.model.path:
        raise UserError("config field 'model.path': PPO starts from a trained SFT model folder")
    from rlhf.lora import apply_lora, load_adapter_checkpoint

    tok_src = config.model.tokenizer or config.model.path
    lora = config.lora.enabled
    ref = None  # LoRA on model.path: the reference is the policy's base with adapters off, not a second copy
    if not (lora and config.reference in ("", config.model.path)):
        ref, _ = load_policy(config.reference or config.model.path, tok_src)
    policy_src = str(checkpoint / "policy") if checkpoint and not lora else config.model.path
    policy, tokenizer = load_policy(policy_src, tok_src)
    peft = None
    if lora:
        peft = apply_lora(policy, config.lora)
        if checkpoint:
            load_adapter_checkpoint(peft, checkpoint / "policy")
        policy = peft.get_base_model()  # the HF model with LoRA layers inside: what sampling and losses call
    policy.eval()  # dropout off everywhere: eval mode stays on while training
    for model in (ref, policy):
        if model is not None:
            fast_gelu(model)
    reward = None
    if with_reward:
        if not config.reward_model:
            raise UserError("config field 'reward_model': give the trained reward model folder")
        reward = RewardModel.load(config.reward_model)
        reward.model = fast_gelu(_frozen(reward.model))
    if config.value_head == "shared":
        width = policy.get_output_embeddings().weight.shape[1]
        head = reward.model.score if reward is not None else None
        value = SharedValueHead(width, head)
    else:
        if checkpoint:
            value_model = RewardModel.load(checkpoint / "value").model
        elif reward is not None and not config.value_model:
            value_model = copy.deepcopy(reward.model)
        else:  # from an LM (or RM) folder; a fresh head starts at V = 0 rather than at random values
            source = config.value_model or config.model.path
            value_model = reward_model_from_causal_lm(source).model
            if not (Path(source) / "rlhf_reward.json").exists():
                torch.nn.init.zeros_(value_model.score.weight)
        for p in value_model.parameters():
            p.requires_grad_(True)
        value = ValueModel(fast_gelu(value_model.eval()))
    kind = config.attention
    if kind == "auto":
        kind = "eager" if str(config.device).startswith("cpu") else "sdpa"
    for model in (policy, ref, getattr(value, "model", None), reward.model if reward is not None else None):
        if model is not None:
            model.set_attn_implementation(kind)
    if config.gradient_checkpointing:  # active only inside the PPO update (dist.checkpointing_in_eval_mode)
        for model in (policy, getattr(value, "model", None)):
            if model is not None:
                dist.enable_gradient_checkpointing(model)
    return Models(policy, _frozen(ref) if ref is not None else None, value, reward, tokenizer, peft)


@contextlib.contextmanager
def _reference(models: Models) -> Any:
    """The frozen KL reference: its own copy, or under LoRA the policy with its adapters switched off."""
    if models.peft is None:
        yield models.ref
    else:
        with reference_logprobs_with_adapters_disabled(models.peft):
            yield models.policy


def _prefix_trunks(models: Models, config: PPOConfig, score_fn: ScoreFn | None) -> dict[str, Any]:
    """The trunks whose prompt columns can run while the policy samples: not the policy itself (nor, under LoRA,
    the reference, which is the policy with adapters off)."""
    trunks = {}
    if models.peft is None:
        trunks["ref"] = models.ref.base_model
    if config.value_head == "separate":
        trunks["value"] = models.value.model.base_model
    if score_fn is None and models.reward is not None:
        trunks["reward"] = models.reward.trunk_and_head()[0]
    return trunks


def _value_params(models: Models) -> list[torch.nn.Parameter]:
    return list(models.value.parameters())


def _adamw(params: Any, lr: float, config: PPOConfig) -> torch.optim.AdamW:
    """AdamW with the fused kernel (CPU and CUDA): one pass over all parameters instead of a dozen ops each."""
    return torch.optim.AdamW(params, lr=lr, weight_decay=config.weight_decay, fused=True)


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


# ---------------------------------------------------------------------------------------------------------------
# Steps 1-4: rollout


@torch.no_grad()
def collect_rollout(
    models: Models,
    prompts: list[str],
    prompt_ids: list[list[int]],
    config: PPOConfig,
    kl_coef: float,
    generator: torch.Generator,
    score_fn: ScoreFn | None = None,
) -> tuple[Rollout, Any, dict[str, float]]:
    """Sample, score and lay out rewards/advantages for one batch; returns (rollout, generation, timings)."""
    from rlhf.sampling import generate, join_prompt_response

    tok = models.tokenizer
    t0 = time.perf_counter()
    # a GPU's kernels are asynchronous already: no side-by-side there
    cpu = str(config.device).startswith("cpu")
    trunks = _prefix_trunks(models, config, score_fn) if cpu else {}

    def sample() -> Any:
        return generate(
            models.policy,
            tok,
            prompt_ids,
            max_new_tokens=config.max_new_tokens,
            temperature=config.temperature,
            generator=generator,
            bf16=config.bf16,
            # the fast GPT-2 decoder reads plain weights; LoRA layers need the HF loop
            fast=models.peft is None,
        )

    def prefixes() -> dict[str, Any]:  # the frozen/value trunks over the prompts, while the policy samples
        prompt = prompt_columns(prompt_ids, tok.pad_token_id)
        with autocast(config.bf16, config.device):
            return {name: prefix_cache(trunk, *prompt) for name, trunk in trunks.items()}

    gen, past = concurrently(sample, prefixes, enabled=cpu)
    t1 = time.perf_counter()
    input_ids, attention_mask, start = join_prompt_response(
        prompt_ids, gen.response_ids, gen.response_mask, tok.pad_token_id
    )
    rollout = Rollout(
        input_ids=input_ids,
        attention_mask=attention_mask,
        response_start=start,
        response_ids=gen.response_ids.clone(),
        response_mask=gen.response_mask.clone(),
        logprobs=gen.logprobs.clone(),
        finished=gen.finished.clone(),
    )
    mask = rollout.response_mask

    kl_in_loss = config.kl.penalty == "loss"

    def reference() -> tuple[torch.Tensor, torch.Tensor | None]:
        with autocast(config.bf16, config.device), _reference(models) as ref:
            logp, log_softmax, _ = response_logprobs(
                ref,
                input_ids,
                attention_mask,
                start,
                config.temperature,
                with_log_softmax=kl_in_loss,
                past=past.get("ref"),
            )
            return logp, log_softmax

    def value_and_reward() -> tuple[torch.Tensor, torch.Tensor | None]:
        with autocast(config.bf16, config.device):
            if config.recompute_logprobs or config.value_head == "shared":
                logp, _, hidden = response_logprobs(
                    models.policy, input_ids, attention_mask, start, config.temperature
                )
                if config.recompute_logprobs:
                    rollout.logprobs = logp * mask
            if config.value_head == "shared":
                values = models.value(hidden)
            else:
                values = models.value(input_ids, attention_mask, start, past.get("value"))
            if score_fn is not None:
                return values, None
            if "reward" in past:
                return values, reward_scores(models.reward, input_ids, attention_mask, start, past["reward"])
            return values, models.reward.score(input_ids, attention_mask)

    # the reference and the value + reward models side by side, one core each (rollout.concurrently); not when both
    # would run the one LoRA policy (its reference is the policy with adapters off)
    apart = models.peft is not None and (config.recompute_logprobs or config.value_head == "shared")
    (ref_logp, rollout.ref_log_softmax), (values, raw) = concurrently(
        reference, value_and_reward, enabled=cpu and not apart
    )
    if score_fn is not None:
        raw = torch.as_tensor(score_fn(prompts, gen), dtype=torch.float32)
    rollout.ref_logprobs = ref_logp.float() * mask
    rollout.values = values.float() * mask
    rollout.raw_scores = raw.float()
    rollout.scores = shape_scores(
        rollout.raw_scores,
        rollout.finished,
        missing_eos=config.missing_eos,
        missing_eos_value=config.missing_eos_value,
        scale=config.reward_scale,
        clip=config.reward_clip,
    )
    finish_rollout(
        rollout,
        kl_coef,
        gamma=config.gamma,
        lam=config.lam,
        whiten_rewards=config.whiten_rewards,
        whiten_advantages=config.whiten_advantages,
        kl_in_loss=kl_in_loss,
    )
    t2 = time.perf_counter()
    return rollout, gen, {"generation": t1 - t0, "scoring": t2 - t1}


# ---------------------------------------------------------------------------------------------------------------
# Step 5: PPO updates


def accumulate_gradients(
    models: Models,
    mb: Rollout,
    config: PPOConfig,
    normalizer: float,
    ptx: PtxBatches | None = None,
    part: str = "both",
) -> dict[str, torch.Tensor]:
    """Forward + backward of one micro-batch; token losses are summed and divided by `normalizer` (the real tokens
    of the whole minibatch), so micro-batches accumulate to exactly the full minibatch's gradient. `part` "policy"
    or "value" does one model's half only (a separate value model shares nothing with the policy, so the two halves
    can run at the same time; the shared value head needs "both")."""
    mask = mb.response_mask
    policy_part, value_part = part != "value", part != "policy"
    with autocast(config.bf16, config.device):
        if policy_part or config.value_head == "shared":
            logp, log_softmax, hidden = response_logprobs(
                models.policy,
                mb.input_ids,
                mb.attention_mask,
                mb.response_start,
                config.temperature,
                with_log_softmax=True,
            )
        if value_part and config.value_head == "shared":
            values = models.value(hidden)
        elif value_part:
            values = models.value(mb.input_ids, mb.attention_mask, mb.response_start)
    loss, stats = torch.zeros(()), {}
    if policy_part:
        pg_loss, pg_stats = policy_loss(logp, mb.logprobs, mb.advantages, mask, config.clip, normalizer)
        loss = pg_loss
        stats.update(pg_loss=pg_loss.detach(), **pg_stats)
        if mb.ref_log_softmax is not None:  # kl.penalty=loss: beta x exact KL, scaled like the advantages
            kl_loss = masked_sum(kl_exact(log_softmax, mb.ref_log_softmax), mask) / normalizer
            loss = loss + mb.loss_kl_coef * kl_loss
            stats["kl_exact"] = kl_loss.detach() * normalizer / mask.sum().clamp(min=1)
    if value_part:
        vf_loss, vf_stats = value_loss(values, mb.values, mb.returns, mask, config.value_clip, normalizer)
        loss = loss + config.vf_coef * vf_loss if policy_part else config.vf_coef * vf_loss
        stats.update(vf_loss=vf_loss.detach(), vf_clipfrac=vf_stats["clipfrac"])
    if policy_part and ptx is not None and config.ptx_coef > 0:
        ptx_loss = ptx.loss(models.policy, config.bf16, config.device)
        loss = loss + config.ptx_coef * ptx_loss * (mask.sum() / normalizer)
        stats["ptx_loss"] = ptx_loss.detach()
    if not torch.isfinite(loss):
        raise FloatingPointError("loss")
    loss.backward()
    if policy_part:
        with torch.no_grad():
            stats["entropy"] = masked_mean(entropy_from_logprobs(log_softmax.detach()), mask)
    return stats


def ppo_update(
    models: Models,
    rollout: Rollout,
    config: PPOConfig,
    optimizers: list[torch.optim.Optimizer],
    schedulers: list[Any],
    generator: torch.Generator,
    ptx: PtxBatches | None = None,
    sync_grads: Callable[[], None] | None = None,
) -> dict[str, float]:
    """`epochs` passes over shuffled minibatches; one optimizer step per minibatch. `sync_grads` (data parallel)
    averages the accumulated gradients over ranks before clipping."""
    per_mb = rollout.batch_size // config.minibatches
    per_micro = per_mb // config.grad_accum
    params_v = _value_params(models)
    totals: dict[str, float] = {}
    count = 0
    side_by_side = (
        sync_grads is None and config.value_head == "separate" and str(config.device).startswith("cpu")
    )
    sides, pairs = ("policy", "value"), list(zip(optimizers, schedulers))
    for _ in range(config.epochs):
        order = torch.randperm(rollout.batch_size, generator=generator)
        for m in range(config.minibatches):
            mb_index = order[m * per_mb : (m + 1) * per_mb]
            normalizer = float(rollout.response_mask[mb_index].sum().clamp(min=1))
            micros = [
                rollout.select(mb_index[k * per_micro : (k + 1) * per_micro]).trimmed()
                for k in range(config.grad_accum)
            ]
            if side_by_side:  # policy and value model each on their own core (rollout.concurrently)
                step = functools.partial(_update_one_model, models, micros, config, normalizer, ptx)
                parts = concurrently(
                    *(functools.partial(step, part, *pair) for part, pair in zip(sides, pairs))
                )
                for policy_stats, value_stats in zip(*parts):
                    for key, value in {**policy_stats, **value_stats}.items():
                        totals[key] = totals.get(key, 0.0) + float(value)
                    count += 1
                continue
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            for micro in micros:
                stats = accumulate_gradients(models, micro, config, normalizer, ptx)
                for key, value in stats.items():
                    totals[key] = totals.get(key, 0.0) + float(value)
                count += 1
            if sync_grads is not None:
                sync_grads()
            # one fused norm per model both clips and checks finiteness (no per-parameter isfinite scans)
            limit = config.max_grad_norm or math.inf
            norms = [
                torch.nn.utils.clip_grad_norm_(p, limit, foreach=True)
                for p in (models.policy.parameters(), params_v)
            ]
            if not all(torch.isfinite(n) for n in norms):
                raise FloatingPointError("gradient")
            for opt, sched in zip(optimizers, schedulers):
                opt.step()
                sched.step()
    return {key: value / max(count, 1) for key, value in totals.items()}


def _update_one_model(
    models: Models,
    micros: list[Rollout],
    config: PPOConfig,
    normalizer: float,
    ptx: PtxBatches | None,
    part: str,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
) -> list[dict[str, torch.Tensor]]:
    """One minibatch's optimizer step of the policy or of the separate value model alone: the gradients of every
    micro-batch, clipping (the norm also checks finiteness), the step and the LR schedule."""
    optimizer.zero_grad(set_to_none=True)
    stats = [accumulate_gradients(models, micro, config, normalizer, ptx, part) for micro in micros]
    params = models.policy.parameters() if part == "policy" else _value_params(models)
    norm = torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm or math.inf, foreach=True)
    if not torch.isfinite(norm):
        raise FloatingPointError("gradient")
    optimizer.step()
    scheduler.step()
    return stats


# ---------------------------------------------------------------------------------------------------------------
# Step 6 and the loop


def iteration_metrics(rollout: Rollout, update: dict[str, float], kl_coef: float, gen_time: dict) -> dict:
    mask = rollout.response_mask
    lengths = rollout.lengths.float()
    k1 = rollout.kl.sum(1)  # (B,) per-response KL
    k3 = (kl_k3(rollout.logprobs, rollout.ref_logprobs) * mask).sum(1)
    total = sum(gen_time.values())
    metrics = {
        "objective/score": rollout.raw_scores.mean().item(),
        "objective/shaped_score": rollout.scores.mean().item(),
        "objective/kl": k1.mean().item(),
        "objective/kl_k3": k3.mean().item(),
        "objective/kl_coef": kl_coef,
        "objective/rlhf_reward": (rollout.scores - kl_coef * k1).mean().item(),
        "objective/entropy": update.get("entropy", float("nan")),
        "objective/sampled_entropy": (-(rollout.logprobs * mask).sum(1)).mean().item(),
        "policy/clipfrac": update.get("clipfrac", float("nan")),
        "policy/approx_kl": update.get("approx_kl", float("nan")),
        **({"policy/kl_exact_per_token": update["kl_exact"]} if "kl_exact" in update else {}),
        "policy/loss": update.get("pg_loss", float("nan")),
        "value/loss": update.get("vf_loss", float("nan")),
        "value/clipfrac": update.get("vf_clipfrac", float("nan")),
        "value/explained_var": explained_variance(rollout.values, rollout.returns, mask).item(),
        "val/ratio": update.get("ratio", float("nan")),
        "response/length": lengths.mean().item(),
        "response/eos_rate": rollout.finished.float().mean().item(),
        "time/generation": gen_time["generation"],
        "time/scoring": gen_time["scoring"],
        "time/training": gen_time["training"],
        "time/iteration": total,
        "perf/rollout_tok_s": float(mask.sum()) / max(total, 1e-9),
    }
    if "ptx_loss" in update:
        metrics["ptx/loss"] = update["ptx_loss"]
    return metrics


def _check_finite(rollout: Rollout) -> None:
    for name in ("scores", "ref_logprobs", "values", "rewards", "advantages", "returns"):
        if not torch.isfinite(getattr(rollout, name)).all():
            raise FloatingPointError(name)


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
            f"config field 'batch_size': {config.batch_size} prompts do not split into {world} processes x "
            f"{config.minibatches} minibatches x {config.grad_accum} micro-batches"
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

    optimizers = [
        _adamw([p for p in models.policy.parameters() if p.requires_grad], config.lr, config),
        _adamw(_value_params(models), config.value_lr, config),
    ]
    total_steps = config.iterations * config.epochs * config.minibatches
    schedulers = [torch.optim.lr_scheduler.LambdaLR(o, _schedule(config, total_steps)) for o in optimizers]
    kl_ctl = make_kl_controller(config.kl.mode, config.kl.coef, config.kl.target, config.kl.horizon)
    start_iter = 0
    if checkpoint is not None:
        state = load_state(checkpoint)
        for obj, key in ((optimizers[0], "policy_opt"), (optimizers[1], "value_opt"), (kl_ctl, "kl")):
            obj.load_state_dict(state[key])
        for sched, key in zip(schedulers, ("policy_sched", "value_sched")):
            sched.load_state_dict(state[key])
        if config.value_head == "shared":
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
            "policy_opt": optimizers[0].state_dict(),
            "value_opt": optimizers[1].state_dict(),
            "policy_sched": schedulers[0].state_dict(),
            "value_sched": schedulers[1].state_dict(),
            "kl": kl_ctl.state_dict(),
            "generator": generator.get_state(),
            "data_position": step * config.batch_size,
        }
        if config.value_head == "shared":
            state["value_head"] = models.value.state_dict()
        if world > 1:  # a collective: every rank builds the state, the main process saves it
            state["generators"] = dist.gather_generator_states(accelerator, generator)
        return state

    def sync_grads() -> None:
        dist.all_reduce_gradients(accelerator, [*models.policy.parameters(), *_value_params(models)])

    def parts() -> dict:
        out_parts = {"policy": (models.peft or models.policy, tok)}  # LoRA: the adapters only
        if config.value_head == "separate":
            out_parts["value"] = (models.value.model, tok)
        return out_parts

    metrics_log = dist.metrics_logger(accelerator, out)
    bar = progress(config.iterations, "ppo", initial=start_iter, unit="it")
    metrics: dict = {}
    stopped = None
    try:
        for it in range(start_iter, config.iterations):
            first = it * config.batch_size
            batch = [kept[_prompt_index(first + j, len(kept), config.seed)] for j in range(config.batch_size)]
            if world > 1:  # this rank's share of the iteration's prompts
                batch = dist.rank_slice(batch, accelerator)
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
    if config.value_head == "separate":
        save_hf(models.value.model, tok, value_dir)
    else:
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
