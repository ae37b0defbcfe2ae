"""Demonstration and prompt readers: every accepted format, and errors that name the file and line."""

from __future__ import annotations

import json

import pytest

from conftest import DATA
from rlhf.data.demonstrations import read_demonstrations, read_prompts
from rlhf.errors import UserError


def write_lines(path, rows):
    path.write_text(
        "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8"
    )
    return path


def test_prompt_response_and_chat(tmp_path):
    path = write_lines(
        tmp_path / "d.jsonl",
        [
            {"prompt": "Say hi.", "response": "Hi!"},
            "",
            {
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "Name a fruit."},
                    {"role": "assistant", "content": "Apple."},
                    {"role": "user", "content": "Another?"},
                    {"role": "assistant", "content": "Pear."},
                ]
            },
        ],
    )
    demos = read_demonstrations(path)
    assert [(d.prompt, d.response) for d in demos] == [
        ("Say hi.", "Hi!"),
        ("Be brief.\n\nName a fruit.\n\nAssistant: Apple.\n\nHuman: Another?", "Pear."),
    ]
    assert demos[0].source == str(path)


def test_self_instruct_seed_file():
    demos = read_demonstrations(DATA / "sft" / "self-instruct_seed_tasks.jsonl")
    assert len(demos) == 175  # one instance per seed task
    first = json.loads((DATA / "sft" / "self-instruct_seed_tasks.jsonl").read_text().splitlines()[1])
    inst = first["instances"][0]
    assert demos[1].prompt == f"{first['instruction']}\n\n{inst['input']}"
    assert demos[1].response == inst["output"]


def test_lima_array_with_history(tmp_path):
    path = tmp_path / "lima.json"
    path.write_text(
        json.dumps(
            [
                {"instruction": "What is 2+2?", "input": "", "output": "4.", "history": []},
                {"instruction": "And 3+3?", "input": "", "output": "6.", "history": [["What is 2+2?", "4."]]},
            ]
        ),
        encoding="utf-8",
    )
    demos = read_demonstrations(path)
    assert demos[0].prompt == "What is 2+2?"
    assert demos[1].prompt == "What is 2+2?\n\nAssistant: 4.\n\nHuman: And 3+3?"
    assert demos[1].response == "6."


@pytest.mark.parametrize(
    "rows, message",
    [
        ([{"prompt": "a", "response": "b"}, "{not json"], r"d\.jsonl:2: not valid JSON"),
        ([{"prompt": "a", "response": "b"}, "", {"prompt": "only a prompt"}], r"d\.jsonl:3: .*no response"),
        ([{"prompt": "a", "response": "   "}], r"d\.jsonl:1: .*no response"),
        ([{"messages": [{"role": "user", "content": "hi"}]}], r"d\.jsonl:1: .*no response"),
        ([{"instruction": "x", "instances": [{"input": "", "output": ""}]}], r"d\.jsonl:1: instances\[0\]"),
        ([{"text": "what is this"}], r"d\.jsonl:1: unknown record format"),
        ([{"prompt": 3, "response": "b"}], r"d\.jsonl:1: field 'prompt' must be a string"),
        ([], r"holds no records"),
    ],
)
def test_bad_files_name_the_line(tmp_path, rows, message):
    path = write_lines(tmp_path / "d.jsonl", rows)
    with pytest.raises(UserError, match=message):
        read_demonstrations(path)


def test_lima_record_without_output_names_the_record(tmp_path):
    path = tmp_path / "lima.json"
    path.write_text(json.dumps([{"instruction": "a", "output": "b"}, {"instruction": "c", "output": ""}]))
    with pytest.raises(UserError, match=r"lima\.json: record 2: .*no response"):
        read_demonstrations(path)


def test_read_prompts_from_text_and_jsonl(tmp_path):
    text = tmp_path / "p.txt"
    text.write_text("First prompt\n\n  Second prompt  \n", encoding="utf-8")
    assert read_prompts(text) == [("1", "First prompt"), ("3", "Second prompt")]
    jsonl = write_lines(tmp_path / "p.jsonl", [{"prompt": "A?", "prompt_id": "x7"}, {"prompt": "B?"}])
    assert read_prompts(jsonl) == [("x7", "A?"), ("2", "B?")]
    with pytest.raises(UserError, match="not found"):
        read_prompts(tmp_path / "missing.txt")
