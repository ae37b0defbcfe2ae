"""Kendall's tau-b and pairwise agreement on hand-computed rankings."""

from __future__ import annotations

import math

import pytest

from rlhf.feedback.agreement import batch_agreement, kendall_tau, pairwise_counts


def test_kendall_tau_hand_values():
    assert kendall_tau([1, 2, 3, 4], [1, 2, 3, 4]) == 1.0
    assert kendall_tau([1, 2, 3, 4], [4, 3, 2, 1]) == -1.0
    # one swapped pair of six: (5 - 1) / 6
    assert kendall_tau([1, 2, 3, 4], [2, 1, 3, 4]) == pytest.approx(4 / 6)
    # a tie in the first ranking: tau-b = 5 / sqrt((6 - 1) * 6)
    assert kendall_tau([1, 1, 2, 3], [1, 2, 3, 4]) == pytest.approx(5 / math.sqrt(30))
    assert kendall_tau([1, 1, 1], [1, 2, 3]) is None  # all tied: undefined


def test_pairwise_counts_ignore_ties():
    assert pairwise_counts([1, 2, 3, 4], [2, 1, 3, 4]) == (5, 6)
    assert pairwise_counts([1, 1, 2, 3], [1, 2, 3, 4]) == (5, 5)


def test_batch_agreement_averages_over_item_pairs():
    result = batch_agreement([[[1, 2, 3, 4], [2, 1, 3, 4]], [[1, 2], [1, 2], [2, 1]], [[1, 2, 3]]])
    # item 1: tau 4/6; item 2: pairs (a,b) 1, (a,c) -1, (b,c) -1; item 3: one ranking, ignored
    assert result["items"] == 2 and result["annotator_pairs"] == 4
    assert result["kendall_tau"] == pytest.approx((4 / 6 + 1 - 1 - 1) / 4)
    assert result["pairwise_agreement"] == pytest.approx((5 + 1) / (6 + 3))
    assert batch_agreement([])["kendall_tau"] is None
