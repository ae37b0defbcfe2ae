"""DPO's preference pairs: tokenising ranked comparisons into (prompt, chosen, rejected) token pairs, holding out
whole prompts, laying a batch of pairs out for one forward, and the summed response log-probs of a batch of pairs
(one forward over both responses, or each prompt once with its keys/values shared by both) or of every pair (no
grad, split over ranks).

`rlhf.stages.dpo` trains on these: its reference log-probs and every training and validation step go through
`pair_logprobs` / `all_pair_logprobs`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class Pair:
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]


# ---------------------------------------------------------------------------------------------------------------
# Pairs from ranked comparisons


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


# ---------------------------------------------------------------------------------------------------------------
# Log-probs of pairs: a batch's layout, one forward per batch, every pair without grad


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


def _unpadded_trunk(model: Any, attention_mask: torch.Tensor, columns: int) -> tuple[Any, Any] | None:
    """(GPT-2 trunk, LM head) when `rlhf.unpadded.trunk_forward` takes its real-tokens-only path for this batch
    (a bare Hugging Face model, not a DDP or PEFT wrapper: those must run their own forward), else None."""
    from rlhf.unpadded import applies

    trunk, head_of = getattr(model, "base_model", None), getattr(model, "get_output_embeddings", None)
    if trunk is None or trunk is model or head_of is None or head_of() is None:
        return None
    return (trunk, head_of()) if applies(trunk, attention_mask, columns) else None


def _picked_logprobs(logits: torch.Tensor, targets: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """(B, T) log-prob of each target under logits (B, T, V), 0 where `keep` is False (cross-entropy: log-softmax
    and pick fused, about 2.5x faster forward + backward on CPU than log_softmax + gather)."""
    logp = -torch.nn.functional.cross_entropy(
        logits.float().flatten(0, 1), targets.flatten(), reduction="none"
    )
    return logp.view(targets.shape).masked_fill(~keep, 0.0)


def _packed_logprobs(
    head: Any, hidden: torch.Tensor, targets: torch.Tensor, keep: torch.Tensor
) -> torch.Tensor:
    """`_picked_logprobs` with the LM head run on the kept rows of hidden (B, T, d) only: with a vocabulary of
    thousands the head is the costliest layer, and padded response columns need none of it."""
    logits = head(hidden[keep])  # (N, V)
    logp = -torch.nn.functional.cross_entropy(logits.float(), targets[keep], reduction="none")
    return logp.new_zeros(keep.shape).masked_scatter(keep, logp)


def sequence_logprobs(model: Any, pairs: list[Pair], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed response log-probs (2B,) (chosen then rejected) and response lengths (2B,), in one forward.

    The same numbers as `sampling.token_logprobs` over the response columns, computed with less work: the last
    column (it predicts nothing) is not fed, the LM head runs on the columns that predict response tokens only
    (`logits_to_keep`), and the log-prob of each target comes from `cross_entropy`. Where a batch is padded enough
    (`rlhf.unpadded`), the trunk's linear layers run on real tokens only and the head on real response tokens only.
    """
    from rlhf.sampling import position_ids_for
    from rlhf.unpadded import trunk_forward

    ids, attn, start = collate(pairs, pad_id)
    device = next(model.parameters()).device
    ids, attn = ids.to(device), attn.to(device)
    inputs, mask, positions = ids[:, :-1], attn[:, :-1], position_ids_for(attn[:, :-1])
    targets = ids[:, start:]  # (2B, R): predicted by columns start-1 .. L-2
    resp = attn[:, start:].bool()
    parts = _unpadded_trunk(model, mask, inputs.shape[1])
    if parts is not None:
        hidden, _ = trunk_forward(parts[0], inputs, mask, positions, kernel_without_grad=True)  # (2B, L-1, d)
        logp = _packed_logprobs(parts[1], hidden[:, start - 1 :], targets, resp)
    else:
        logits = model(
            input_ids=inputs,
            attention_mask=mask,
            position_ids=positions,
            logits_to_keep=targets.shape[1],
            use_cache=False,
        ).logits
        logp = _picked_logprobs(logits, targets, resp)
    return logp.sum(-1), resp.sum(-1)


def shared_prompt_logprobs(model: Any, pairs: list, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`sequence_logprobs` with each prompt run once for both of its responses, in training too: the prompt pass
    keeps its keys/values (with their gradients), repeated for the chosen and the rejected row, and the response
    pass attends to them. Same numbers up to fp32 rounding; fewer tokens through the trunk (e.g. 32-token prompts
    and 48-token responses: 128 instead of 160 per pair). Needs a KV cache in training: not with gradient
    checkpointing (Hugging Face drops the cache there) and not under DDP (two forwards per backward). Each pass
    unpadded where that pays, as in `sequence_logprobs`."""
    from rlhf.sampling import position_ids_for
    from rlhf.unpadded import trunk_forward

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
    keep = response_mask.bool()
    # 1. prompts once: their keys/values for both responses, and the logits of each response's first token
    prompt_positions = position_ids_for(prompt_mask)
    parts = _unpadded_trunk(model, prompt_mask, start)
    if parts is not None:
        hidden, cache = trunk_forward(
            parts[0], prompts, prompt_mask, prompt_positions, use_cache=True, kernel_without_grad=True
        )
        first = parts[1](hidden[:, -1:])  # (B, 1, V): every prompt ends at the last column
    else:
        out = model(
            input_ids=prompts,
            attention_mask=prompt_mask,
            position_ids=prompt_positions,
            use_cache=True,
            logits_to_keep=1,
        )
        first, cache = out.logits[:, -1:], out.past_key_values
    logp = [_picked_logprobs(first.repeat_interleave(2, dim=0), responses[:, :1], keep[:, :1])]  # (2B, 1)
    if width > 1:
        cache.batch_repeat_interleave(2)
        mask = torch.cat([prompt_mask.repeat_interleave(2, dim=0), response_mask[:, :-1]], dim=1)
        lengths = prompt_mask.sum(-1).repeat_interleave(2)[:, None]
        positions = lengths + torch.arange(width - 1, device=device)[None]
        # 2. responses (but their last token) after the cached prompt: log-probs of response tokens 2..R
        parts = _unpadded_trunk(model, mask, width - 1)
        if parts is not None:
            hidden, _ = trunk_forward(
                parts[0],
                responses[:, :-1],
                mask,
                positions,
                past=cache,
                use_cache=True,
                kernel_without_grad=True,
            )
            logp.append(_packed_logprobs(parts[1], hidden, responses[:, 1:], keep[:, 1:]))
        else:
            logits = model(
                input_ids=responses[:, :-1],
                attention_mask=mask,
                position_ids=positions,
                past_key_values=cache,
                use_cache=True,
            ).logits
            logp.append(_picked_logprobs(logits, responses[:, 1:], keep[:, 1:]))
    sums, counts = torch.cat(logp, dim=1).sum(-1), keep.sum(-1)
    order = torch.cat([torch.arange(0, 2 * n, 2), torch.arange(1, 2 * n, 2)]).to(
        device
    )  # chosen then rejected
    return sums[order], counts[order]


def pair_logprobs(model: Any, pairs: list[Pair], pad_id: int, share_prompt: bool = False):
    """Summed response log-probs (2B,) and lengths (2B,), chosen then rejected, by either layout."""
    fn = shared_prompt_logprobs if share_prompt else sequence_logprobs
    return fn(model, pairs, pad_id)


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
