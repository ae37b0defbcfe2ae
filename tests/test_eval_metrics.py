"""Every evaluation metric against a number worked out by hand (the arithmetic is in the comments)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from rlhf.eval_metrics import (
    best_of_n_kl,
    bleu,
    distinct_n,
    entropy_from_logprobs,
    mean_token_entropy,
    self_bleu,
    sequence_kl,
    stderr,
    win_rate,
    win_rate_from_ranks,
    words,
)


def test_words_split_punctuation_and_lowercase():
    assert words("The cat, the HAT!") == ["the", "cat", ",", "the", "hat", "!"]


def test_distinct_n_by_hand():
    texts = ["the cat sat", "the cat ran"]
    # unigrams: the cat sat the cat ran -> 6 in all, {the, cat, sat, ran} 4 distinct
    assert distinct_n(texts, 1) == pytest.approx(4 / 6)
    # bigrams: (the cat) (cat sat) (the cat) (cat ran) -> 4 in all, 3 distinct
    assert distinct_n(texts, 2) == pytest.approx(3 / 4)
    # spam has one distinct bigram out of three
    assert distinct_n(["happy happy happy happy"], 2) == pytest.approx(1 / 3)
    assert distinct_n(["one"], 2) == 0.0  # no bigram at all


def test_bleu_by_hand():
    a, b = words("a b c"), words("a b d")
    # p1 = 2/3 (a, b match); p2 = (1 + 1) / (2 + 1) = 2/3 ((a b) matches); equal lengths -> no brevity penalty
    assert bleu(a, [b], max_n=2) == pytest.approx(2 / 3)
    # with 4-grams: p3 = (0 + 1) / (1 + 1) = 1/2, p4 = (0 + 1) / (0 + 1) = 1
    assert bleu(a, [b], max_n=4) == pytest.approx((2 / 3 * 2 / 3 * 1 / 2 * 1) ** 0.25)
    # brevity penalty: c = 2 < r = 4 -> exp(1 - 4/2); p1 = 1
    assert bleu(words("a b"), [words("a b c d")], max_n=1) == pytest.approx(math.exp(-1))
    # clipping takes the max count over references: "a a" vs ["a b", "a a"] -> p1 = 2/2
    assert bleu(words("a a"), [words("a b"), words("a a")], max_n=1) == pytest.approx(1.0)
    # clipped by a single reference: "a a" vs ["a b"] -> p1 = 1/2
    assert bleu(words("a a"), [words("a b")], max_n=1) == pytest.approx(0.5)
    assert bleu(words("x y"), [words("a b")], max_n=2) == 0.0


def test_self_bleu_by_hand():
    # symmetric pair: each scores 2/3 against the other (see above)
    assert self_bleu(["a b c", "a b d"], max_n=2) == pytest.approx(2 / 3)
    assert self_bleu(["same words here"] * 3) == pytest.approx(1.0)
    assert self_bleu(["a b", "c d"], max_n=2) == 0.0
    assert self_bleu(["only one"]) == 0.0
    # three texts: "a b" vs refs {"a c", "d e"}: p1 = 1/2, p2 = (0+1)/(1+1) = 1/2 -> 1/2; "a c" likewise 1/2;
    # "d e" shares nothing -> 0. Mean = 1/3.
    assert self_bleu(["a b", "a c", "d e"], max_n=2) == pytest.approx(1 / 3)


def test_entropy_estimates_by_hand():
    logprobs = torch.tensor([[-1.0, -2.0, -9.0], [-3.0, -7.0, -7.0]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    # masked tokens: -1, -2, -3 -> mean of their negatives = 2
    assert mean_token_entropy(logprobs, mask) == pytest.approx(2.0)
    uniform = torch.full((1, 2, 4), math.log(1 / 4))  # two steps, uniform over 4 tokens
    assert entropy_from_logprobs(uniform, torch.tensor([[True, True]])) == pytest.approx(math.log(4))
    peaked = torch.log(torch.tensor([[[0.5, 0.5, 1e-30]]]))
    assert entropy_from_logprobs(peaked, torch.tensor([[True]])) == pytest.approx(math.log(2), abs=1e-6)


def test_sequence_kl_by_hand():
    policy = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, -0.5]])
    ref = torch.tensor([[-1.5, -1.0, -8.0], [-1.0, -1.0, -1.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    # row 0: (-1 + 1.5) + (-2 + 1) = -0.5 (third token masked); row 1: 3 * 0.5 = 1.5
    assert sequence_kl(policy, ref, mask).tolist() == pytest.approx([-0.5, 1.5])


def test_win_rate_counts_ties_half():
    # win, tie, win, tie -> (1 + 0.5 + 1 + 0.5) / 4
    assert win_rate([5, 1, 4, 0], [1, 1, 3, 0]) == pytest.approx(0.75)
    # win, tie, loss -> 1.5 / 3
    assert win_rate([2, 2, 2], [1, 2, 3]) == pytest.approx(0.5)
    # rank pairs: response 0 is the policy; [1, 2] = policy better, [1, 1] = tie, [2, 1] = worse
    assert win_rate_from_ranks([[1, 2], [1, 1], [2, 1], [2, 1]]) == pytest.approx(1.5 / 4)
    with pytest.raises(ValueError):
        win_rate([1.0], [1.0, 2.0])


def test_best_of_n_kl_analytic_and_exact_on_a_discrete_base():
    assert best_of_n_kl(1) == 0.0
    assert best_of_n_kl(2) == pytest.approx(math.log(2) - 0.5)  # 0.1931
    assert best_of_n_kl(4) == pytest.approx(math.log(4) - 0.75)  # 0.6363
    # Exact KL of best-of-n against a uniform base over M items with distinct rewards: the best of n draws is item i
    # (1 = worst) with probability (i/M)^n - ((i-1)/M)^n. As M grows this tends to the analytic value.
    big_m, n = 20000, 8
    i = torch.arange(1, big_m + 1, dtype=torch.float64)
    p = (i / big_m) ** n - ((i - 1) / big_m) ** n
    exact = float((p * torch.log(p * big_m)).sum())
    assert exact == pytest.approx(best_of_n_kl(n), abs=2e-3)
    with pytest.raises(ValueError):
        best_of_n_kl(0)


def test_stderr_by_hand():
    # values 1, 2, 3: sample variance 1 -> stderr sqrt(1/3)
    assert stderr([1.0, 2.0, 3.0]) == pytest.approx(math.sqrt(1 / 3))
    assert stderr([4.0]) == 0.0


# ---------------------------------------------------------------------------------------------------------------
# rlhf eval's helpers on hand-made numbers


def _scored(proxy, gold):
    from rlhf.evaluate import Scored

    n = len(proxy)
    return Scored([f"t{i}" for i in range(n)], [[i] for i in range(n)], [True] * n, [[-1.0]] * n, [0.0] * n,
                  list(gold), list(proxy))  # fmt: skip


def test_best_of_n_picks_by_proxy_in_disjoint_groups():
    from rlhf.evaluate import best_of_n

    # one prompt, 4 samples: proxy picks sample 1 in group (0, 1), sample 3 in group (2, 3), sample 3 overall
    pool = _scored(proxy=[0.0, 1.0, 0.5, 2.0], gold=[5.0, 1.0, 0.0, -1.0])
    rows = {r["n"]: r for r in best_of_n(pool, n_max=4, ns=[1, 2, 4])}
    assert rows[1]["gold/score"] == pytest.approx(5 / 4) and rows[1]["groups"] == 4  # every sample is a group
    assert rows[2]["gold/score"] == pytest.approx((1.0 - 1.0) / 2) and rows[2][
        "proxy/score"
    ] == pytest.approx(1.5)
    assert (
        rows[4]["gold/score"] == -1.0
    )  # the proxy's favourite is the gold's worst: over-optimisation in one line
    assert rows[4]["kl"] == pytest.approx(math.log(4) - 0.75)


def test_policy_labels_and_human_win_rate(tmp_path):
    from rlhf.data.records import Comparison, write_jsonl
    from rlhf.evaluate import export_pairs, human_win_rate
    from rlhf.policies import policy_label, policy_method

    assert policy_label("runs/demo/round-2/ppo/model") == "round-2/ppo"
    assert policy_label("runs/demo/round-1/ppo/snapshots/iter-000020") == "round-1/ppo@20"
    assert policy_label("runs/demo/sft/model") == "sft"
    assert policy_label("runs/demo/round-2/dpo/model") == "round-2/dpo"
    # two runs' PPO models would both be "ppo": each gets the folder above it, and a clash with the reference too
    from rlhf.policies import unique_labels

    paths = [
        Path("runs/a/ppo/model"),
        Path("runs/b/ppo/model"),
        Path("x/sft/model"),
        Path("runs/a/ppo/snapshots/iter-8"),
    ]
    assert unique_labels(paths, taken=("sft",)) == ["a/ppo", "b/ppo", "x/sft", "ppo@8"]
    assert [policy_method(x) for x in ("round-2/dpo", "round-1/ppo@20", "sft")] == ["dpo", "ppo", "sft"]
    # pairs for the app: one K=2 record per (prompt, sample), both policies named, sides shuffled
    pol, ref = _scored([0, 0], [0, 0]), _scored([0, 0], [0, 0])
    ref.texts = ["r0", "r1"]
    path = tmp_path / "pairs.jsonl"
    assert export_pairs(path, [("e0", "P0"), ("e1", "P1")], pol, ref, "round-1/ppo", "sft", seed=0, k=1) == 2
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert sorted(r["policy"] for r in rows[0]["responses"]) == ["round-1/ppo", "sft"]
    # judged by people: win, loss, tie (ties count half); a pair of other policies is ignored
    judged = [
        Comparison("P0", ["a", "b"], [1, 2], policies=["round-1/ppo", "sft"]),
        Comparison("P1", ["a", "b"], [1, 2], policies=["sft", "round-1/ppo"]),
        Comparison("P2", ["a", "b"], [1, 1], policies=["round-1/ppo", "sft"]),
        Comparison("P3", ["a", "b"], [1, 2], policies=["round-2/ppo", "sft"]),
    ]
    write_jsonl(tmp_path / "judged.jsonl", judged)
    out = human_win_rate(str(tmp_path / "judged.jsonl"), "round-1/ppo", "sft")
    assert out == {"win_rate/human": pytest.approx(1.5 / 3), "judged_pairs": 3}


def test_best_of_n_at_kl_inverts_the_analytic_kl():
    from rlhf.eval_metrics import best_of_n_at_kl

    assert best_of_n_at_kl(0.0) == 1.0
    for n in (2, 4, 64, 1000):
        assert best_of_n_at_kl(best_of_n_kl(n)) == pytest.approx(n, rel=1e-9)
    assert 16 < best_of_n_at_kl(2.35) < 32  # between best-of-16 (1.84) and best-of-32 (2.50)


def test_value_at_kl_interpolates_in_sqrt_kl_and_refuses_to_extrapolate():
    from rlhf.eval_metrics import value_at_kl

    points = [(0.0, 0.0), (1.0, 1.0), (4.0, 3.0)]  # sqrt(KL) = 0, 1, 2
    assert value_at_kl(points, 1.0) == 1.0
    assert value_at_kl(points, 2.25) == pytest.approx(2.0)  # sqrt 1.5: halfway between 1.0 and 3.0
    assert value_at_kl(points, 0.25) == pytest.approx(0.5)  # sqrt 0.5, not KL 0.25 / 1.0
    assert value_at_kl(points, 4.5) is None
    assert value_at_kl([], 1.0) is None
