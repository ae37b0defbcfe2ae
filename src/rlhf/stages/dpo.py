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

from rlhf.config import ModelConfig, StageConfig, option
from rlhf.errors import UserError
from rlhf.lora import LoraSettings

log = logging.getLogger("rlhf")

REF_CACHE = "reference_logprobs.pt"


@dataclass
class DPOConfig(StageConfig):
    """Direct Preference Optimization of a policy on ranked comparisons."""

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
    bf16: bool = option(False, "bf16 autocast (CPU with AVX512-BF16/AMX, or CUDA); weights stay fp32")
    gradient_checkpointing: bool = option(False, "recompute activations in backward: less memory, more time")
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
    num_processes: int = option(
        1, "data-parallel processes: >1 re-launches through `accelerate launch`", low=1
    )
    accelerate_config: str = option(
        "", "accelerate config file for the re-launch (configs/accelerate/*.yaml)"
    )
    lora: LoraSettings = option(LoraSettings(), "LoRA adapters (PEFT) instead of full fine-tuning")

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


@dataclass
class Pair:
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]


# ---------------------------------------------------------------------------------------------------------------
# 1. Pairs


def build_pairs(records: list[Any], tokenizer: Any, max_length: int, max_prompt_length: int) -> list[Pair]:
    """Every (better, worse) pair of every ranking, tokenized through the template; ties give no pair."""
    from rlhf.data.records import ranking_pairs
    from rlhf.data.template import encode_prompt, encode_response

    pairs = []
    for rec in records:
        prompt = encode_prompt(tokenizer, rec.prompt)
        if len(prompt) > max_prompt_length:  # keep BOS and the end of the prompt, next to the response
            prompt = prompt[:1] + prompt[len(prompt) - max_prompt_length + 1 :]
        room = max_length - len(prompt)
        encoded: dict[int, list[int]] = {}

        def response(i: int, rec: Any = rec, encoded: dict = encoded, room: int = room) -> list[int]:
            if i not in encoded:
                given = rec.response_token_ids[i] if rec.response_token_ids else None
                ids = list(given) if given else encode_response(tokenizer, rec.responses[i])
                encoded[i] = ids[:room]
            return encoded[i]

        for better, worse in ranking_pairs(rec.ranks):
            pairs.append(Pair(prompt, response(better), response(worse)))
    return pairs


def split_records(records: list[Any], fraction: float, seed: int) -> tuple[list[Any], list[Any]]:
    """Hold out whole prompts (all pairs of a prompt stay on one side)."""
    prompts = sorted({r.prompt for r in records})
    if fraction <= 0 or len(prompts) < 2:
        return records, []
    order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = max(1, round(fraction * len(prompts)))
    held = {prompts[i] for i in order[:n_val]}
    return [r for r in records if r.prompt not in held], [r for r in records if r.prompt in held]


