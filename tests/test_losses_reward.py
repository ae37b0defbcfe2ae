"""Reward-model losses against hand-computed values (log(1 + e^-x) written out)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from rlhf.losses import pairwise_loss, ranking_loss, ranking_pair_mask

SP1 = 0.31326168751822286  # -log sigmoid(1) = log(1 + e^-1)
SP2 = 0.12692801104297263  # -log sigmoid(2)
LOG2 = math.log(2.0)  # -log sigmoid(0)


def test_pairwise_loss_hand_values():
    chosen = torch.tensor([1.0, 0.0, 2.0])
    rejected = torch.tensor([0.0, 2.0, 0.0])
    per_pair = pairwise_loss(chosen, rejected, reduction="none")
    assert per_pair.tolist() == pytest.approx([SP1, 2.1269280110429727, SP2], abs=1e-6)
    assert pairwise_loss(chosen, rejected).item() == pytest.approx(
        (SP1 + 2.1269280110429727 + SP2) / 3, abs=1e-6
    )
    # a margin of 1 turns a gap of 1 into a gap of 0
    assert pairwise_loss(torch.tensor([1.0]), torch.tensor([0.0]), margin=1.0).item() == pytest.approx(LOG2)


def test_ranking_loss_three_way_hand_value():
    scores = torch.tensor([[3.0, 1.0, 2.0]])
    ranks = torch.tensor([[1, 3, 2]])  # pairs (0>1: gap 2), (0>2: gap 1), (2>1: gap 1)
    loss, stats = ranking_loss(scores, ranks)
    assert loss.item() == pytest.approx((SP2 + 2 * SP1) / 3, abs=1e-6)
    assert stats["pairs"].item() == 3
    assert stats["accuracy"].item() == 1.0
    assert stats["margin"].item() == pytest.approx(4 / 3)


def test_ties_and_padding_give_no_pair():
    # ranks [1, 1, 2]: the tie (0, 1) gives no pair; (0>2) gap 0, (1>2) gap 1
    loss, stats = ranking_loss(torch.tensor([[0.0, 1.0, 0.0]]), torch.tensor([[1, 1, 2]]))
    assert stats["pairs"].item() == 2
    assert loss.item() == pytest.approx((LOG2 + SP1) / 2, abs=1e-6)
    assert stats["accuracy"].item() == pytest.approx(0.75)  # a score tie counts half
    # rank 0 marks a padded slot: its huge score must not matter
    loss, stats = ranking_loss(torch.tensor([[1.0, 0.0, 100.0]]), torch.tensor([[1, 2, 0]]))
    assert stats["pairs"].item() == 1
    assert loss.item() == pytest.approx(SP1, abs=1e-6)
    mask = ranking_pair_mask(torch.tensor([[2, 1, 0]]))
    assert mask.nonzero().tolist() == [[0, 1, 0]]


def test_batch_is_mean_over_rankings_and_all_tied_rankings_are_left_out():
    scores = torch.tensor([[3.0, 1.0, 2.0], [1.0, 0.0, 0.0], [5.0, -5.0, 0.0]])
    ranks = torch.tensor([[1, 3, 2], [1, 2, 0], [1, 1, 1]])
    loss, stats = ranking_loss(scores, ranks)
    assert stats["pairs"].item() == 4
    assert loss.item() == pytest.approx(((SP2 + 2 * SP1) / 3 + SP1) / 2, abs=1e-6)
    # nothing to learn from at all: zero loss that still backpropagates
    s = torch.tensor([[1.0, 2.0]], requires_grad=True)
    loss, _ = ranking_loss(s, torch.tensor([[1, 1]]))
    loss.backward()
    assert loss.item() == 0.0 and s.grad.abs().sum().item() == 0.0


def test_k_way_loss_equals_mean_of_its_pairwise_losses():
    gen = torch.Generator().manual_seed(0)
    for k in (2, 4, 9):
        scores = torch.randn(1, k, generator=gen, requires_grad=True)
        ranks = torch.randperm(k, generator=gen).unsqueeze(0) + 1
        k_way, stats = ranking_loss(scores, ranks, margin=0.3)
        chosen, rejected = [], []
        for i, j in itertools.permutations(range(k), 2):
            if ranks[0, i] < ranks[0, j]:
                chosen.append(scores[0, i])
                rejected.append(scores[0, j])
        pairwise = pairwise_loss(torch.stack(chosen), torch.stack(rejected), margin=0.3)
        assert len(chosen) == k * (k - 1) // 2 == stats["pairs"].item()
        assert k_way.item() == pytest.approx(pairwise.item(), abs=1e-6)
        g_kway = torch.autograd.grad(k_way, scores)[0]
        g_pair = torch.autograd.grad(pairwise, scores)[0]
        assert torch.allclose(g_kway, g_pair, atol=1e-6)
