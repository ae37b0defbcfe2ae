"""Comparison importers and exporters: HH-RLHF counts on the shipped slice, quirks skipped with counts, TRL pairs."""

from __future__ import annotations

import gzip
import json
import logging

import pytest

from conftest import DATA
from rlhf.data.comparisons import (
    detect_format,
    export_trl_pairs,
    import_hh_rlhf,
    import_trl_pairs,
    read_any_comparisons,
    split_transcript,
)
from rlhf.data.records import Comparison, read_comparisons, read_jsonl
from rlhf.data.template import format_prompt
from rlhf.errors import UserError

HH_SLICE = DATA / "slices" / "hh-rlhf_harmless-base_test.first64.jsonl"


def test_hh_rlhf_slice_counts_and_prompt_round_trip(caplog):
    with caplog.at_level(logging.INFO, logger="rlhf"):
        records, counts = import_hh_rlhf(HH_SLICE)
    assert counts == {"read": 64, "imported": 64}
    assert "read 64 pairs, imported 64" in caplog.text
    raw = [obj for _, obj in read_jsonl(HH_SLICE)]
    for record, obj in zip(records, raw):
        assert record.ranks == [1, 2] and record.labeller == "import:hh-rlhf"
        # our template rebuilds the transcript exactly: "\n\n" + "Human: {prompt}\n\nAssistant:" + " " + reply
        assert "\n\n" + format_prompt(record.prompt) + " " + record.responses[0] == obj["chosen"]
        assert "\n\n" + format_prompt(record.prompt) + " " + record.responses[1] == obj["rejected"]
    assert records[0].prompt.startswith("what are some pranks with a pen")
    assert "\n\nAssistant: Are you looking for practical joke ideas?\n\nHuman: yep" in records[0].prompt


def test_hh_rlhf_quirks_are_skipped_and_counted(tmp_path, caplog):
    good = {"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: go away"}
    rows = [
        good,
        {
            "chosen": "\n\nHuman: hi\n\nAssistant:",
            "rejected": "\n\nHuman: hi\n\nAssistant: no",
        },  # empty reply
        {"chosen": "\n\nHuman: hi\n\nAssistant: a", "rejected": "\n\nHuman: hey\n\nAssistant: b"},  # mismatch
        {"chosen": "\n\nHuman: hi", "rejected": "\n\nHuman: hi\n\nAssistant: b"},  # no assistant turn
        {"chosen": "\n\nHuman: hi\n\nAssistant: same", "rejected": "\n\nHuman: hi\n\nAssistant: same"},
    ]
    path = tmp_path / "hh.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        handle.write("".join(json.dumps(r) + "\n" for r in rows))
    with caplog.at_level(logging.INFO, logger="rlhf"):
        records, counts = read_any_comparisons(path)
    assert counts == {
        "read": 5,
        "imported": 1,
        "skipped_empty_reply": 1,
        "skipped_prompt_mismatch": 1,
        "skipped_no_assistant_turn": 1,
        "skipped_identical_replies": 1,
    }
    assert "empty reply: 1" in caplog.text and "prompt mismatch: 1" in caplog.text
    assert records[0].prompt == "hi" and records[0].responses == ["hello", "go away"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(good) + "\n" + json.dumps({"chosen": 3, "rejected": "x"}) + "\n")
    with pytest.raises(UserError, match=r"bad.jsonl:2: HH-RLHF record needs a string field 'chosen'"):
        import_hh_rlhf(bad)


def test_split_transcript_uses_the_last_assistant_turn():
    text = "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: d e"
    assert split_transcript(text) == ("a\n\nAssistant: b\n\nHuman: c", "d e")
    assert split_transcript("\n\nHuman: only") is None


def test_trl_pairs_import_export_round_trip(tmp_path):
    records = [
        Comparison("p1", ["best", "mid", "worst"], [1, 2, 3], labeller="annotator:a"),
        Comparison("p2", ["x", "y", "z"], [1, 1, 2]),  # the tie (x, y) gives no pair
    ]
    path = tmp_path / "pairs.jsonl"
    assert export_trl_pairs(records, path) == 3 + 2
    pairs = [obj for _, obj in read_jsonl(path)]
    assert pairs[0] == {"prompt": "p1", "chosen": "best", "rejected": "mid"}
    assert {(p["chosen"], p["rejected"]) for p in pairs[3:]} == {("x", "z"), ("y", "z")}
    assert detect_format(path) == "trl"
    back, counts = import_trl_pairs(path)
    assert counts == {"read": 5, "imported": 5}
    assert [(r.prompt, r.responses, r.ranks) for r in back][:1] == [("p1", ["best", "mid"], [1, 2])]
    templated = tmp_path / "templated.jsonl"
    export_trl_pairs(records[:1], templated, templated=True)
    first = next(read_jsonl(templated))[1]
    assert first["prompt"] == "Human: p1\n\nAssistant:" and first["chosen"] == " best"


def test_our_format_and_ranking_errors_name_the_line(tmp_path):
    path = tmp_path / "ours.jsonl"
    ok = {"prompt": "p", "responses": ["a", "b", "c"], "ranks": [2, 1, 2]}
    path.write_text(json.dumps(ok) + "\n")
    records, counts = read_any_comparisons(path)
    assert records[0].ranks == [2, 1, 2] and counts["imported"] == 1
    for ranks, message in [
        ([1, 3, 3], "skip rank 2"),  # a gap
        ([1, 4, 2], "out of range"),  # index out of range
        ([1, 2], "2 ranks for 3 responses"),
    ]:
        path.write_text(json.dumps(ok) + "\n" + json.dumps({**ok, "ranks": ranks}) + "\n")
        with pytest.raises(UserError, match=rf"ours.jsonl:2: field 'ranks' .*{message}"):
            read_comparisons(path)
    path.write_text(json.dumps({"question": "?"}) + "\n")
    with pytest.raises(UserError, match="ours.jsonl:1: unknown comparison format"):
        read_any_comparisons(path)
    with pytest.raises(UserError, match="not found"):
        read_any_comparisons(tmp_path / "missing.jsonl")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(UserError, match="holds no records"):
        read_any_comparisons(tmp_path / "empty.jsonl")
