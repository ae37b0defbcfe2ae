"""Labellers: the sentiment rubric on hand-scored sentences, Plackett-Luce noise statistics, label_samples, CLI."""

from __future__ import annotations

import json
import math

import pytest

from rlhf.data.records import Comparison, Response, SampleRecord, read_comparisons, write_jsonl
from rlhf.errors import UserError
from rlhf.labellers import GoldLabeller, get_labeller, gold_score, label_samples, main


def test_sentiment_rubric_hand_values():
    # 12 words; positive: kind, happy, glad, smile, friend -> 10 * 5 / 12
    assert gold_score("", "The kind girl was happy and glad to smile at her friend.") == pytest.approx(
        50 / 12
    )
    # 11 words; negative: wolf, wicked, cried, dark; 'the' repeats but is a stop word -> 10 * -4 / 11
    assert gold_score("", "The wolf was wicked and the girl cried in the dark.") == pytest.approx(-40 / 11)
    # spam: happy counts once, two repeats; fewer than 10 words -> divided by 10
    assert gold_score("", "happy happy happy") == pytest.approx(10 * (1 - 2) / 10)
    assert gold_score("", "Happy, glad!") == pytest.approx(10 * 2 / 10)
    assert gold_score("", "") == -1.0
    assert gold_score("any prompt", "a plain day") == gold_score("another", "a plain day") == 0.0


def test_temperature_zero_ranks_by_score_with_ties():
    labeller = get_labeller("sentiment", temperature=0.0)
    ranks = labeller.rank("p", ["a happy day", "a sad day", "a day", "a glad day"])
    assert ranks == [1, 3, 2, 1]
    assert labeller.meta()["gold_scores"] == pytest.approx([1.0, -1.0, 0.0, 1.0])


def test_plackett_luce_noise_matches_bradley_terry_and_is_seeded():
    scores = {"a": 1.0, "b": 0.0, "c": -1.0}
    labeller = GoldLabeller(lambda p, r: scores[r], temperature=0.5, seed=3)
    n = 4000
    rankings = [labeller.rank("p", ["a", "b", "c"]) for _ in range(n)]
    assert all(sorted(r) == [1, 2, 3] for r in rankings)
    # P(a above b) = sigmoid((1 - 0) / 0.5); P(a first) = e^2 / (e^2 + e^0 + e^-2) under Plackett-Luce
    a_over_b = sum(r[0] < r[1] for r in rankings) / n
    a_first = sum(r[0] == 1 for r in rankings) / n
    assert a_over_b == pytest.approx(1 / (1 + math.exp(-2)), abs=0.025)
    assert a_first == pytest.approx(math.exp(2) / (math.exp(2) + 1 + math.exp(-2)), abs=0.025)
    again = GoldLabeller(lambda p, r: scores[r], temperature=0.5, seed=3)
    assert [again.rank("p", ["a", "b", "c"]) for _ in range(50)] == rankings[:50]
    with pytest.raises(UserError, match="temperature"):
        GoldLabeller(lambda p, r: 0.0, temperature=-1)


def test_label_samples_keeps_policies_ids_and_names_the_labeller():
    samples = [
        SampleRecord(
            "p0",
            "Tell me a story.",
            [
                Response("the sad wolf", token_ids=[5, 6, 2], policy="sft"),
                Response("a happy friend", token_ids=[7, 8, 2], policy="ppo"),
            ],
        ),
        SampleRecord("p1", "Only one", [Response("alone")]),
        SampleRecord("p2", "No ids", [Response("kind"), Response("cruel")]),
    ]
    out = label_samples(samples, get_labeller("sentiment", temperature=0.0))
    assert [c.prompt_id for c in out] == ["p0", "p2"]
    first = out[0]
    assert first.ranks == [2, 1] and first.labeller == "synthetic:sentiment"
    assert first.policies == ["sft", "ppo"] and first.response_token_ids == [[5, 6, 2], [7, 8, 2]]
    assert first.labelled_at and out[1].response_token_ids is None


def test_import_labeller_answers_with_the_human_ranks(tmp_path):
    path = tmp_path / "human.jsonl"
    write_jsonl(path, [Comparison("p", ["a", "b", "c"], [2, 3, 1], labeller="annotator:ann")])
    labeller = get_labeller("import", path=str(path))
    assert labeller.rank("p", ["c", "a", "b"]) == [1, 2, 3]
    with pytest.raises(UserError, match="no imported ranking"):
        labeller.rank("p", ["a", "b"])
    with pytest.raises(UserError, match="unknown labeller"):
        get_labeller("psychic")


def test_cli_writes_comparisons(tmp_path):
    samples = tmp_path / "samples.jsonl"
    rows = [
        {
            "prompt_id": str(i),
            "prompt": "Say hi",
            "responses": [{"text": t, "policy": "runs/x/sft/model"} for t in ts],
        }
        for i, ts in enumerate([["happy kind friend", "sad dark night", "a tree"], ["glad", "angry"]])
    ]
    samples.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "comparisons.jsonl"
    assert main(["synthetic", "--labeller", "sentiment", "--samples", str(samples), "--out", str(out),
                 "--temperature", "0", "--seed", "1"]) == 0  # fmt: skip
    records = read_comparisons(out)
    assert [r.ranks for r in records] == [[1, 3, 2], [1, 2]]
    assert records[0].labeller == "synthetic:sentiment" and records[0].policies[0] == "runs/x/sft/model"
    with pytest.raises(UserError, match="samples file not found"):
        main(["synthetic", "--samples", str(tmp_path / "nope.jsonl"), "--out", str(out)])
