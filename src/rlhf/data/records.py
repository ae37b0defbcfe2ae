"""The records that flow between stages, and JSONL I/O whose errors name the file, line and field.

Formats are documented in docs/formats.md:
- `SampleRecord`: one prompt with K sampled responses (written by `rlhf sample`, read by labellers and the app);
- `Comparison`: one labelled prompt: K responses and their ranks (read by `rlhf reward` and `rlhf dpo`);
- `Demonstration`: prompt -> ideal response (read by `rlhf sft`).
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from rlhf.errors import UserError


@dataclass
class Demonstration:
    prompt: str
    response: str
    source: str = ""  # where it came from: a file, an annotator, an importer


@dataclass
class Response:
    text: str
    token_ids: list[int] | None = None  # generated ids, EOS included when the response finished
    logprob: float | None = None  # sum of per-token log-probs at the sampling temperature
    finished: bool | None = None  # ended with EOS (False: cut at max_new_tokens)
    policy: str = ""  # which checkpoint produced it


@dataclass
class SampleRecord:
    prompt_id: str
    prompt: str
    responses: list[Response]
    meta: dict = field(default_factory=dict)


@dataclass
class Comparison:
    """One labelled prompt. `ranks[i]` is the rank of `responses[i]`: 1 = best; equal ranks are ties.

    Ranks are dense: the distinct ranks are exactly 1..m for some m <= K (a tie at the top gives 1, 1, 2, ...).
    """

    prompt: str
    responses: list[str]
    ranks: list[int]
    prompt_id: str = ""
    labeller: str = ""  # annotator id, or the synthetic labeller's name
    labelled_at: str = ""  # ISO 8601 time
    policies: list[str] = field(default_factory=list)  # producer of each response ("" when unknown)
    response_token_ids: list[list[int]] | None = (
        None  # the sampled ids, when known: used verbatim for scoring
    )
    meta: dict = field(default_factory=dict)  # e.g. {"critique": ..., "source": "hh-rlhf"}


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------------------------------------------------------
# Rankings


def ranking_error(ranks: list[Any], k: int) -> str | None:
    """Why `ranks` is not a valid dense ranking of k responses, or None when it is."""
    if len(ranks) != k:
        return f"has {len(ranks)} ranks for {k} responses"
    if any(isinstance(r, bool) or not isinstance(r, int) for r in ranks):
        return f"ranks must be integers, got {ranks}"
    bad = [r for r in ranks if r < 1 or r > k]
    if bad:
        return f"rank {bad[0]} is out of range 1..{k}"
    missing = sorted(set(range(1, max(ranks) + 1)) - set(ranks))
    if missing:
        return f"ranks {ranks} skip rank {missing[0]} (ties share a rank; the next rank follows directly)"
    return None


def ranking_pairs(ranks: list[int]) -> list[tuple[int, int]]:
    """All (better, worse) index pairs of a ranking; ties give no pair."""
    k = len(ranks)
    return [(i, j) for i in range(k) for j in range(k) if ranks[i] < ranks[j]]


def ranks_from_scores(scores: list[float]) -> list[int]:
    """Dense ranks (1 = highest score; equal scores tie)."""
    distinct = sorted(set(scores), reverse=True)
    position = {s: i + 1 for i, s in enumerate(distinct)}
    return [position[s] for s in scores]


# ---------------------------------------------------------------------------------------------------------------
# JSONL


def read_jsonl(path: str | Path, what: str = "records") -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line, gzip-compressed when the name ends in .gz; a bad line
    raises naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} file not found: {path}")
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as handle:
            for lineno, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise UserError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
                if not isinstance(obj, dict):
                    raise UserError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
                yield lineno, obj
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except (gzip.BadGzipFile, EOFError) as exc:
        raise UserError(f"{path}: cannot read ({exc})") from None


def write_jsonl(path: str | Path, rows: Iterable[Any]) -> int:
    """Write dataclasses or dicts atomically (temp file + rename): a failure leaves no half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    count = 0
    with open(tmp, "w", encoding="utf-8") as handle:
        for row in rows:
            obj = dataclasses.asdict(row) if dataclasses.is_dataclass(row) else row
            handle.write(json.dumps(obj, ensure_ascii=False) + "\n")
            count += 1
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    return count


def _need(obj: dict, key: str, types: type | tuple, where: str) -> Any:
    if key not in obj:
        raise UserError(f"{where}: missing field '{key}'")
    value = obj[key]
    if (
        not isinstance(value, types)
        or isinstance(value, bool)
        and bool not in (types if isinstance(types, tuple) else (types,))
    ):
        name = types.__name__ if isinstance(types, type) else "/".join(t.__name__ for t in types)
        raise UserError(f"{where}: field '{key}' must be {name}, got {type(value).__name__}")
    return value


def _known(cls: type, obj: dict) -> dict:
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in obj.items() if k in names}


def read_samples(path: str | Path) -> list[SampleRecord]:
    records = []
    for lineno, obj in read_jsonl(path, "samples"):
        where = f"{path}:{lineno}"
        prompt = _need(obj, "prompt", str, where)
        raw = _need(obj, "responses", list, where)
        if not raw:
            raise UserError(f"{where}: field 'responses' is empty")
        responses = []
        for i, r in enumerate(raw):
            if isinstance(r, str):
                r = {"text": r}
            if not isinstance(r, dict) or not isinstance(r.get("text"), str):
                raise UserError(f"{where}: responses[{i}] needs a string field 'text'")
            responses.append(Response(**_known(Response, r)))
        records.append(
            SampleRecord(
                prompt_id=str(obj.get("prompt_id", lineno)),
                prompt=prompt,
                responses=responses,
                meta=obj.get("meta") or {},
            )
        )
    if not records:
        raise UserError(f"samples file {path} holds no records")
    return records


def parse_comparison(obj: dict, where: str) -> Comparison:
    _need(obj, "prompt", str, where)
    responses = _need(obj, "responses", list, where)
    ranks = _need(obj, "ranks", list, where)
    if len(responses) < 2:
        raise UserError(f"{where}: a comparison needs at least 2 responses, got {len(responses)}")
    if not all(isinstance(r, str) for r in responses):
        raise UserError(f"{where}: field 'responses' must be a list of strings")
    problem = ranking_error(ranks, len(responses))
    if problem:
        raise UserError(f"{where}: field 'ranks' {problem}")
    record = Comparison(**_known(Comparison, obj))
    if record.policies and len(record.policies) != len(responses):
        raise UserError(
            f"{where}: field 'policies' has {len(record.policies)} entries for {len(responses)} responses"
        )
    if record.response_token_ids is not None and len(record.response_token_ids) != len(responses):
        raise UserError(
            f"{where}: field 'response_token_ids' has {len(record.response_token_ids)} entries "
            f"for {len(responses)} responses"
        )
    return record


def read_comparisons(path: str | Path) -> list[Comparison]:
    records = [parse_comparison(obj, f"{path}:{lineno}") for lineno, obj in read_jsonl(path, "comparisons")]
    if not records:
        raise UserError(f"comparisons file {path} holds no records")
    return records
