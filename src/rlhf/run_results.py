"""Reading a run folder's results for `rlhf report` and the loop's summary: its stage folders in pipeline order,
each stage's metrics.jsonl as numeric series, each round's evaluation, and which evaluated policies are final.
Only files the stages and `rlhf eval` wrote are read; a metrics line cut by a kill is skipped.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

STAGE_ORDER = ("pretrain", "sft", "sample", "label", "reward", "ppo", "dpo")  # eval has its own sections
CURVE_WORDS = ("loss", "acc", "reward", "score", "kl", "entropy", "perplexity", "ppl", "clipfrac", "coef")


def _round_no(path: Path) -> int:
    return int(path.name.split("-")[1])


def round_dirs(run: Path) -> list[Path]:
    found = [p for p in run.glob("round-*") if p.is_dir() and re.fullmatch(r"round-\d+", p.name)]
    return sorted(found, key=_round_no)


def stage_dirs(run: Path) -> list[tuple[str, Path]]:
    """(label, folder) of every stage folder holding metrics, in pipeline order."""
    out = [(s, run / s) for s in STAGE_ORDER if (run / s / "metrics.jsonl").exists()]
    for rnd in round_dirs(run):
        out += [(f"{rnd.name}/{s}", rnd / s) for s in STAGE_ORDER if (rnd / s / "metrics.jsonl").exists()]
    return out


def read_rows(folder: Path) -> list[dict]:
    path = folder / "metrics.jsonl"
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut by a kill: skip it
    return rows


def numeric_series(rows: list[dict]) -> dict[str, tuple[list[float], list[float]]]:
    """metric -> (steps, values) for every finite numeric metric."""
    series: dict[str, tuple[list[float], list[float]]] = {}
    for row in rows:
        for key, value in row.items():
            if key in ("step", "time") or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if math.isfinite(value):
                xs, ys = series.setdefault(key, ([], []))
                xs.append(row.get("step", len(xs)))
                ys.append(float(value))
    return series


def curve_keys(series: dict, limit: int = 6) -> list[str]:
    """The metrics worth a training curve: losses, accuracies, rewards, KL..., with more than one point."""
    keys = [k for k, (xs, _) in series.items() if len(xs) > 1 and any(w in k.lower() for w in CURVE_WORDS)]
    rank = {w: i for i, w in enumerate(CURVE_WORDS)}
    keys.sort(key=lambda k: (min(rank[w] for w in CURVE_WORDS if w in k.lower()), k))
    return keys[:limit]


def read_evals(run: Path) -> list[tuple[str, dict]]:
    out = []
    for rnd in round_dirs(run):
        path = rnd / "eval" / "metrics.json"
        if path.exists():
            out.append((rnd.name, json.loads(path.read_text(encoding="utf-8"))))
    return out


def final_policies(evaluation: dict) -> list[tuple[str, dict]]:
    """Every evaluated final policy (not snapshots, not the reference), the loop's main method first."""
    return [(k, v) for k, v in evaluation["policies"].items() if v.get("role") == "policy"]


def final_policy(evaluation: dict) -> tuple[str, dict] | None:
    """The main method's final policy (the first one evaluated: the loop lists it first)."""
    finals = final_policies(evaluation)
    return finals[0] if finals else None


def method_of(label: str, row: dict) -> str:
    return row.get("method") or label.split("@")[0].rsplit("/", 1)[-1]


def rm_accuracies(run: Path) -> list[tuple[str, float | None]]:
    from rlhf.evaluate import reward_accuracy

    return [(r.name, reward_accuracy(str(r / "reward" / "model"))) for r in round_dirs(run)]
