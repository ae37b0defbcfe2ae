"""Evaluation metrics as pure functions: diversity, entropy, KL, win rate and the best-of-n KL.

Nothing here loads a model or reads a file; `rlhf.evaluate` feeds these with samples and log-probs. Each function is
checked against a hand computation in tests/test_eval_metrics.py.

References:
- distinct-n: Li et al. 2016, "A Diversity-Promoting Objective Function for Neural Conversation Models".
- self-BLEU: Zhu et al. 2018, "Texygen" (each text scored against the others as references); BLEU with the
  add-one smoothing of Lin & Och 2004 for n >= 2 so short texts do not collapse to 0.
- best-of-n KL: Stiennon et al. 2020 / Gao et al. 2022: KL(best-of-n || base) = log n - (n-1)/n.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

import torch

_WORD = re.compile(r"\w+|[^\w\s]")


def words(text: str) -> list[str]:
    """Lower-cased words and punctuation marks: the unit of distinct-n and self-BLEU."""
    return _WORD.findall(text.lower())


def ngrams(tokens: Sequence[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct n-grams / all n-grams, pooled over `texts` (0.0 when there is no n-gram at all)."""
    grams = [g for t in texts for g in ngrams(words(t), n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def bleu(hypothesis: Sequence[str], references: Sequence[Sequence[str]], max_n: int = 4) -> float:
    """Sentence BLEU of a token list against reference token lists.

    p_n = clipped matches / hypothesis n-grams; for n >= 2 both get +1 (Lin & Och 2004) so a short text that shares
    words but no 4-gram still scores above 0; p_1 is unsmoothed (no shared word at all gives 0). Brevity penalty
    exp(1 - r/c) when the hypothesis length c is below the closest reference length r (ties: the shorter r).
    """
    c = len(hypothesis)
    if c == 0 or not references:
        return 0.0
    log_p = 0.0
    for n in range(1, max_n + 1):
        hyp = Counter(ngrams(hypothesis, n))
        max_ref: Counter = Counter()
        for ref in references:
            for gram, count in Counter(ngrams(ref, n)).items():
                max_ref[gram] = max(max_ref[gram], count)
        matches = sum(min(count, max_ref[gram]) for gram, count in hyp.items())
        total = sum(hyp.values())
        if n == 1:
            if matches == 0:
                return 0.0
            log_p += math.log(matches / total)
        else:
            log_p += math.log((matches + 1) / (total + 1))
    r = min((len(ref) for ref in references), key=lambda length: (abs(length - c), length))
    brevity = 1.0 if c >= r else math.exp(1 - r / c)
    return brevity * math.exp(log_p / max_n)


def self_bleu(texts: Sequence[str], max_n: int = 4) -> float:
    """Mean BLEU of each text against all the others (higher = less diverse); 0.0 for fewer than 2 texts."""
    tokens = [words(t) for t in texts]
    if len(tokens) < 2:
        return 0.0
    scores = [bleu(tok, tokens[:i] + tokens[i + 1 :], max_n) for i, tok in enumerate(tokens)]
    return sum(scores) / len(scores)


def mean_token_entropy(token_logprobs: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean per-token entropy estimated from the log-probs of *sampled* tokens: E[-log p(x)] = H.

    `token_logprobs` (B, T) are the log-probs of tokens sampled at temperature 1, `mask` (B, T) marks real tokens.
    The estimate is unbiased for the entropy of the sampling distribution.
    """
    mask = mask.to(token_logprobs.dtype)
    count = mask.sum()
    return float(-(token_logprobs * mask).sum() / count) if count > 0 else 0.0


def entropy_from_logprobs(logprobs: torch.Tensor, mask: torch.Tensor) -> float:
    """Exact mean entropy -sum_v p log p of full next-token distributions `logprobs` (B, T, V) over masked steps."""
    per_step = -(logprobs.exp() * logprobs).sum(-1)  # (B, T)
    mask = mask.to(per_step.dtype)
    count = mask.sum()
    return float((per_step * mask).sum() / count) if count > 0 else 0.0


def sequence_kl(
    policy_logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Per-sequence KL estimate sum_t (log pi - log ref) over response tokens sampled from pi: (B,).

    Its mean over fresh samples is an unbiased estimate of KL(pi || ref) for whole responses.
    """
    mask = mask.to(policy_logprobs.dtype)
    return ((policy_logprobs - ref_logprobs) * mask).sum(-1)


def win_rate(scores: Sequence[float], baseline: Sequence[float]) -> float:
    """Share of paired comparisons won against the baseline, ties counted half: (wins + ties/2) / n."""
    if len(scores) != len(baseline):
        raise ValueError(f"win_rate needs paired scores, got {len(scores)} and {len(baseline)}")
    if not scores:
        return float("nan")
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(scores, baseline))
    return wins / len(scores)


def win_rate_from_ranks(ranks: Sequence[Sequence[int]]) -> float:
    """Win rate of response 0 over response 1 from pairwise rankings ([1, 2] win, [2, 1] loss, [1, 1] tie)."""
    return win_rate([-r[0] for r in ranks], [-r[1] for r in ranks])


def best_of_n_kl(n: float) -> float:
    """Analytic KL(best-of-n || base) = log n - (n-1)/n (exact when the n samples' rewards are distinct)."""
    if n < 1:
        raise ValueError(f"best-of-n needs n >= 1, got {n}")
    return math.log(n) - (n - 1) / n


def best_of_n_at_kl(kl: float) -> float:
    """The (real-valued) n whose analytic best-of-n KL equals `kl`: the inverse of `best_of_n_kl`, by bisection (the
    KL rises monotonically with n). How many samples and reward-model calls per prompt best-of-n spends to move as
    far from the base as a policy that samples once."""
    if kl <= 0:
        return 1.0
    low, high = 1.0, 2.0
    while best_of_n_kl(high) < kl:  # the formula holds for real n too
        low, high = high, high * 2
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if best_of_n_kl(mid) < kl else (low, mid)
    return (low + high) / 2


def value_at_kl(points: Sequence[tuple[float, float]], kl: float) -> float | None:
    """A curve's value at `kl`, linear in sqrt(KL) between its two nearest points (Gao et al. plot in sqrt KL).

    `points` are (kl, value) pairs, e.g. best-of-n's (analytic KL, gold score) for n = 1, 2, 4, ...; None when
    `kl` lies outside the curve's KL range: comparing there would be extrapolation, not measurement.
    """
    ordered = sorted((math.sqrt(max(k, 0.0)), v) for k, v in points)
    x = math.sqrt(max(kl, 0.0))
    if not ordered or x < ordered[0][0] or x > ordered[-1][0]:
        return None
    for (x0, v0), (x1, v1) in zip(ordered, ordered[1:]):
        if x0 <= x <= x1:
            return v0 if x1 == x0 else v0 + (v1 - v0) * (x - x0) / (x1 - x0)
    return ordered[0][1]  # a single point, and kl equals it


def mean(values: Sequence[float]) -> float:
    return float(sum(values) / len(values)) if values else float("nan")


def stderr(values: Sequence[float]) -> float:
    """Standard error of the mean (0.0 for fewer than 2 values)."""
    n = len(values)
    if n < 2:
        return 0.0
    m = sum(values) / n
    return math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1) / n)
