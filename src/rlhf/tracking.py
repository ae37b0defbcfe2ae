"""Run folders, metrics and logs: `runs/<name>/<stage>/` with config.yaml, log.txt, metrics.jsonl, TensorBoard events.

Metric names are namespaced (`train/loss`, `objective/kl`), the same in metrics.jsonl and TensorBoard.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from rlhf.config import save_config

log = logging.getLogger("rlhf")


def setup_logging(log_file: Path | None = None, level: int = logging.INFO) -> None:
    """Log to stderr and, when given, to `log_file` (appending, so a resumed run keeps its history)."""
    root = logging.getLogger("rlhf")
    root.setLevel(level)
    for handler in list(root.handlers):
        if getattr(handler, "_rlhf", False):
            root.removeHandler(handler)
            handler.close()
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file is not None:
        handlers.append(logging.FileHandler(log_file, encoding="utf-8"))
    for handler in handlers:
        handler.setFormatter(fmt)
        handler._rlhf = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.propagate = False


def stage_dir(config: Any, stage: str) -> Path:
    return Path(config.runs_dir) / config.name / stage


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def start_run(config: Any, stage: str) -> Path:
    """Create the stage's run folder, write the resolved config, start logging, seed RNGs, set threads."""
    import torch

    out = stage_dir(config, stage)
    if not getattr(config, "resume", False):
        # A fresh run replaces an old one's history; `resume=true` keeps it and continues.
        for old in ("checkpoints", "tb", "metrics.jsonl"):
            target = out / old
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    out.mkdir(parents=True, exist_ok=True)
    save_config(config, out / "config.yaml")
    setup_logging(out / "log.txt")
    if getattr(config, "threads", 0):
        torch.set_num_threads(config.threads)
    seed_everything(config.seed)
    log.info("%s run folder: %s", stage, out)
    return out


class MetricsLogger:
    """Appends one JSON object per step to metrics.jsonl and mirrors scalars to TensorBoard."""

    def __init__(self, out_dir: Path, tensorboard: bool = True):
        self.path = Path(out_dir) / "metrics.jsonl"
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self._tb = None
        if tensorboard:
            os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(Path(out_dir) / "tb"))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        clean = {
            k: (float(v) if isinstance(v, (int, float)) or hasattr(v, "item") else v)
            for k, v in metrics.items()
        }
        record = {"step": step, "time": round(time.time(), 3), **clean}
        self._file.write(json.dumps(record, allow_nan=True) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in clean.items():
                if isinstance(value, float) and math.isfinite(value):
                    self._tb.add_scalar(key, value, step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def truncate_metrics(path: Path, after_step: int) -> None:
    """Drop rows past `after_step` (a resumed run re-logs the steps it redoes)."""
    if not path.exists():
        return
    keep = [
        line
        for line in path.read_text(encoding="utf-8").splitlines()
        if line.strip() and json.loads(line).get("step", -1) <= after_step
    ]
    path.write_text("".join(line + "\n" for line in keep), encoding="utf-8")


def progress(total: int, desc: str, initial: int = 0, unit: str = "step"):
    """A tqdm bar on stderr; quiet when stderr is not a terminal unless RLHF_PROGRESS=1."""
    from tqdm.auto import tqdm

    disable = not (sys.stderr.isatty() or os.environ.get("RLHF_PROGRESS") == "1")
    return tqdm(
        total=total,
        desc=desc,
        initial=initial,
        unit=unit,
        dynamic_ncols=True,
        disable=disable,
        mininterval=0.5,
    )
