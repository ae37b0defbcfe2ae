"""A GPT-2 trunk forward that runs its linear layers on real tokens only.

A PPO rollout's layout pads every prompt on the left to the longest and every response on the right to the
longest: with real prompts of varied length (28 tokens on average, 49 at most in the demo) and responses that stop
at EOS, 40 % of the (B, L) grid can be padding. Hugging Face's forward runs every linear layer over all of it.
Here the token rows are gathered once, each block's projections and MLP run on the (N, d) real rows, and only the
attention sees the padded (B, H, L, L) layout (a small share of the arithmetic at these widths; on a CPU as plain
matmuls, see `_attention`). Measured on the demo's PPO (bf16, 2 cores): a 32 x 84 policy step (half of it padding)
forward + backward 0.25 -> 0.12 s; a whole PPO iteration in fp32 3.0 -> 2.2 s. The result equals
the Hugging Face forward up to float rounding (tests/test_unpadded.py), gradients included, and pads come back as
zeros. Used where it applies (a GPT-2 trunk without dropout in play, enough padding to pay for the gathers);
otherwise the Hugging Face forward runs.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

# below this share of real tokens the gathers pay for themselves (a full grid runs the Hugging Face forward)
MAX_REAL_SHARE = 0.9
# up to this many (B, H, L, L_keys) scores (64 MiB of fp32) attention runs as plain matmuls on a CPU (`_attention`)
MATH_ATTENTION_MAX_SCORES = 1 << 24


def _attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, kernel_without_grad: bool = False
) -> torch.Tensor:
    """softmax(q k^T / sqrt(hd) masked) v. For short sequences the plain matmuls beat the CPU flash kernel, whose
    backward with a mask costs more than all the linear layers here (measured: 49 of 140 ms of a 32 x 84 step).
    Without a backward the kernel wins (DPO's no-grad reference pass over HH-RLHF pairs in bf16: 1.43 -> 0.72 s),
    but in bf16 it rounds differently from the matmuls (about one ulp of the output), so it runs only where the
    caller asks: not for PPO, whose no-grad log-probs are the ratio's denominator for the same tokens' gradient pass."""
    backward = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if (
        (kernel_without_grad and not backward)
        or q.shape[:-1].numel() * k.shape[-2] > MATH_ATTENTION_MAX_SCORES
        or q.device.type != "cpu"
    ):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    scores = (q @ k.transpose(-1, -2)).float() * q.shape[-1] ** -0.5  # (B, H, L, Lk)
    weights = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
    return weights.to(v.dtype) @ v


def applies(trunk: torch.nn.Module, attention_mask: torch.Tensor, columns: int) -> bool:
    """Whether `trunk_forward` takes the unpadded path for this batch."""
    config = getattr(trunk, "config", None)
    if type(trunk).__name__ != "GPT2Model" or config is None:
        return False
    if getattr(config, "add_cross_attention", False) or not getattr(config, "scale_attn_weights", True):
        return False
    if getattr(config, "scale_attn_by_inverse_layer_idx", False) or getattr(
        config, "reorder_and_upcast_attn", False
    ):
        return False
    dropout = max(config.embd_pdrop, config.attn_pdrop, config.resid_pdrop) > 0
    if trunk.training and dropout:
        return False
    real = attention_mask[:, attention_mask.shape[1] - columns :]
    return float(real.float().mean()) < MAX_REAL_SHARE


def trunk_forward(
    trunk: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    past: Any | None = None,
    use_cache: bool = False,
    kernel_without_grad: bool = False,
) -> tuple[torch.Tensor, Any | None]:
    """(last hidden states (B, L, d), KV cache or None) of `trunk` over `input_ids` (B, L), like
    `trunk(input_ids=, attention_mask=, position_ids=, past_key_values=, use_cache=)`; `attention_mask` covers the
    cached columns too (B, L_past + L). `past` is extended in place, as Hugging Face does. `kernel_without_grad`:
    see `_attention`."""
    if not applies(trunk, attention_mask, input_ids.shape[1]):
        out = trunk(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past,
            use_cache=use_cache,
        )
        return out.last_hidden_state, out.past_key_values
    from transformers import DynamicCache

    batch, length = input_ids.shape
    width, heads = trunk.config.n_embd, trunk.config.n_head
    keys = attention_mask.bool()  # (B, L_past + L)
    cached = keys.shape[1] - length
    rows = keys[:, cached:].flatten().nonzero().squeeze(1)  # (N,) flat indices of the real tokens
    x = trunk.wte(input_ids.flatten()[rows]) + trunk.wpe(position_ids.flatten()[rows])  # (N, d)

    query = torch.arange(length, device=keys.device)[:, None] + cached  # (L, 1) each column's key index
    key = torch.arange(cached + length, device=keys.device)[None, :]  # (1, L_past + L)
    # causal over real keys; every query also sees itself, so a padding row never softmaxes over nothing (its NaNs
    # would reach the real keys' gradients through the attention backward)
    mask = ((keys[:, None, :] & (key <= query)) | (key == query))[:, None]  # (B, 1, L, L_past + L)

    cache = past if past is not None else (DynamicCache() if use_cache else None)
    for index, block in enumerate(trunk.h):

        def layer(
            x: torch.Tensor, block: Any = block, index: int = index
        ) -> torch.Tensor:  # (N, d) -> (N, d)
            qkv = block.attn.c_attn(block.ln_1(x))  # (N, 3d)
            grid = qkv.new_zeros(batch * length, 3 * width).index_copy(0, rows, qkv)
            q, k, v = grid.view(batch, length, 3, heads, width // heads).permute(2, 0, 3, 1, 4).unbind(0)
            if cache is not None:  # q, k, v: (B, H, L, hd); k, v then (B, H, L_past + L, hd)
                k, v = cache.update(k, v, index)
            attended = _attention(q, k, v, mask, kernel_without_grad)  # (B, H, L, hd)
            x = x + block.attn.c_proj(attended.transpose(1, 2).reshape(batch * length, width)[rows])
            return x + block.mlp.c_proj(block.mlp.act(block.mlp.c_fc(block.ln_2(x))))

        # recompute in backward when asked, as the Hugging Face layer would (never while a cache is written: the
        # replay would write it twice)
        replay = (
            getattr(block, "gradient_checkpointing", False) and block.training and torch.is_grad_enabled()
        )
        x = block._gradient_checkpointing_func(layer, x) if replay and cache is None else layer(x)
    x = trunk.ln_f(x)
    return x.new_zeros(batch * length, width).index_copy(0, rows, x).view(batch, length, width), cache
