"""The sampler every stage uses (`rlhf sample`, PPO rollouts, evaluation), and log-probs under one full forward pass.

`generate` runs batched decoding with a KV cache over left-padded prompts and returns the response ids, a mask, the
per-token log-probs of the sampled tokens under the sampling temperature, and whether each response ended with EOS.

Two decode paths give the same distribution:
- GPT-2-family weights (our presets, any `GPT2LMHeadModel`) run through `rlhf.fast_gpt2`, a plain-torch decoder
  over the model's own weights, cast and prepacked for oneDNN once per call: a preallocated static KV cache, one
  additive padding mask built once, positional rows gathered once, batched-GEMM attention for the single query row,
  the temperature folded into the final layer norm, each decode step one TorchScript call, exact two-level
  inverse-CDF sampling (no cumulative sum over the whole vocabulary), finished rows dropped from the batch, small
  batches on one intra-op thread, and with more threads allowed the batch split into parts decoded side by side. It is a few times faster than `model.generate` on CPU because a
  decode step there is dominated by per-op overhead (most of it thread-pool fork/join around tiny ops), not
  arithmetic.
- Any other causal LM runs a generic loop over the model's `past_key_values`.

Log-probs are `log_softmax(logits / temperature)` of the sampled token, before any top-k/top-p filtering, so they
equal `token_logprobs` of one full forward pass over the finished sequences at the same temperature.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from rlhf.data.template import decode_response
from rlhf.errors import UserError
from rlhf.modeling import context_length
from rlhf.unpadded import applies, trunk_forward


@dataclass
class Generation:
    response_ids: torch.Tensor  # (B, T) long, right-padded with the pad id after each response
    response_mask: torch.Tensor  # (B, T) bool, True on real response tokens (the EOS included)
    logprobs: (
        torch.Tensor
    )  # (B, T) float32, log_softmax(logits / temperature) of each sampled token; 0 on padding
    finished: torch.Tensor  # (B,) bool, the response ended with EOS (False: cut at max_new_tokens)
    texts: list[str]  # decode_response of each row


# ---------------------------------------------------------------------------------------------------------------
# Public functions


def generate(
    model: Any,
    tokenizer: Any,
    prompt_ids: list[list[int]],
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    greedy: bool = False,
    generator: torch.Generator | None = None,
    batch_size: int | None = None,
    bf16: bool = False,
    fast: bool = True,
) -> Generation:
    """Sample one response per prompt (prompt ids from `template.encode_prompt`); see `Generation`.

    `batch_size` splits a long prompt list into chunks. `bf16` runs the fast path's matmuls in bfloat16 (about 2x on
    CPUs with AVX512-BF16; log-probs then carry bf16 rounding). `fast=False` forces the generic Hugging Face loop.
    The fast path runs small batches (batch x n_embd <= 16k) with one intra-op thread: `torch.set_num_threads` is
    process-wide, so another Python thread running torch work meanwhile runs on one thread too; it is restored after.
    With N > 1 threads set and cores idle when it starts (Linux), it decodes min(N, idle cores, batch // 8) parts of
    the batch side by side, one Python thread each (same samples and log-probs as one part: the random draws are
    taken before the split).
    """
    if not prompt_ids:
        raise UserError("no prompts to sample from")
    if any(len(p) == 0 for p in prompt_ids):
        raise UserError("a prompt has no tokens")
    if max_new_tokens < 1:
        raise UserError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not greedy and not temperature > 0:
        raise UserError(f"temperature must be > 0 (use greedy decoding for argmax), got {temperature}")
    if top_k < 0 or not 0 < top_p <= 1:
        raise UserError(f"top_k must be >= 0 and top_p in (0, 1], got top_k={top_k} top_p={top_p}")
    if tokenizer.eos_token_id is None or tokenizer.pad_token_id is None:
        raise UserError("the tokenizer needs an EOS and a PAD token")
    context = context_length(model)
    longest = max(len(p) for p in prompt_ids)
    if longest >= context:
        raise UserError(
            f"a prompt has {longest} tokens but the model's context is {context}: no room to generate"
        )
    max_new_tokens = min(max_new_tokens, context - longest)
    temperature = float(temperature) if temperature > 0 else 1.0
    settings = dict(
        max_new=max_new_tokens,
        temperature=temperature,
        top_k=int(top_k),
        top_p=float(top_p),
        greedy=greedy,
        generator=generator,
        eos=int(tokenizer.eos_token_id),
        pad=int(tokenizer.pad_token_id),
    )
    from rlhf.fast_gpt2 import FastGPT2  # it imports this module's token choice and layout

    use_fast = fast and FastGPT2.supports(model)
    step = batch_size or len(prompt_ids)
    # A decode step at small width is a chain of tiny ops (16 x 256 GEMMs, layer norms on 16 rows): each fork/join
    # of the intra-op thread pool costs more than the op, and on a busy machine the second thread waits for a time
    # slice at every op (measured here under load: the 16 x 256 x 8192 head GEMM takes 1.7 ms on 1 thread, 32 ms
    # on 2). So the fast path runs small batches on one thread: the weight set-up and the prefill too (one forward,
    # a few % of the call). The caller's setting is restored on the way out.
    small = use_fast and min(step, len(prompt_ids)) * model.config.n_embd <= FastGPT2.SINGLE_THREAD_WIDTH
    # ... and with more threads allowed and cores idle right now, it splits the batch into parts decoded side by
    # side, one Python thread and one intra-op thread each. Each part streams the weights once per step (+35% CPU
    # time in all), so this pays only when the cores are free: measured under load (another runnable process or
    # more), the split was 1.4x slower than one part. The samples are the same either way (tested).
    rows_per_chunk = min(step, len(prompt_ids))
    parts = min(torch.get_num_threads(), _idle_cores(), rows_per_chunk // FastGPT2.MIN_PART_ROWS)
    parts = max(1, parts) if small else 1
    tokens, logprobs = [], []
    was_training = model.training
    model.eval()
    try:
        with _threads(1 if small else torch.get_num_threads()), torch.inference_mode():
            rows = -(-min(step, len(prompt_ids)) // parts)
            # with parts > 1, the weights are also cast and prepacked in that many threads
            decoder = FastGPT2(model, bf16, rows, parts) if use_fast else None
            for start in range(0, len(prompt_ids), step):
                chunk = prompt_ids[start : start + step]
                if decoder is not None:
                    tok, lp = decoder.decode_parts(chunk, parts, **settings)
                    tokens.extend(tok)
                    logprobs.extend(lp)
                else:
                    tok, lp = _hf_decode(model, chunk, **settings)
                    tokens.append(tok)
                    logprobs.append(lp)
    finally:
        model.train(was_training)
    return _assemble(tokens, logprobs, settings["eos"], settings["pad"], tokenizer)


def join_prompt_response(
    prompt_ids: list[list[int]], response_ids: torch.Tensor, response_mask: torch.Tensor, pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Left-padded prompts then right-padded responses: (input_ids (B,L), attention_mask (B,L), response_start).

    Every response starts at column `response_start`, so `token_logprobs(...)[:, response_start - 1:]` lines up
    with `response_ids`.
    """
    batch, width = response_ids.shape
    if len(prompt_ids) != batch:
        raise ValueError(f"{len(prompt_ids)} prompts for {batch} responses")
    start = max(len(p) for p in prompt_ids)
    device = response_ids.device
    input_ids = torch.full((batch, start + width), pad_id, dtype=torch.long, device=device)
    attention_mask = torch.zeros((batch, start + width), dtype=torch.long, device=device)
    for i, prompt in enumerate(prompt_ids):
        input_ids[i, start - len(prompt) : start] = torch.tensor(prompt, dtype=torch.long)
        attention_mask[i, start - len(prompt) : start] = 1
    mask = response_mask.bool()
    input_ids[:, start:] = torch.where(mask, response_ids, torch.full_like(response_ids, pad_id))
    attention_mask[:, start:] = mask.long()
    return input_ids, attention_mask, start


def position_ids_for(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that count only real tokens, so a left-padded row sees the same positions as an unpadded one."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def token_logprobs(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    temperature: float = 1.0,
    start: int = 0,
) -> torch.Tensor:
    """(B, L-1-start) log-prob of input_ids[:, start+1:] under one forward pass at `temperature` (gradients flow).

    `start` skips the first predicted positions: only the LM head over the last L-1-start positions is computed
    (`logits_to_keep`), which is most of the cost of a forward pass over prompt + response for a small model. With
    the `join_prompt_response` layout, `start = response_start - 1` gives exactly the response tokens' log-probs.
    """
    length = input_ids.shape[1]
    if not 0 <= start < length - 1:
        raise ValueError(f"start must be in [0, {length - 1}), got {start}")
    positions = position_ids_for(attention_mask)
    trunk, head = getattr(model, "base_model", None), model.get_output_embeddings()
    unpadded = trunk is not None and trunk is not model and head is not None
    if unpadded and applies(trunk, attention_mask, length):  # linear layers on real tokens only
        hidden, _ = trunk_forward(trunk, input_ids, attention_mask, positions)  # (B, L, d)
        logits = head(hidden[:, start:-1])  # positions start .. L-2 (L-1 predicts nothing)
    else:
        logits = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=positions,
            logits_to_keep=length - start,  # positions start .. L-1; the last one predicts nothing
        ).logits[:, :-1]
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    return logp.gather(-1, input_ids[:, start + 1 :].unsqueeze(-1)).squeeze(-1)


