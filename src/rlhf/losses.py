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


# ---------------------------------------------------------------------------------------------------------------
# PPO


# ---------------------------------------------------------------------------------------------------------------
# DPO
