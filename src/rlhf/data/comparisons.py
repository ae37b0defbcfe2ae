"""Comparison importers and exporters: HH-RLHF transcripts, TRL-style pairs, and our own comparison JSONL.

- HH-RLHF (`{"chosen": transcript, "rejected": transcript}`, `.jsonl` or `.jsonl.gz`): the prompt is the transcript
  up to the last "\\n\\nAssistant:", with the leading "\\n\\nHuman: " removed, so that
  `template.format_prompt(prompt)` gives back the transcript's text; the reply is what follows. Known quirks are
  skipped and counted, never silently: an empty reply on either side, prompts that differ between the two sides, a
  side without an Assistant turn, identical replies.
- TRL-style (`{"prompt", "chosen", "rejected"}`, plain strings): one pair per line, chosen ranked first.
- Ours (`{"prompt", "responses", "ranks", ...}`, see docs/formats.md): the feedback app and the labellers write it.

`read_any_comparisons(path)` detects the format from the first record. `export_trl_pairs` writes every pair of
every ranking (ties give none) as TRL-style pairs.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from rlhf.data.records import Comparison, ranking_pairs, read_comparisons, read_jsonl, write_jsonl
from rlhf.data.template import format_prompt
from rlhf.errors import UserError

log = logging.getLogger("rlhf")

ASSISTANT_TURN = "\n\nAssistant:"
HUMAN_TURN = "\n\nHuman: "


def iter_json_lines(path: str | Path, what: str = "comparisons") -> Iterator[tuple[int, dict]]:
    """(line number, object) of a JSONL file (.gz too); errors name file and line."""
    return read_jsonl(path, what)


def split_transcript(text: str) -> tuple[str, str] | None:
    """(prompt, reply) of an HH-RLHF transcript, or None when it has no Assistant turn."""
    cut = text.rfind(ASSISTANT_TURN)
    if cut < 0:
        return None
    prefix, reply = text[:cut], text[cut + len(ASSISTANT_TURN) :]
    prompt = prefix[len(HUMAN_TURN) :] if prefix.startswith(HUMAN_TURN) else prefix.lstrip()
    if prompt.startswith("Human: "):
        prompt = prompt[len("Human: ") :]
    return prompt, reply.strip()


def _log_counts(path: Path, counts: Counter) -> dict:
    summary = dict(counts)
    skipped = {k: v for k, v in summary.items() if k.startswith("skipped_") and v}
    log.info(
        "%s: read %d pairs, imported %d%s",
        path,
        summary.get("read", 0),
        summary.get("imported", 0),
        "; " + ", ".join(f"{k[8:].replace('_', ' ')}: {v}" for k, v in skipped.items()) if skipped else "",
    )
    return summary


def import_hh_rlhf(path: str | Path) -> tuple[list[Comparison], dict]:
    """HH-RLHF pairs as comparisons (chosen rank 1, rejected rank 2), and the counts read / imported / skipped."""
    path = Path(path)
    counts: Counter = Counter({"read": 0, "imported": 0})
    out = []
    for lineno, obj in iter_json_lines(path):
        where = f"{path}:{lineno}"
        counts["read"] += 1
        for key in ("chosen", "rejected"):
            if not isinstance(obj.get(key), str):
                raise UserError(f"{where}: HH-RLHF record needs a string field '{key}'")
        chosen, rejected = split_transcript(obj["chosen"]), split_transcript(obj["rejected"])
        if chosen is None or rejected is None:
            counts["skipped_no_assistant_turn"] += 1
        elif not chosen[1] or not rejected[1]:
            counts["skipped_empty_reply"] += 1
        elif chosen[0] != rejected[0]:
            counts["skipped_prompt_mismatch"] += 1
        elif chosen[1] == rejected[1]:
            counts["skipped_identical_replies"] += 1
        else:
            counts["imported"] += 1
            out.append(
                Comparison(
                    prompt=chosen[0],
                    responses=[chosen[1], rejected[1]],
                    ranks=[1, 2],
                    prompt_id=f"{path.name}:{lineno}",
                    labeller="import:hh-rlhf",
                    meta={"source": str(path), "line": lineno},
                )
            )
    if counts["read"] == 0:
        raise UserError(f"comparisons file {path} holds no records")
    return out, _log_counts(path, counts)


def import_trl_pairs(path: str | Path) -> tuple[list[Comparison], dict]:
    """TRL-style `{"prompt", "chosen", "rejected"}` string pairs as comparisons; empty replies are skipped."""
    path = Path(path)
    counts: Counter = Counter({"read": 0, "imported": 0})
    out = []
    for lineno, obj in iter_json_lines(path):
        where = f"{path}:{lineno}"
        counts["read"] += 1
        for key in ("prompt", "chosen", "rejected"):
            if not isinstance(obj.get(key), str):
                raise UserError(
                    f"{where}: TRL pair needs a string field '{key}' (conversational lists are not supported)"
                )
        chosen, rejected = obj["chosen"].strip(), obj["rejected"].strip()
        if not chosen or not rejected:
            counts["skipped_empty_reply"] += 1
            continue
        if chosen == rejected:
            counts["skipped_identical_replies"] += 1
            continue
        counts["imported"] += 1
        out.append(
            Comparison(
                prompt=obj["prompt"],
                responses=[chosen, rejected],
                ranks=[1, 2],
                prompt_id=str(obj.get("prompt_id", f"{path.name}:{lineno}")),
                labeller=str(obj.get("labeller", "import:trl")),
                meta={"source": str(path), "line": lineno},
            )
        )
    if counts["read"] == 0:
        raise UserError(f"comparisons file {path} holds no records")
    return out, _log_counts(path, counts)


def detect_format(path: str | Path) -> str:
    """'ours', 'trl' or 'hh-rlhf', from the keys of the first record."""
    for lineno, obj in iter_json_lines(path):
        if "ranks" in obj or "responses" in obj:
            return "ours"
        if {"prompt", "chosen", "rejected"} <= obj.keys():
            return "trl"
        if {"chosen", "rejected"} <= obj.keys():
            return "hh-rlhf"
        raise UserError(
            f"{path}:{lineno}: unknown comparison format: expected 'responses'+'ranks' (ours), "
            f"'prompt'+'chosen'+'rejected' (TRL) or 'chosen'+'rejected' transcripts (HH-RLHF); got {sorted(obj)}"
        )
    raise UserError(f"comparisons file {path} holds no records")


def read_any_comparisons(path: str | Path) -> tuple[list[Comparison], dict]:
    """Comparisons from a file in any supported format, with import counts."""
    kind = detect_format(path)
    if kind == "hh-rlhf":
        return import_hh_rlhf(path)
    if kind == "trl":
        return import_trl_pairs(path)
    if Path(path).suffix == ".gz":
        raise UserError(f"{path}: decompress our comparison JSONL before reading it")
    records = read_comparisons(path)
    return records, {"read": len(records), "imported": len(records)}


def export_trl_pairs(comparisons: list[Comparison], path: str | Path, templated: bool = False) -> int:
    """Every (better, worse) pair as `{"prompt", "chosen", "rejected"}`; returns the number of pairs written.

    `templated=True` writes the prompt through our template and the replies with their leading space, so TRL
    trainers that join prompt + reply see exactly the text our models were trained on.
    """

    def rows():
        for record in comparisons:
            prompt = format_prompt(record.prompt) if templated else record.prompt
            for better, worse in ranking_pairs(record.ranks):
                chosen, rejected = record.responses[better], record.responses[worse]
                if templated:
                    chosen, rejected = " " + chosen.strip(), " " + rejected.strip()
                yield {"prompt": prompt, "chosen": chosen, "rejected": rejected}

    return write_jsonl(path, rows())