# ---------------------------------------------------------------------------------------------------------------
# Token choice, shared by both decode paths


def _choose(
    logits: torch.Tensor,
    temperature: float,
    top_k: int,
    top_p: float,
    greedy: bool,
    generator: torch.Generator | None,
    scaled: bool = False,
    u: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(token (B,), log-prob (B,)) from last-position logits (B, V): un-truncated log_softmax at `temperature`.

    `scaled=True`: the logits are already divided by the temperature (the fast path folds 1/T into ln_f).
    `u` (2, B, 1): uniform draws drawn beforehand (the fast path draws a whole rollout's at once); else `generator`.
    """
    if not greedy and not top_k and top_p >= 1.0:
        # Plain sampling, the common case: one softmax pass over (B, V) (upcasting bf16 logits on the fly; the fast
        # path has already folded 1/T into ln_f) and a two-level inverse CDF. Gumbel-max or torch.multinomial draw
        # B x V random numbers, the costliest part of a CPU decode step after the GEMMs. log(p) of a sampled token
        # is exact to float rounding: a token is only sampled with non-negligible probability, far from underflow.
        if temperature != 1.0 and not scaled:
            logits = logits.float() / temperature
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        token = _sample(probs, generator, u)
        return token, probs.gather(-1, token.unsqueeze(-1)).squeeze(-1).log()
    scaled_logits = logits.float()
    if temperature != 1.0 and not scaled:
        scaled_logits = scaled_logits / temperature
    logp = torch.log_softmax(scaled_logits, dim=-1)
    if greedy:
        token = scaled_logits.argmax(-1)
    else:
        token = _inverse_cdf(
            _filter(logp, top_k, top_p).exp().cumsum_(-1), generator, None if u is None else u[0]
        )
    return token, logp.gather(-1, token.unsqueeze(-1)).squeeze(-1)


def _inverse_cdf(
    cdf: torch.Tensor, generator: torch.Generator | None, u: torch.Tensor | None = None
) -> torch.Tensor:
    """The first token whose cumulative mass (B, V), possibly unnormalised, exceeds one uniform draw per row."""
    if u is None:
        u = torch.rand(cdf.shape[0], 1, generator=generator, device=cdf.device, dtype=cdf.dtype)
    # right=True: the first token whose cumulative mass exceeds u, so a zero-probability token is never chosen
    return torch.searchsorted(cdf, u * cdf[:, -1:], right=True).squeeze(1).clamp_(max=cdf.shape[1] - 1)


_BLOCK = 128  # tokens per block of the two-level inverse CDF


def _sample(
    probs: torch.Tensor, generator: torch.Generator | None, u: torch.Tensor | None = None
) -> torch.Tensor:
    """One token per row of `probs` (B, V), exactly: a block of 128 tokens by its mass, then a token by its mass
    inside the block, each by inverse CDF with its own uniform draw (P(block) x P(token | block) = P(token)).

    A cumulative sum over the whole vocabulary is sequential along the row (130 us for 16 x 8192 here); block sums
    are one vectorised pass and the two cumulative sums are 64 and 128 wide.
    """
    batch, vocab = probs.shape
    blocks = (probs if vocab % _BLOCK == 0 else F.pad(probs, (0, -vocab % _BLOCK))).view(batch, -1, _BLOCK)
    if u is None:
        u = torch.rand(2, batch, 1, generator=generator, device=probs.device, dtype=probs.dtype)
    block = _inverse_cdf(blocks.sum(-1).cumsum_(-1), None, u[0])
    inner = blocks.gather(1, block.view(batch, 1, 1).expand(batch, 1, _BLOCK)).view(batch, _BLOCK)
    return (block * _BLOCK + _inverse_cdf(inner.cumsum_(-1), None, u[1])).clamp_(max=vocab - 1)


def _filter(logp: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Log-probs with tokens outside the top-k and the top-p nucleus set to -inf (used for sampling only)."""
    if top_k and top_k < logp.shape[-1]:
        kth = torch.topk(logp, top_k, dim=-1).values[:, -1:]
        logp = logp.masked_fill(logp < kth, -math.inf)
    if top_p < 1.0:
        sorted_logp, order = torch.sort(logp, dim=-1, descending=True)
        mass_before = sorted_logp.exp().cumsum(-1) - sorted_logp.exp()
        drop_sorted = (
            mass_before >= top_p
        )  # keep the smallest prefix whose mass reaches top_p (always >= 1 token)
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logp = logp.masked_fill(drop, -math.inf)
    return logp


def _idle_cores() -> int:
    """Cores that no other process's runnable task wants right now (Linux `procs_running` less this process's own
    running threads, e.g. a thread pool still spinning after the previous op); 0 where that cannot be read."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            running = next(int(line.split()[1]) for line in f if line.startswith("procs_running"))
        own = 0
        for tid in os.listdir("/proc/self/task"):
            with contextlib.suppress(OSError), open(f"/proc/self/task/{tid}/stat", encoding="ascii") as f:
                own += f.read().rsplit(")", 1)[1].split()[0] == "R"
        return max(0, len(os.sched_getaffinity(0)) - max(0, running - own))
    except (OSError, StopIteration, ValueError, AttributeError, IndexError):
        return 0


@contextlib.contextmanager
def _threads(n: int) -> Iterator[None]:
    """Run the block with `n` intra-op threads, then restore the process-wide setting."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _left_pad(prompts: list[list[int]], pad: int, device: Any) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p) :] = 1
    return ids.to(device), mask.to(device)


def _assemble(
    tokens: list[torch.Tensor], logprobs: list[torch.Tensor], eos: int, pad: int, tokenizer: Any
) -> Generation:
    """Join chunks (each (b, t) with -1 where nothing was generated), cut after the first EOS, right-pad."""
    width = max(t.shape[1] for t in tokens)
    tok = torch.cat([F.pad(t, (0, width - t.shape[1]), value=-1) for t in tokens]).clone()
    lp = torch.cat([F.pad(x, (0, width - x.shape[1]), value=0.0) for x in logprobs]).float().clone()
    is_eos = tok == eos
    after_eos = (is_eos.long().cumsum(1) - is_eos.long()) > 0
    mask = (tok >= 0) & ~after_eos
    finished = (is_eos & mask).any(1)
    used = max(int(mask.sum(1).max()), 1)
    mask, tok, lp = mask[:, :used], tok[:, :used], lp[:, :used]
    response_ids = torch.where(mask, tok, torch.full_like(tok, pad))
    lp = torch.where(mask, lp, torch.zeros_like(lp))
    rows = response_ids.tolist()
    lengths = mask.sum(1).tolist()
    texts = [decode_response(tokenizer, row[:n]) for row, n in zip(rows, lengths)]
    return Generation(response_ids, mask, lp, finished, texts)


# ---------------------------------------------------------------------------------------------------------------
# Generic path: any Hugging Face causal LM, through its own past_key_values


def _hf_decode(model: Any, prompts: list[list[int]], *, max_new: int, eos: int, pad: int, **choice: Any):
    device = next(model.parameters()).device
    ids, mask = _left_pad(prompts, pad, device)
    batch = ids.shape[0]
    out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_for(mask), use_cache=True)
    past, logits = out.past_key_values, out.logits[:, -1]
    positions = mask.sum(1)  # (B,) position of the first response token
    tokens = torch.full((batch, max_new), -1, dtype=torch.long, device=device)
    logprobs = torch.zeros((batch, max_new), device=device)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    for t in range(max_new):
        token, lp = _choose(logits, **choice)
        token = torch.where(done, torch.full_like(token, pad), token)
        tokens[:, t], logprobs[:, t] = token, lp
        done = done | (token == eos)
        if t == max_new - 1 or bool(done.all()):
            return tokens[:, : t + 1], logprobs[:, : t + 1]
        mask = torch.cat([mask, torch.ones((batch, 1), dtype=mask.dtype, device=device)], dim=1)
        out = model(
            input_ids=token[:, None],
            attention_mask=mask,
            position_ids=(positions + t)[:, None],
            past_key_values=past,
            use_cache=True,
        )
        past, logits = out.past_key_values, out.logits[:, -1]
    return tokens, logprobs
