"""DPO: the loss on hand-computed numbers; the stage learns a planted preference; resume; LoRA reference."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf.losses import dpo_loss


def test_dpo_loss_hand_computed():
    # pair 0: log-ratios chosen +1, rejected -1 -> h = 2; pair 1: everything equal -> h = 0
    pc = torch.tensor([-10.0, -5.0], requires_grad=True)
    pr = torch.tensor([-12.0, -5.0])
    rc = torch.tensor([-11.0, -5.0])
    rr = torch.tensor([-11.0, -5.0])
    losses, chosen, rejected = dpo_loss(pc, pr, rc, rr, beta=0.5)
    # -log sigmoid(0.5 * 2) = log(1 + e^-1) = 0.3132617; -log sigmoid(0) = log 2
    torch.testing.assert_close(losses, torch.tensor([0.3132617, math.log(2.0)]))
    torch.testing.assert_close(chosen, torch.tensor([0.5, 0.0]))
    torch.testing.assert_close(rejected, torch.tensor([-0.5, 0.0]))
    assert not chosen.requires_grad
    losses[0].backward()
    # d/d pc of -log sigmoid(beta h) = -beta * sigmoid(-beta h) = -0.5 * sigmoid(-1) = -0.1344707
    torch.testing.assert_close(pc.grad, torch.tensor([-0.1344707, 0.0]))

    # conservative DPO, 10% flipped labels: 0.9 * log(1+e^-1) + 0.1 * log(1+e^1) = 0.2819355 + 0.1313262
    smoothed, _, _ = dpo_loss(pc[:1], pr[:1], rc[:1], rr[:1], beta=0.5, label_smoothing=0.1)
    torch.testing.assert_close(smoothed, torch.tensor([0.4132617]))


def test_ipo_loss_hand_computed():
    pc, pr, rc, rr = (torch.tensor([v]) for v in (-10.0, -12.0, -11.0, -11.0))
    # beta 0.5 -> target margin 1/(2 beta) = 1; h = 2 -> (2 - 1)^2 = 1
    losses, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.5, loss_type="ipo")
    torch.testing.assert_close(losses, torch.tensor([1.0]))
    # per-token averages: chosen 1/2 = 0.5, rejected -1/4 = -0.25 -> (0.75 - 1)^2 = 0.0625
    losses, chosen, _ = dpo_loss(
        pc,
        pr,
        rc,
        rr,
        beta=0.5,
        loss_type="ipo",
        chosen_lengths=torch.tensor([2]),
        rejected_lengths=torch.tensor([4]),
    )
    torch.testing.assert_close(losses, torch.tensor([0.0625]))
    torch.testing.assert_close(chosen, torch.tensor([0.5]))  # rewards stay beta * summed log-ratio
    with pytest.raises(ValueError, match="loss_type"):
        dpo_loss(pc, pr, rc, rr, loss_type="hinge")
