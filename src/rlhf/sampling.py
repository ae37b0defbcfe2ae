"""The sampler every stage uses (`rlhf sample`, PPO rollouts, evaluation), and log-probs under one full forward pass.

`generate` runs batched decoding with a KV cache over left-padded prompts and returns the response ids, a mask, the
per-token log-probs of the sampled tokens under the sampling temperature, and whether each response ended with EOS.

Two decode paths give the same distribution:
- GPT-2-family weights (our presets, any `GPT2LMHeadModel`) run through a plain-torch decoder over the model's own
  weights, cast and prepacked for oneDNN once per call: a preallocated static KV cache, one additive padding mask
  built once, positional rows gathered once, batched-GEMM attention for the single query row, the temperature folded
  into the final layer norm, exact two-level inverse-CDF sampling (no cumulative sum over the whole vocabulary),
  finished rows dropped from the batch, small batches on one intra-op thread, and with more threads allowed the
  batch split into parts decoded side by side. It is a few times faster than `model.generate` on CPU because a
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
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from rlhf.data.template import decode_response
from rlhf.errors import UserError
from rlhf.modeling import context_length


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
    use_fast = fast and _FastGPT2.supports(model)
    step = batch_size or len(prompt_ids)
    # A decode step at small width is a chain of tiny ops (16 x 256 GEMMs, layer norms on 16 rows): each fork/join
    # of the intra-op thread pool costs more than the op, and on a busy machine the second thread waits for a time
    # slice at every op (measured here under load: the 16 x 256 x 8192 head GEMM takes 1.7 ms on 1 thread, 32 ms
    # on 2). So the fast path runs small batches on one thread: the weight set-up and the prefill too (one forward,
    # a few % of the call). The caller's setting is restored on the way out.
    small = use_fast and min(step, len(prompt_ids)) * model.config.n_embd <= _FastGPT2.SINGLE_THREAD_WIDTH
    # ... and with more threads allowed and cores idle right now, it splits the batch into parts decoded side by
    # side, one Python thread and one intra-op thread each. Each part streams the weights once per step (+35% CPU
    # time in all), so this pays only when the cores are free: measured under load (another runnable process or
    # more), the split was 1.4x slower than one part. The samples are the same either way (tested).
    rows_per_chunk = min(step, len(prompt_ids))
    parts = min(torch.get_num_threads(), _idle_cores(), rows_per_chunk // _FastGPT2.MIN_PART_ROWS)
    parts = max(1, parts) if small else 1
    tokens, logprobs = [], []
    was_training = model.training
    model.eval()
    try:
        with _threads(1 if small else torch.get_num_threads()), torch.inference_mode():
            rows = -(-min(step, len(prompt_ids)) // parts)
            decoder = _FastGPT2(model, bf16, rows) if use_fast else None
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
    logits = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_for(attention_mask),
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


# ---------------------------------------------------------------------------------------------------------------
# Fast path: plain-torch GPT-2 decoder over the Hugging Face model's own weights


def _linear(weight: torch.Tensor, bias: torch.Tensor | None, act: str, rows: int, packed: bool):
    """(f, f_add) with f(x) = act(x @ weight.T + bias) and f_add(x, r) = r + x @ weight.T + bias, for one call.

    On CPU the weight is reordered once into oneDNN's blocked layout for this batch size: the 16 x 256 x 8192 LM head
    then runs 1.7x faster than through MKL (0.92 vs 1.55 ms fp32, 0.38 vs 0.62 ms bf16, one thread), and the
    activation or the residual add rides along in the same call. Elsewhere it is a plain `F.linear`.
    """
    if packed:
        w = torch.ops.mkldnn._reorder_linear_weight(weight, rows)
        op, binary = torch.ops.mkldnn._linear_pointwise.default, torch.ops.mkldnn._linear_pointwise.binary
        kind, algorithm = _FastGPT2.ONEDNN_ACT[act]
        return (
            lambda x: op(x, w, bias, kind, [], algorithm),
            lambda x, residual: binary(x, residual, w, bias, "add"),
        )
    fn = _FastGPT2.ACTIVATIONS[act]
    return lambda x: fn(F.linear(x, weight, bias)), lambda x, residual: residual + F.linear(x, weight, bias)


def _can_pack(dtype: torch.dtype, device: torch.device) -> bool:
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.bfloat16:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return dtype == torch.float32


class _FastGPT2:
    """GPT-2 decoding with a static KV cache over the weights of a GPT2LMHeadModel (prepacked or cast once per call).

    Per layer, a decode step is 10 ops: layer norm, QKV linear (output columns ordered head-major so that a head's
    q, k and v sit together), one copy of k and v into the cache, baddbmm (+ key padding bias), softmax, bmm,
    projection + residual, layer norm, FC + GELU, output + residual. The attention scale is folded into the q rows.
    """

    ACTIVATIONS = {
        "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
        "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
        "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),
        "gelu": F.gelu,
        "relu": F.relu,
        "none": lambda x: x,
    }
    ONEDNN_ACT = {
        "gelu_new": ("gelu", "tanh"),
        "gelu_pytorch_tanh": ("gelu", "tanh"),
        "gelu_fast": ("gelu", "tanh"),
        "gelu": ("gelu", "none"),
        "relu": ("relu", ""),
        "none": ("none", ""),
    }

    PACK_LAYERS = True

    # decode steps with batch x n_embd up to this run on one thread (tiny: 16 x 256, small: 16 x 384)
    SINGLE_THREAD_WIDTH = 16 * 1024
    # with more threads allowed, a batch is split into parts of at least this many rows, decoded side by side
    MIN_PART_ROWS = 8

    @classmethod
    def supports(cls, model: Any) -> bool:
        config = getattr(model, "config", None)
        return (
            type(model).__name__ == "GPT2LMHeadModel"
            and getattr(config, "activation_function", "") in cls.ACTIVATIONS
            and not getattr(config, "add_cross_attention", False)
        )

    def __init__(self, model: Any, bf16: bool = False, rows: int = 16):
        config = model.config
        weight_dtype = model.lm_head.weight.dtype
        self.dtype = torch.bfloat16 if bf16 else weight_dtype
        # The KV cache and attention stay in the model's dtype: bf16 pays off in the weight GEMMs, while the
        # batched single-query attention GEMMs run 2x slower in bf16 on CPU (measured: 98 vs 53 us per layer).
        self.cache_dtype = weight_dtype
        self.device = model.lm_head.weight.device
        self.n_head = config.n_head
        self.head_dim = config.n_embd // config.n_head
        self.eps = config.layer_norm_epsilon
        packed = _can_pack(self.dtype, self.device)
        heads, dim, width = self.n_head, self.head_dim, config.n_embd

        def cast(w: torch.Tensor) -> torch.Tensor:
            return w.detach().to(self.dtype)

        def linear(conv1d: Any, act: str = "none", order: torch.Tensor | None = None, scale=None) -> tuple:
            weight, bias = conv1d.weight.detach(), conv1d.bias.detach()  # Conv1D stores (in, out)
            if order is not None:
                weight, bias = weight[:, order] * scale, bias[order] * scale
            return _linear(cast(weight).t(), cast(bias), act, rows, packed and self.PACK_LAYERS)

        tr = model.transformer
        self.wte, self.wpe = cast(tr.wte.weight), cast(tr.wpe.weight)
        self.head = _linear(cast(model.lm_head.weight).contiguous(), None, "none", rows, packed)[0]
        self.ln_f = (cast(tr.ln_f.weight), cast(tr.ln_f.bias))
        # QKV output columns (3, H, D) -> (H, 3, D): one head's q, k, v are adjacent, so q of all heads is a
        # (B*H, 1, D) view and k, v land in the cache with one copy.
        order = torch.arange(3 * width).view(3, heads, dim).transpose(0, 1).reshape(-1)
        self.layers = []
        for i, block in enumerate(tr.h):
            scale = dim**-0.5 if config.scale_attn_weights else 1.0
            if config.scale_attn_by_inverse_layer_idx:
                scale /= float(i + 1)
            q_scale = torch.ones(heads, 3, dim, dtype=block.attn.c_attn.weight.dtype, device=self.device)
            q_scale[:, 0] = scale
            self.layers.append(
                (
                    (cast(block.ln_1.weight), cast(block.ln_1.bias)),
                    linear(block.attn.c_attn, order=order, scale=q_scale.view(-1)),
                    linear(block.attn.c_proj),
                    (cast(block.ln_2.weight), cast(block.ln_2.bias)),
                    linear(block.mlp.c_fc, config.activation_function),
                    linear(block.mlp.c_proj),
                )
            )

    def _prefill(self, x: torch.Tensor, cache: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The prompt (B, P, C) through every block, filling cache[:, :, :, :, :P]; returns the last position (B, C).

        The last block needs its output at the last position only (the other positions' k and v are all later
        steps read), so its attention runs for one query row and its MLP for one position.
        """
        batch, plen, width = x.shape
        last = len(self.layers) - 1
        for i, ((ln1_w, ln1_b), (qkv_fn, _), (_, proj), (ln2_w, ln2_b), (fc, _), (_, out)) in enumerate(
            self.layers
        ):
            qkv = qkv_fn(F.layer_norm(x, (width,), ln1_w, ln1_b, self.eps))
            qkv = qkv.view(batch, plen, self.n_head, 3, self.head_dim)
            layer_cache = cache[i]
            layer_cache[:, :, :, :plen].copy_(qkv[:, :, :, 1:].permute(0, 2, 3, 1, 4))
            q = qkv[:, :, :, 0].transpose(1, 2)  # (B, H, P, D)
            if i == last:
                q, mask, x = q[:, :, -1:], mask[:, :, -1:], x[:, -1:]
            att = F.scaled_dot_product_attention(
                q.to(self.cache_dtype),
                layer_cache[:, :, 0, :plen],
                layer_cache[:, :, 1, :plen],
                attn_mask=mask,
                scale=1.0,
            )
            att = att.transpose(1, 2).reshape(batch, -1, width).to(x.dtype)
            x = proj(att, x)
            x = out(fc(F.layer_norm(x, (width,), ln2_w, ln2_b, self.eps)), x)
        return x[:, -1]

    def _step(self, x: torch.Tensor, cache: torch.Tensor, t: int, key_bias: torch.Tensor) -> torch.Tensor:
        """One decode step: x (B, C) at cache slot t, key_bias (B*H, 1, >t) -> hidden state (B, C)."""
        batch, width = x.shape
        heads, dim, end = batch * self.n_head, self.head_dim, t + 1
        bias = key_bias[:, :, :end]
        for layer, layer_cache in zip(self.layers, cache):
            (ln1_w, ln1_b), (qkv_fn, _), (_, proj), (ln2_w, ln2_b), (fc, _), (_, out) = layer
            qkv = qkv_fn(F.layer_norm(x, (width,), ln1_w, ln1_b, self.eps)).view(batch, self.n_head, 3, dim)
            layer_cache[:, :, :, t].copy_(qkv[:, :, 1:])
            keys = layer_cache[:, :, 0, :end].view(heads, end, dim)
            values = layer_cache[:, :, 1, :end].view(heads, end, dim)
            q = qkv[:, :, 0].view(heads, 1, dim).to(self.cache_dtype)
            att = torch.bmm(torch.baddbmm(bias, q, keys.transpose(1, 2)).softmax(-1), values)
            x = proj(att.view(batch, width).to(x.dtype), x)
            x = out(fc(F.layer_norm(x, (width,), ln2_w, ln2_b, self.eps)), x)
        return x

    def decode_parts(self, prompts: list[list[int]], parts: int, *, max_new: int, **settings: Any):
        """`decode` over `parts` slices of the batch, side by side in Python threads: lists of (tokens, logprobs).

        The uniform draws of the whole rollout come from the generator first (row i's draws are the same however
        the batch is split), so results do not depend on thread timing.
        """
        batch = len(prompts)
        uniforms = None
        if not settings["greedy"]:
            uniforms = torch.rand(max_new, 2, batch, 1, generator=settings["generator"], device=self.device)
        bounds = [batch * i // parts for i in range(parts + 1)]
        slices = [slice(a, b) for a, b in zip(bounds, bounds[1:])]
        results: list[Any] = [None] * parts

        def work(i: int) -> None:
            try:
                torch.set_num_threads(1)  # this thread's own OpenMP setting
                with torch.inference_mode():
                    u = None if uniforms is None else uniforms[:, :, slices[i]]
                    results[i] = self.decode(prompts[slices[i]], max_new=max_new, uniforms=u, **settings)
            except BaseException as error:  # re-raised in the calling thread
                results[i] = error

        workers = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(1, parts)]
        for w in workers:
            w.start()
        work(0)
        for w in workers:
            w.join()
        for r in results:
            if isinstance(r, BaseException):
                raise r
        return [r[0] for r in results], [r[1] for r in results]

    def decode(
        self,
        prompts: list[list[int]],
        *,
        max_new: int,
        eos: int,
        pad: int,
        uniforms: torch.Tensor | None = None,
        **choice: Any,
    ):
        """(tokens (B, t), logprobs (B, t)) with -1 where a row was no longer generating.

        `uniforms` (max_new, 2, B, 1): the random draws of every step (else drawn from the generator per step).
        """
        # logits / T == (ln_f with weight and bias / T) @ head: the temperature costs no (B, V) pass per step.
        ln_f = tuple(w / choice["temperature"] for w in self.ln_f)
        width = self.wte.shape[1]

        def logits_of(h: torch.Tensor) -> torch.Tensor:
            return self.head(F.layer_norm(h, (width,), *ln_f, self.eps))

        # A prompt given several times (K responses per prompt) is prefilled once, its cache rows then copied.
        first: dict[tuple[int, ...], int] = {}
        source = [first.setdefault(tuple(p), len(first)) for p in prompts]
        ids, mask = _left_pad([list(p) for p in first], pad, self.device)
        batch, (n_unique, plen) = len(prompts), ids.shape
        total = plen + max_new
        cache = torch.empty(
            (len(self.layers), n_unique, self.n_head, 2, total, self.head_dim),
            dtype=self.cache_dtype,
            device=self.device,
        )
        # Query rows of padding attend to themselves only (their output is never used, but a fully masked row would
        # give NaN).
        causal = torch.ones((plen, plen), dtype=torch.bool, device=self.device).tril()
        allowed = (causal[None] & (mask[:, None, :] == 1)) | torch.eye(
            plen, dtype=torch.bool, device=self.device
        )
        prefill_mask = torch.zeros((n_unique, 1, plen, plen), dtype=self.cache_dtype, device=self.device)
        prefill_mask.masked_fill_(~allowed[:, None], -math.inf)
        x = F.embedding(ids, self.wte) + F.embedding(position_ids_for(mask), self.wpe)
        logits = logits_of(self._prefill(x, cache, prefill_mask))
        if n_unique < batch:
            src = torch.tensor(source, device=self.device)
            cache, logits, mask = (
                cache.index_select(1, src),
                logits.index_select(0, src),
                mask.index_select(0, src),
            )
        # Additive key mask of the decode steps, built once: -inf on left padding; one row per head, so that a step
        # reads it as a (B*H, 1, S) view.
        key_bias = torch.zeros((batch, 1, 1, total), dtype=self.cache_dtype, device=self.device)
        key_bias[:, :, :, :plen].masked_fill_(mask[:, None, None, :] == 0, -math.inf)
        key_bias = key_bias.expand(batch, self.n_head, 1, total).reshape(batch * self.n_head, 1, total)
        # Positional rows of every step, gathered once: row i's t-th response token sits at position len_i + t.
        step_pos = mask.sum(1)[None, :] + torch.arange(max_new, device=self.device)[:, None]  # (T, B)
        step_pe = F.embedding(step_pos.clamp(max=self.wpe.shape[0] - 1), self.wpe)  # (T, B, C)

        rows = torch.arange(batch, device=self.device)  # original row of each active row
        done = torch.zeros(batch, dtype=torch.bool, device=self.device)
        steps: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        for t in range(max_new):
            token, lp = _choose(logits, **choice, scaled=True, u=None if uniforms is None else uniforms[t])
            steps.append((rows, token, lp))
            done = done | (token == eos)
            n_done = int(done.sum())
            if t == max_new - 1 or n_done == done.shape[0]:
                break
            if (
                n_done and n_done * 4 >= done.shape[0]
            ):  # drop finished rows once they are a quarter of the batch
                keep = (~done).nonzero().squeeze(1)
                rows, token, done = rows[keep], token[keep], done[keep]
                cache = cache.index_select(1, keep)
                key_bias = key_bias.view(-1, self.n_head, 1, total).index_select(0, keep).flatten(0, 1)
                step_pe = step_pe.index_select(1, keep)
                uniforms = None if uniforms is None else uniforms.index_select(2, keep)
            x = F.embedding(token, self.wte) + step_pe[t]
            logits = logits_of(self._step(x, cache, plen + t, key_bias))

        tokens = torch.full((batch, len(steps)), -1, dtype=torch.long, device=self.device)
        logprobs = torch.zeros((batch, len(steps)), dtype=torch.float32, device=self.device)
        for t, (row, token, lp) in enumerate(steps):
            tokens[row, t] = token
            logprobs[row, t] = lp.float()
        return tokens, logprobs
