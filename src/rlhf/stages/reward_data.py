"""The reward stage's data: comparisons read and split, tokenized once into `Ranking`s, and scored a batch of
rankings at a time (each response forwarded once, each prompt once)."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import torch

from rlhf.data.comparisons import read_any_comparisons
from rlhf.data.records import Comparison
from rlhf.data.template import encode_prompt, encode_response
from rlhf.errors import UserError
from rlhf.modeling import autocast
from rlhf.reward_model import RewardModel
from rlhf.tracking import log


@dataclass
class Ranking:
    """One tokenized comparison: each response as a full prompt+response id list, and its rank."""

    sequences: list[list[int]]
    ranks: list[int]
    policies: list[str]
    prompt_len: int = 0  # tokens of the shared prompt at the start of every sequence (0 = unknown)


def tokenize_rankings(
    rm: RewardModel, records: list[Comparison], source: str, max_length: int, long_prompts: str = "error"
) -> list[Ranking]:
    out, cut, skipped = [], 0, 0
    tok = rm.tokenizer
    for n, record in enumerate(records):
        prompt_ids = encode_prompt(tok, record.prompt)
        if len(prompt_ids) >= max_length and long_prompts == "skip":
            skipped += 1
            continue
        if len(prompt_ids) >= max_length:
            raise UserError(
                f"{source}: record {n + 1} (prompt_id '{record.prompt_id}'): the prompt is {len(prompt_ids)} "
                f"tokens, which leaves no room for a response within max_length {max_length}; shorten it, drop "
                f"the record, raise max_length (up to the model's context) or set long_prompts=skip"
            )
        seqs = []
        for i, text in enumerate(record.responses):
            ids = record.response_token_ids[i] if record.response_token_ids else encode_response(tok, text)
            seq = prompt_ids + list(ids)
            if len(seq) > max_length:
                cut += 1
                seq = seq[:max_length]
            seqs.append(seq)
        shared = len(prompt_ids) if all(len(q) > len(prompt_ids) for q in seqs) else 0
        out.append(Ranking(seqs, list(record.ranks), list(record.policies) or [""] * len(seqs), shared))
    if skipped:
        log.info("%s: %d ranking(s) skipped: prompt longer than max_length %d", source, skipped, max_length)
    if not out:
        raise UserError(f"{source}: every prompt is longer than max_length {max_length}")
    if cut:
        log.info("%s: %d response(s) cut to max_length %d (their end is dropped)", source, cut, max_length)
    return out


def _read(paths: list[str]) -> list[Comparison]:
    records: list[Comparison] = []
    for path in paths:
        found, _counts = read_any_comparisons(path)
        records.extend(found)
    return records


def _drop_tied(records: list[Comparison], what: str) -> list[Comparison]:
    kept = [r for r in records if len(set(r.ranks)) > 1]
    if not kept:
        raise UserError(
            f"{what}: all {len(records)} rankings are ties: there is no preference to learn (every response "
            f"has the same rank)"
        )
    if len(kept) < len(records):
        log.info("%s: %d all-tied ranking(s) give no pair and are left out", what, len(records) - len(kept))
    return kept


def split(config: Any) -> tuple[list[Comparison], list[Comparison]]:
    """(train, validation) comparisons without all-tied rankings: `config.val_file`, or a seeded `val_fraction`
    of `config.comparisons` (a RewardConfig or anything with those fields and `seed`)."""
    train = _drop_tied(_read(config.comparisons), "training comparisons")
    if config.val_file:
        return train, _drop_tied(_read([config.val_file]), "validation comparisons")
    order = list(range(len(train)))
    random.Random(config.seed).shuffle(order)
    n_val = int(round(len(train) * config.val_fraction))
    if config.val_fraction > 0 and len(train) >= 2:
        n_val = min(max(n_val, 1), len(train) - 1)
    val = [train[i] for i in sorted(order[:n_val])]
    return [train[i] for i in sorted(order[n_val:])], val


def set_attention(rm: RewardModel, kind: str, device: str) -> None:
    """Pick the attention kernel: on CPU, eager attention trains these small models ~20% faster than SDPA."""
    if kind == "auto":
        kind = "eager" if str(device).startswith("cpu") else "sdpa"
    rm.model.set_attn_implementation(kind)


def batch_scores(
    rm: RewardModel, batch: list[Ranking], bf16: bool, share_prompt: bool = True, forward: Any = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, K) raw scores (0 in padded slots) and ranks of a batch of rankings; each response is forwarded once,
    and with `share_prompt` each ranking's prompt once (its K responses attend to one cached prompt pass).
    `forward` is the RM as Accelerate prepared it (DDP...); default `rm` itself."""
    forward = forward if forward is not None else rm
    k = max(len(r.ranks) for r in batch)
    ranks = torch.zeros((len(batch), k), dtype=torch.long)
    slots = []
    for b, ranking in enumerate(batch):
        ranks[b, : len(ranking.ranks)] = torch.tensor(ranking.ranks)
        slots.extend(b * k + i for i in range(len(ranking.ranks)))
    with autocast(bf16, str(rm.device)):
        if share_prompt and all(r.prompt_len for r in batch):
            flat = forward(
                prompts=[r.sequences[0][: r.prompt_len] for r in batch],
                responses=[seq[r.prompt_len :] for r in batch for seq in r.sequences],
                owner=[b for b, r in enumerate(batch) for _ in r.sequences],
            )
        else:
            flat = forward(*rm.pad([seq for r in batch for seq in r.sequences]))  # (N,)
    index = torch.tensor(slots, device=flat.device)
    scores = torch.zeros(ranks.numel(), dtype=flat.dtype, device=flat.device).index_put((index,), flat)
    return scores.view(ranks.shape), ranks.to(flat.device)