def collate(pairs: list[Pair], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Chosen rows then rejected rows: left-padded prompts, then right-padded responses, so every response starts
    at the same column `start` (the `join_prompt_response` layout) and the LM head runs on response columns only.
    Returns ids (2B, L), attention mask (2B, L) and `start`; `attention_mask[:, start:]` marks response tokens."""
    rows = [(p.prompt_ids, p.chosen_ids) for p in pairs] + [(p.prompt_ids, p.rejected_ids) for p in pairs]
    start = max(len(prompt) for prompt, _ in rows)
    width = start + max(len(response) for _, response in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (prompt, response) in enumerate(rows):
        ids[i, start - len(prompt) : start + len(response)] = torch.tensor(prompt + response)
        attn[i, start - len(prompt) : start + len(response)] = 1
    return ids, attn, start


def sequence_logprobs(model: Any, pairs: list[Pair], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed response log-probs (2B,) (chosen then rejected) and response lengths (2B,), in one forward.

    The same numbers as `sampling.token_logprobs` over the response columns, computed with less work: the last
    column (it predicts nothing) is not fed, the LM head runs on the columns that predict response tokens only
    (`logits_to_keep`), and the log-prob of each target comes from `cross_entropy` (log-softmax and pick fused,
    about 2.5x faster forward + backward on CPU than log_softmax + gather over the vocabulary).
    """
    from rlhf.sampling import position_ids_for

    ids, attn, start = collate(pairs, pad_id)
    device = next(model.parameters()).device
    ids, attn = ids.to(device), attn.to(device)
    inputs, mask = ids[:, :-1], attn[:, :-1]
    targets = ids[:, start:]  # (2B, R): predicted by columns start-1 .. L-2
    logits = model(
        input_ids=inputs,
        attention_mask=mask,
        position_ids=position_ids_for(mask),
        logits_to_keep=targets.shape[1],
        use_cache=False,
    ).logits
    logp = -torch.nn.functional.cross_entropy(
        logits.float().flatten(0, 1), targets.flatten(), reduction="none"
    ).view(targets.shape)
    resp = attn[:, start:].bool()
    return logp.masked_fill(~resp, 0.0).sum(-1), resp.sum(-1)


def shared_prompt_logprobs(model: Any, pairs: list, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`sequence_logprobs` with each prompt run once for both of its responses, in training too: the prompt pass
    keeps its keys/values (with their gradients), repeated for the chosen and the rejected row, and the response
    pass attends to them. Same numbers up to fp32 rounding; fewer tokens through the trunk (e.g. 32-token prompts
    and 48-token responses: 128 instead of 160 per pair). Needs a KV cache in training: not with gradient
    checkpointing (Hugging Face drops the cache there) and not under DDP (two forwards per backward)."""
    from rlhf.sampling import position_ids_for

    device = next(model.parameters()).device
    n = len(pairs)
    start = max(len(p.prompt_ids) for p in pairs)
    width = max(max(len(p.chosen_ids), len(p.rejected_ids)) for p in pairs)
    prompts = torch.full((n, start), pad_id, dtype=torch.long)
    prompt_mask = torch.zeros((n, start), dtype=torch.long)
    responses = torch.full(
        (2 * n, width), pad_id, dtype=torch.long
    )  # rows: chosen 0, rejected 0, chosen 1, ...
    response_mask = torch.zeros((2 * n, width), dtype=torch.long)
    for i, p in enumerate(pairs):
        prompts[i, start - len(p.prompt_ids) :] = torch.tensor(p.prompt_ids)
        prompt_mask[i, start - len(p.prompt_ids) :] = 1
        for j, ids in enumerate((p.chosen_ids, p.rejected_ids)):
            responses[2 * i + j, : len(ids)] = torch.tensor(ids)
            response_mask[2 * i + j, : len(ids)] = 1
    prompts, prompt_mask = prompts.to(device), prompt_mask.to(device)
    responses, response_mask = responses.to(device), response_mask.to(device)
    # 1. prompts once: their keys/values for both responses, and the logits of each response's first token
    out = model(
        input_ids=prompts,
        attention_mask=prompt_mask,
        position_ids=position_ids_for(prompt_mask),
        use_cache=True,
        logits_to_keep=1,
    )
    logits = [out.logits[:, -1:].repeat_interleave(2, dim=0)]  # (2B, 1, V)
    if width > 1:
        cache = out.past_key_values
        cache.batch_repeat_interleave(2)
        mask = torch.cat([prompt_mask.repeat_interleave(2, dim=0), response_mask[:, :-1]], dim=1)
        lengths = prompt_mask.sum(-1).repeat_interleave(2)[:, None]
        positions = lengths + torch.arange(width - 1, device=device)[None]
        # 2. responses (but their last token) after the cached prompt: logits of response tokens 2..R
        logits.append(
            model(
                input_ids=responses[:, :-1],
                attention_mask=mask,
                position_ids=positions,
                past_key_values=cache,
                use_cache=True,
            ).logits
        )
    logits = torch.cat(logits, dim=1)  # (2B, R, V): predicts responses[:, 0..R-1]
    logp = -torch.nn.functional.cross_entropy(
        logits.float().flatten(0, 1), responses.flatten(), reduction="none"
    ).view(responses.shape)
    keep = response_mask.bool()
    sums, counts = logp.masked_fill(~keep, 0.0).sum(-1), keep.sum(-1)
    order = torch.cat([torch.arange(0, 2 * n, 2), torch.arange(1, 2 * n, 2)]).to(
        device
    )  # chosen then rejected
    return sums[order], counts[order]


def pair_logprobs(model: Any, pairs: list[Pair], pad_id: int, share_prompt: bool = False):
    """Summed response log-probs (2B,) and lengths (2B,), chosen then rejected, by either layout."""
    fn = shared_prompt_logprobs if share_prompt else sequence_logprobs
    return fn(model, pairs, pad_id)


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


def all_pair_logprobs(
    model: Any, pairs: list[Pair], pad_id: int, chunk: int, accelerator: Any, share_prompt: bool = False
) -> torch.Tensor:
    """(N, 2) summed log-probs [chosen, rejected] of every pair, no grad. Fixed chunks in index order, dealt to
    ranks round-robin and summed across ranks, so any number of processes gives the same numbers."""
    from rlhf.distributed import sum_across

    out = torch.zeros(len(pairs), 2, dtype=torch.float64)
    starts = range(0, len(pairs), chunk)
    with torch.no_grad(), accelerator.autocast():
        for c, start in enumerate(starts):
            if c % accelerator.num_processes != accelerator.process_index:
                continue
            part = pairs[start : start + chunk]
            sums, _ = pair_logprobs(model, part, pad_id, share_prompt)
            out[start : start + len(part)] = sums.double().cpu().view(2, -1).T
    return sum_across(accelerator, out)


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
