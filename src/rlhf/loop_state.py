"""The loop's bookkeeping: `runs/<name>/state.json` (which stages are done) and building each stage's config from
the loop's wiring plus the user's section for that stage. No training logic: `rlhf.loop` calls the stages."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from typing import Any

from rlhf.config import from_dict
from rlhf.errors import UserError


class State:
    """`runs/<name>/state.json`: completed stages with their summaries and wall times (rewritten atomically)."""

    def __init__(self, run: Path, fresh: bool):
        self.path = run / "state.json"
        self.data: dict[str, Any] = {"stages": {}}
        if not fresh and self.path.exists():
            self.data = json.loads(self.path.read_text(encoding="utf-8"))

    def done(self, stage: str) -> bool:
        return stage in self.data["stages"]

    def summary(self, stage: str) -> dict:
        return self.data["stages"][stage]["summary"]

    def complete(self, stage: str, summary: dict, seconds: float, cpu_seconds: float) -> None:
        self.data["stages"][stage] = {
            "seconds": round(seconds, 2),
            "cpu_seconds": round(
                cpu_seconds, 2
            ),  # all threads: wall time on an idle machine is about cpu / threads
            "summary": _jsonable(summary),
        }
        self.save()

    def save(self) -> None:
        tmp = self.path.with_name(".state.json.tmp")
        tmp.write_text(json.dumps(self.data, indent=2) + "\n", encoding="utf-8")
        tmp.replace(self.path)


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


# ---------------------------------------------------------------------------------------------------------------
# Building a stage's config: user section + the loop's wiring


def _set(tree: dict, dotted: str, value: Any) -> None:
    node = tree
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value


def deep_merge(base: dict, top: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def has_field(cls: type, dotted: str) -> bool:
    from typing import get_type_hints

    tp: Any = cls
    for part in dotted.split("."):
        if not dataclasses.is_dataclass(tp) or part not in get_type_hints(tp):
            return False
        tp = get_type_hints(tp)[part]
    return True


def stage_config(cls: type, loop: Any, section: dict, wiring: dict, where: str, resume: bool) -> Any:
    """`cls` from the loop's wiring (keys the stage lacks are dropped), the user's section on top of it.

    The section may override wiring (e.g. `pretrain: {data: [other.txt]}`); run folder, seed and resume are the
    loop's own.
    """
    common = {
        "seed": loop.seed,
        "device": loop.device,
        "threads": loop.threads,
        "resume": resume,
        "runs_dir": str(Path(loop.runs_dir) / loop.name) if "/" in where else loop.runs_dir,
        "name": where.split("/")[0] if "/" in where else loop.name,
    }
    tree: dict = {}
    for key, value in wiring.items():
        if has_field(cls, key):
            _set(tree, key, value)
    tree = deep_merge(tree, section)
    for key, value in common.items():
        _set(tree, key, value)
    try:
        config = from_dict(cls, tree)
    except UserError as exc:
        raise UserError(f"loop config section for {where}: {exc}") from None
    config.validate()
    return config
