"""Every loss and estimator as a pure function over tensors. Imports nothing of the project.

Sections: masked reductions; reward model (ranking) losses; PPO (GAE, surrogate, value loss, KL estimators);
DPO. Each function is unit-tested on hand-written numbers in tests/test_losses_*.py.
"""

from __future__ import annotations

import torch

# ---------------------------------------------------------------------------------------------------------------
# Masked reductions


def masked_sum(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    mask = mask.to(values.dtype)
    return (values * mask).sum() if dim is None else (values * mask).sum(dim)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean over positions where mask is 1 (0 when there are none)."""
    mask = mask.to(values.dtype)
    if dim is None:
        return (values * mask).sum() / mask.sum().clamp(min=1.0)
    return (values * mask).sum(dim) / mask.sum(dim).clamp(min=1.0)


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    mean = masked_mean(values, mask)
    var = masked_mean((values - mean) ** 2, mask)
    if unbiased:
        n = mask.to(values.dtype).sum()
        var = var * n / (n - 1).clamp(min=1.0)
    return var


def masked_whiten(
    values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    """Normalise to unit variance over masked positions (and zero mean unless shift_mean=False)."""
    mean, var = masked_mean(values, mask), masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask.to(values.dtype)


# ---------------------------------------------------------------------------------------------------------------
# Reward model (ranking) losses


def pairwise_loss(
    chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | float = 0.0, reduction: str = "mean"
) -> torch.Tensor:
    """Bradley-Terry: -log sigmoid(r_chosen - r_rejected - margin), per pair (reduction "none") or its mean."""
    losses = -torch.nn.functional.logsigmoid(chosen - rejected - margin)
    return losses.mean() if reduction == "mean" else losses


def ranking_pair_mask(ranks: torch.Tensor) -> torch.Tensor:
    """(B, K, K) bool: [b, i, j] is True when response i is ranked better than j (rank 0 = padding, no pairs).

    Ties (equal ranks) give no pair; a ranking of K distinct ranks gives K(K-1)/2 pairs.
    """
    valid = ranks > 0  # (B, K)
    better = ranks.unsqueeze(2) < ranks.unsqueeze(1)  # (B, K, K)
    return better & valid.unsqueeze(2) & valid.unsqueeze(1)


def ranking_loss(
    scores: torch.Tensor, ranks: torch.Tensor, margin: torch.Tensor | float = 0.0
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """InstructGPT's K-way loss: every pair of one ranking, each response scored once.

    scores (B, K) rewards; ranks (B, K) long, 1 = best, 0 marks a padded slot (rankings with fewer than K
    responses). loss = mean over rankings of [mean over that ranking's pairs of -log sigmoid(r_w - r_l - margin)];
    rankings without a pair (all tied) are left out. Returns (loss, stats) with stats "pairs" (count),
    "accuracy" (fraction of pairs ordered right, ties of scores count half) and "margin" (mean r_w - r_l).
    """
    pairs = ranking_pair_mask(ranks)  # (B, K, K)
    diff = scores.unsqueeze(2) - scores.unsqueeze(1)  # (B, K, K): r_i - r_j
    losses = -torch.nn.functional.logsigmoid(diff - margin)
    weight = pairs.to(scores.dtype)
    per_ranking_pairs = weight.sum((1, 2))  # (B,)
    has_pairs = per_ranking_pairs > 0
    per_ranking = (losses * weight).sum((1, 2)) / per_ranking_pairs.clamp(min=1.0)
    loss = per_ranking[has_pairs].mean() if has_pairs.any() else scores.sum() * 0.0
    n = weight.sum().clamp(min=1.0)
    with torch.no_grad():
        right = (diff > 0).to(scores.dtype) + 0.5 * (diff == 0).to(scores.dtype)
        stats = {
            "pairs": weight.sum().detach(),
            "accuracy": (right * weight).sum() / n,
            "margin": (diff.detach() * weight).sum() / n,
        }
    return loss, stats


# ---------------------------------------------------------------------------------------------------------------
# PPO
#
# Tensors are (B, T) over response tokens; `mask` is 1 on real response tokens (the EOS included), 0 on padding.
# Losses take an optional `normalizer` (the number of real tokens of the whole minibatch): summing token losses
# and dividing by it makes 2 accumulated half-minibatches give exactly the gradient of 1 full minibatch.


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, https://arxiv.org/abs/1506.02438), vectorised.

    delta_t = r_t + gamma * V_{t+1} - V_t (V = 0 past the last real token), A_t = sum_k (gamma*lam)^k delta_{t+k}.
    Computed as one (B, T) x (T, T) product with the discount matrix instead of a Python loop over T.
    Returns (advantages, returns = advantages + values), both zero on padding.
    """
    m = mask.to(values.dtype)
    values, rewards = values * m, rewards * m  # (B, T)
    next_values = torch.nn.functional.pad(values[:, 1:], (0, 1))  # (B, T): V_{t+1}, 0 after the end
    deltas = (rewards + gamma * next_values - values) * m  # (B, T)
    steps = torch.arange(values.shape[1], device=values.device)
    offset = steps[None, :] - steps[:, None]  # (T, T): k - t
    powers = (gamma * lam) ** offset.clamp(min=0).to(values.dtype)  # (T, T)
    discount = torch.where(offset >= 0, powers, torch.zeros((), dtype=values.dtype))  # upper triangle
    advantages = (deltas @ discount.T) * m  # (B, T)
    return advantages, (advantages + values) * m


def rloo_advantages(
    rewards: torch.Tensor, mask: torch.Tensor, group_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE leave-one-out advantages (Kool et al. 2019; Ahmadian et al. 2024, https://arxiv.org/abs/2402.14740).

    Rows come in groups of `group_size` consecutive responses to the same prompt. Each response's return is the sum
    of its token rewards (gamma = 1), and its baseline the mean return of the other responses in its group: an
    unbiased, value-model-free baseline. Every real token of a response gets its advantage. Returns (advantages,
    returns), both (B, T) and zero on padding; `returns` broadcasts each response's return over its tokens.
    """
    batch = rewards.shape[0]
    if group_size < 2 or batch % group_size:
        raise ValueError(f"rloo needs groups of >= 2 responses, got {batch} rows in groups of {group_size}")
    m = mask.to(rewards.dtype)
    total = (rewards * m).sum(1).view(-1, group_size)  # (G, k): each response's return
    baseline = (total.sum(1, keepdim=True) - total) / (group_size - 1)  # (G, k): mean of the other k - 1
    advantages = (total - baseline).reshape(batch, 1) * m  # (B, T)
    return advantages, total.reshape(batch, 1) * m


def kl_k1(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token k1 = log p(x) - log p_ref(x) for x ~ p: unbiased for KL(p||p_ref), high variance, can be < 0."""
    return logprobs - ref_logprobs


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token k3 = (r - 1) - log r with r = p_ref/p (http://joschu.net/blog/kl-approx.html): unbiased, >= 0."""
    log_ratio = ref_logprobs - logprobs
    return torch.expm1(log_ratio) - log_ratio


def kl_exact(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Exact KL(p || p_ref) = sum_v p_v (log p_v - log p_ref_v) at each position, from full log-probabilities over the
    vocabulary (..., V) -> (...). No sampling noise: its gradient pulls every token's probability back towards the
    reference at each visited state, not only the sampled token's."""
    dtype = torch.promote_types(logprobs.dtype, ref_logprobs.dtype)
    # broadcasting (and its gradient's reduction) by autograd; the fused function sees equal shapes
    logprobs, ref_logprobs = torch.broadcast_tensors(logprobs.to(dtype), ref_logprobs.to(dtype))
    return _ExactKL.apply(logprobs, ref_logprobs)


_BLOCK_ELEMENTS = 1 << 17  # 512 KiB of fp32


def _block_rows(width: int) -> int:
    """Rows of (..., width) per block, so a block's exp and products stay in cache."""
    return max(1, _BLOCK_ELEMENTS // max(width, 1))


class _ExactKL(torch.autograd.Function):
    """sum_v p_v (log p_v - log q_v) with p = exp(log p), in one blocked pass forward and one backward instead of
    the six full passes (and their saved (..., V) intermediates) that autograd over exp/sub/mul/where takes; on the
    demo's (M, 4096) rows that was a sixth of a PPO update. d/d log p_v = p_v (log p_v - log q_v + 1),
    d/d log q_v = -p_v; a p = 0 (a -inf log-prob) term contributes 0 and gets 0 gradient, not NaN."""

    @staticmethod
    def forward(ctx, logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(logprobs, ref_logprobs)
        lp, lq = (t.reshape(-1, t.shape[-1]) for t in (logprobs, ref_logprobs))  # (R, V)
        out = torch.empty(lp.shape[0], dtype=lp.dtype, device=lp.device)
        step = _block_rows(lp.shape[1])
        for i in range(0, lp.shape[0], step):
            block = slice(i, i + step)
            probs = lp[block].exp()
            out[block] = (lp[block] - lq[block]).mul_(probs).masked_fill_(probs == 0, 0.0).sum(-1)
        return out.view(logprobs.shape[:-1])

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        logprobs, ref_logprobs = ctx.saved_tensors
        lp, lq = (t.reshape(-1, t.shape[-1]) for t in (logprobs, ref_logprobs))  # (R, V)
        g = grad.reshape(-1, 1)
        want_p, want_q = ctx.needs_input_grad
        grad_p = torch.empty_like(lp) if want_p else None
        grad_q = torch.empty_like(lq) if want_q else None
        step = _block_rows(lp.shape[1])
        for i in range(0, lp.shape[0], step):
            block = slice(i, i + step)
            probs = lp[block].exp().mul_(g[block])  # g p
            if want_p:
                terms = (lp[block] - lq[block]).add_(1.0).mul_(probs)
                grad_p[block] = terms.masked_fill_(probs == 0, 0.0)
            if want_q:
                grad_q[block] = -probs
        return (
            None if grad_p is None else grad_p.view(logprobs.shape),
            None if grad_q is None else grad_q.view(ref_logprobs.shape),
        )


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip: float = 0.2,
    normalizer: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate (Schulman et al. 2017, https://arxiv.org/abs/1707.06347), to minimise:

    mean over tokens of max(-A * ratio, -A * clip(ratio, 1-eps, 1+eps)), ratio = exp(logp - logp_old).
    Stats (no grad): clipfrac (share of tokens where the clipped term was chosen), approx_kl (k3 of old vs new),
    ratio (mean).
    """
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    per_token = torch.maximum(unclipped, clipped)
    loss = _token_reduce(per_token, mask, normalizer)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).to(per_token.dtype), mask),
            "approx_kl": masked_mean(torch.expm1(-log_ratio) + log_ratio, mask),
            "ratio": masked_mean(ratio, mask),
        }
    return loss, stats


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip: float = 0.2,
    normalizer: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss: 0.5 * max((V - R)^2, (clip(V, V_old - eps, V_old + eps) - R)^2), token mean."""
    clipped_values = old_values + torch.clamp(values - old_values, -clip, clip)
    loss_unclipped = (values - returns) ** 2
    loss_clipped = (clipped_values - returns) ** 2
    per_token = 0.5 * torch.maximum(loss_unclipped, loss_clipped)
    loss = _token_reduce(per_token, mask, normalizer)
    with torch.no_grad():
        stats = {"clipfrac": masked_mean((loss_clipped > loss_unclipped).to(per_token.dtype), mask)}
    return loss, stats


def _token_reduce(
    per_token: torch.Tensor, mask: torch.Tensor, normalizer: float | torch.Tensor | None
) -> torch.Tensor:
    if normalizer is None:
        return masked_mean(per_token, mask)
    return masked_sum(per_token, mask) / normalizer


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) over the last axis: logsumexp(z) - sum softmax(z) * z. (..., V) -> (...)."""
    logits = logits.float()
    probs = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(-1)


def entropy_from_logprobs(logprobs: torch.Tensor) -> torch.Tensor:
    """Entropy -sum p log p from full log-probabilities (a log_softmax already computed). (..., V) -> (...)."""
    logprobs = logprobs.float()
    # sum_v p_v log p_v a block of rows at a time, so each block's exp stays in cache for the product (one pass over
    # memory, not three; measured 0.8 ms vs 1.4 ms unblocked and 4.4 ms as a batched (1, V) x (V, 1) matmul, for
    # 192 x 8192 on one core)
    flat = logprobs.reshape(-1, logprobs.shape[-1])
    entropy = torch.empty(flat.shape[0], dtype=flat.dtype, device=flat.device)
    rows = _block_rows(flat.shape[1])
    for i in range(0, flat.shape[0], rows):
        block = flat[i : i + rows]
        entropy[i : i + rows] = (block.exp() * block).sum(-1).neg_()
    entropy = entropy.view(logprobs.shape[:-1])
    if torch.isfinite(entropy).all():
        return entropy
    # a -inf log-prob (p = 0) makes 0 * -inf = NaN there: clamp it so it contributes 0 * finite = 0
    return -(logprobs.exp() * logprobs.clamp(min=torch.finfo(logprobs.dtype).min)).sum(-1)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 - Var[R - V] / Var[R] over masked tokens: 1 = perfect value predictions, 0 = no better than a constant."""
    var_returns = masked_var(returns, mask, unbiased=False)
    var_error = masked_var(returns - values, mask, unbiased=False)
    return 1.0 - var_error / var_returns.clamp(min=1e-12)


# ---------------------------------------------------------------------------------------------------------------
# DPO


def dpo_loss(
    policy_chosen_logps: torch.Tensor,  # (B,) summed log-prob of each chosen response under the policy
    policy_rejected_logps: torch.Tensor,  # (B,)
    ref_chosen_logps: torch.Tensor,  # (B,) the same under the frozen reference
    ref_rejected_logps: torch.Tensor,  # (B,)
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    loss_type: str = "sigmoid",
    chosen_lengths: torch.Tensor | None = None,  # (B,) response token counts, used by "ipo" only
    rejected_lengths: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair DPO losses (B,) and the implicit rewards beta*log(pi/ref) of chosen and rejected (B,), detached.

    "sigmoid" is DPO (Rafailov et al. 2023, https://arxiv.org/abs/2305.18290, eq. 7):
    -log sigmoid(beta * h) with h = (log pi_c - log ref_c) - (log pi_r - log ref_r); with `label_smoothing` e > 0
    it is conservative DPO, which assumes a fraction e of labels is flipped: -(1-e) log s(beta h) - e log s(-beta h).
    "ipo" is IPO (Azar et al. 2023, https://arxiv.org/abs/2310.12036, eq. 17): (h - 1/(2 beta))^2, with each
    log-ratio divided by its response length when lengths are given (per-token averages, as its authors use).
    """
    chosen_ratio = policy_chosen_logps - ref_chosen_logps
    rejected_ratio = policy_rejected_logps - ref_rejected_logps
    chosen_rewards, rejected_rewards = beta * chosen_ratio.detach(), beta * rejected_ratio.detach()
    if loss_type == "sigmoid":
        h = chosen_ratio - rejected_ratio
        losses = -(1.0 - label_smoothing) * torch.nn.functional.logsigmoid(beta * h)
        if label_smoothing:
            losses = losses - label_smoothing * torch.nn.functional.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        if chosen_lengths is not None and rejected_lengths is not None:
            chosen_ratio = chosen_ratio / chosen_lengths.to(chosen_ratio.dtype).clamp(min=1.0)
            rejected_ratio = rejected_ratio / rejected_lengths.to(rejected_ratio.dtype).clamp(min=1.0)
        losses = (chosen_ratio - rejected_ratio - 1.0 / (2.0 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss_type {loss_type!r} (sigmoid or ipo)")
    return losses, chosen_rewards, rejected_rewards
