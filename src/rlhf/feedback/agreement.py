"""Inter-annotator agreement on overlapping items: Kendall's tau-b and pairwise agreement.

Rankings use the records' convention: a lower rank is better, equal ranks are ties.
"""

from __future__ import annotations

import math
from itertools import combinations


def _pair_counts(a: list[int], b: list[int]) -> tuple[int, int, int, int, int]:
    """(concordant, discordant, tied only in a, tied only in b, pairs) over all response pairs."""
    concordant = discordant = ties_a = ties_b = pairs = 0
    for i, j in combinations(range(len(a)), 2):
        pairs += 1
        da, db = a[i] - a[j], b[i] - b[j]
        if da == 0 and db == 0:
            continue
        if da == 0:
            ties_a += 1
        elif db == 0:
            ties_b += 1
        elif (da > 0) == (db > 0):
            concordant += 1
        else:
            discordant += 1
    return concordant, discordant, ties_a, ties_b, pairs


def kendall_tau(a: list[int], b: list[int]) -> float | None:
    """Kendall's tau-b of two rankings of the same responses; None when either ranking is all ties."""
    if len(a) != len(b):
        raise ValueError(f"rankings of different lengths: {len(a)} and {len(b)}")
    c, d, _, _, n0 = _pair_counts(a, b)
    tied_a = sum(1 for i, j in combinations(range(len(a)), 2) if a[i] == a[j])
    tied_b = sum(1 for i, j in combinations(range(len(b)), 2) if b[i] == b[j])
    denominator = math.sqrt((n0 - tied_a) * (n0 - tied_b))
    return None if denominator == 0 else (c - d) / denominator


def pairwise_counts(a: list[int], b: list[int]) -> tuple[int, int]:
    """(agreeing pairs, pairs both annotators ordered strictly)."""
    c, d, *_ = _pair_counts(a, b)
    return c, c + d


def batch_agreement(rankings_per_item: list[list[list[int]]]) -> dict:
    """Mean tau-b over (item, annotator pair) and micro-averaged pairwise agreement.

    `rankings_per_item[n]` holds the rankings different annotators gave item n; items with one ranking are ignored.
    """
    taus: list[float] = []
    agree = strict = items = comparisons = 0
    for rankings in rankings_per_item:
        if len(rankings) < 2:
            continue
        items += 1
        for a, b in combinations(rankings, 2):
            comparisons += 1
            tau = kendall_tau(a, b)
            if tau is not None:
                taus.append(tau)
            ag, st = pairwise_counts(a, b)
            agree, strict = agree + ag, strict + st
    return {
        "items": items,
        "annotator_pairs": comparisons,
        "kendall_tau": sum(taus) / len(taus) if taus else None,
        "pairwise_agreement": agree / strict if strict else None,
    }
