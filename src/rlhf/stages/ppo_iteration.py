"""One PPO iteration's work, called by `rlhf.stages.ppo.run`: the models it runs (policy, reference, value, reward),
the rollout (steps 1-4: sample, score, rewards and advantages) and the clipped updates (step 5), and the metrics of
one iteration. The step numbers are those of the `rlhf.stages.ppo` docstring.
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
from typing import TYPE_CHECKING, Any

import torch

from rlhf import distributed as dist
from rlhf.errors import UserError
from rlhf.lora import reference_logprobs_with_adapters_disabled
from rlhf.losses import (
    entropy_from_logprobs,
    explained_variance,
    kl_exact,
    kl_k3,
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
    prefix_cache,
    prompt_columns,
    response_logprobs,
    reward_scores,
    shape_scores,
)

if TYPE_CHECKING:  # the config class lives with the stage's command; only its type is needed here
    from rlhf.stages.ppo import PPOConfig

ScoreFn = Callable[[list[str], Any], torch.Tensor]  # (prompts, Generation) -> (B,) scores

# ---------------------------------------------------------------------------------------------------------------
# Models


@dataclass
class Models:
    policy: Any
    ref: Any
    value: Any  # ValueModel, SharedValueHead on the policy trunk, or None (RLOO advantages need no values)
    reward: Any  # RewardModel, or None when a score function is given
    tokenizer: Any
    peft: Any = None  # under LoRA: the PeftModel around `policy` (adapters, the reference, saving)


def _frozen(model: Any) -> Any:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def freeze_embeddings(model: torch.nn.Module) -> None:
    """Fix every embedding table and the LM head (tied to the token embedding in GPT-2)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Embedding):
            module.requires_grad_(False)
    head = model.get_output_embeddings()
    if head is not None:
        head.requires_grad_(False)


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
    if config.freeze_embeddings:
        freeze_embeddings(policy)
    for model in (ref, policy):
        if model is not None:
            fast_gelu(model)
    reward = None
    if with_reward:
        if not config.reward_model:
            raise UserError("config field 'reward_model': give the trained reward model folder")
        reward = RewardModel.load(config.reward_model)
        reward.model = fast_gelu(_frozen(reward.model))
    if config.advantage == "rloo":
        value = (
            None  # leave-one-out baselines from the other responses to the same prompt: no value model at all
        )
    elif config.value_head == "shared":
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
    if isinstance(models.value, ValueModel):
        trunks["value"] = models.value.model.base_model
    if score_fn is None and models.reward is not None:
        trunks["reward"] = models.reward.trunk_and_head()[0]
    return trunks


def _value_params(models: Models) -> list[torch.nn.Parameter]:
    return [] if models.value is None else list(models.value.parameters())


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
            bf16=config.bf16,  # under LoRA the fast GPT-2 decoder folds the adapters into the weights it casts
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

    shared_head = isinstance(models.value, SharedValueHead)

    def value_and_reward() -> tuple[torch.Tensor, torch.Tensor | None]:
        with autocast(config.bf16, config.device):
            if config.recompute_logprobs or shared_head:
                logp, _, hidden = response_logprobs(
                    models.policy, input_ids, attention_mask, start, config.temperature
                )
                if config.recompute_logprobs:
                    rollout.logprobs = logp * mask
            if models.value is None:
                values = torch.zeros(mask.shape)
            elif shared_head:
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
    apart = models.peft is not None and (config.recompute_logprobs or shared_head)
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
        advantage=config.advantage,
        group_size=config.samples_per_prompt,
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
    real = mask.bool()
    policy_part, value_part = part != "value", part != "policy" and models.value is not None
    shared_head = isinstance(models.value, SharedValueHead)
    with autocast(config.bf16, config.device):
        if policy_part or shared_head:
            logp, log_softmax, hidden = response_logprobs(
                models.policy,
                mb.input_ids,
                mb.attention_mask,
                mb.response_start,
                config.temperature,
                with_log_softmax=True,
                rows=real,  # LM head, log-softmax and exact KL on real response tokens only: (M, V)
            )
        if value_part and shared_head:
            values = models.value(hidden)
        elif value_part:
            values = models.value(mb.input_ids, mb.attention_mask, mb.response_start)
    loss, stats = torch.zeros(()), {}
    if policy_part:
        pg_loss, pg_stats = policy_loss(logp, mb.logprobs, mb.advantages, mask, config.clip, normalizer)
        loss = pg_loss
        stats.update(pg_loss=pg_loss.detach(), **pg_stats)
        if mb.ref_log_softmax is not None:  # kl.penalty=loss: beta x exact KL, scaled like the advantages
            kl_loss = kl_exact(log_softmax, mb.ref_log_softmax[real]).sum() / normalizer
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
            entropy = entropy_from_logprobs(log_softmax.detach())  # (M,) real tokens
            stats["entropy"] = entropy.mean() if entropy.numel() else entropy.new_zeros(())
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
        sync_grads is None and isinstance(models.value, ValueModel) and str(config.device).startswith("cpu")
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
            groups = [models.policy.parameters(), *([params_v] if params_v else [])]  # RLOO: no value model
            norms = [torch.nn.utils.clip_grad_norm_(p, limit, foreach=True) for p in groups]
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
        "value/explained_var": explained_variance(rollout.values, rollout.returns, mask).item()
        if "vf_loss" in update
        else float("nan"),  # RLOO: no value model
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
