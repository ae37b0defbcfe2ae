"""Export -> the readers of `rlhf reward` and `rlhf sft`: every feedback form lands where it should."""

from __future__ import annotations

import json

from rlhf.data.comparisons import read_any_comparisons
from rlhf.data.demonstrations import read_demonstrations
from rlhf.data.records import read_comparisons
from rlhf.feedback.cli import main as label


def _label_everything(env):
    env.batch("all", n=2, forms=("ranking", "rating", "pairwise", "correction", "demonstration", "critique"))
    env.batch("three", n=1, forms=("rating",), rating_scale=3)
    rated = env.next("bob", batch="three")
    assert env.submit("bob", rated["id"], {"ratings": [3, 1, 1, 2]}, batch="three").status_code == 200
    item = env.next("alice", batch="all")
    body = {
        "ranks": [2, 1, 3, 3],
        "ties": [[2, 3]],
        "ratings": [5, 7, 1, 5],
        "pairwise": "b",
        "correction": {"index": 2, "text": "A kinder story about the fox."},
        "demonstration": "The ideal story.",
        "critique": "Response 3 is rude.",
        "flags": ["low_quality"],
    }
    assert env.submit("alice", item["id"], body).status_code == 200
    skipped = env.next("alice", batch="all")
    env.submit("alice", skipped["id"], {"skip": True}, sid="skip-me-please")
    return item


def test_export_round_trip(env, db_path, tmp_path, capsys):
    item = _label_everything(env)
    out = tmp_path / "export"
    assert label(["export", "--db", str(db_path), "--batch", "all", "--out", str(out)]) == 0
    assert "comparisons.jsonl: 4 lines" in capsys.readouterr().out

    records = read_comparisons(out / "comparisons.jsonl")
    by_form = {r.meta["form"]: r for r in records}
    assert set(by_form) == {"ranking", "rating", "pairwise", "correction"}  # the skipped item exports nothing
    ranking = by_form["ranking"]
    assert ranking.responses == item["responses"] and ranking.ranks == [2, 1, 3, 3]
    assert ranking.labeller == "annotator:alice" and ranking.prompt == item["prompt"]
    assert ranking.response_token_ids is not None and ranking.policies == ["sft"] * 4
    assert ranking.meta["critique"] == "Response 3 is rude." and ranking.meta["flags"] == ["low_quality"]
    assert by_form["rating"].ranks == [2, 1, 3, 2] and by_form["rating"].meta["ratings"] == [5, 7, 1, 5]
    a, b = item["pair"]
    assert by_form["pairwise"].responses == [item["responses"][b], item["responses"][a]]
    assert by_form["pairwise"].ranks == [1, 2]
    correction = by_form["correction"]
    assert correction.responses == ["A kinder story about the fox.", item["responses"][2]]
    assert correction.ranks == [1, 2] and correction.response_token_ids is None

    # what `rlhf reward` reads (it detects the format), in both files
    ours, counts = read_any_comparisons(out / "comparisons.jsonl")
    assert counts["imported"] == 4 and [r.ranks for r in ours] == [r.ranks for r in records]
    pairs, _ = read_any_comparisons(out / "trl_pairs.jsonl")
    assert (
        len(pairs) == 5 + 5 + 1 + 1
    )  # ranking (6 pairs - 1 tie), rating (5 strict pairs), pairwise, correction
    first = json.loads((out / "trl_pairs.jsonl").read_text().splitlines()[0])
    assert set(first) == {"prompt", "chosen", "rejected"}

    # ... and the reward stage's own split of the exported file (the feedback app itself never imports a stage)
    from rlhf.stages.reward import RewardConfig
    from rlhf.stages.reward_data import split

    train, val = split(RewardConfig(comparisons=[str(out / "comparisons.jsonl")], val_fraction=0.0))
    assert len(train) == 4 and val == []

    # what `rlhf sft` reads: the correction and the written demonstration
    demos = read_demonstrations(out / "demonstrations.jsonl")
    assert [(d.prompt, d.response) for d in demos] == [
        (item["prompt"], "A kinder story about the fox."),
        (item["prompt"], "The ideal story."),
    ]
    [critique] = [json.loads(line) for line in (out / "critiques.jsonl").read_text().splitlines()]
    assert critique["critique"] == "Response 3 is rude." and critique["responses"] == item["responses"]


def test_ratings_on_a_3_point_scale(env, db_path, tmp_path):
    _label_everything(env)
    assert label(["export", "--db", str(db_path), "--batch", "three", "--out", str(tmp_path)]) == 0
    [record] = read_comparisons(tmp_path / "comparisons.jsonl")
    assert record.ranks == [1, 3, 3, 2] and record.meta["rating_scale"] == 3  # higher rating = better rank
    assert record.labeller == "annotator:bob"
