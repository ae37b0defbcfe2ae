"""Checkpoints that survive SIGKILL, and resume from the newest one.

Layout: `<stage dir>/checkpoints/step-0000100/` holding one Hugging Face folder per model part (the part named ""
lives at the top, so the checkpoint itself loads with `from_pretrained`) and `trainer_state.pt` with optimizer,
scheduler, RNG states, data position and whatever else the stage needs. A checkpoint is written to a temporary
folder and renamed into place, so a kill mid-save leaves the previous checkpoint whole.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

STATE_FILE = "trainer_state.pt"


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def save_hf(model: Any, tokenizer: Any, folder: str | Path) -> None:
    """Save a model (and tokenizer) in Hugging Face format with safetensors."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


def save_checkpoint(
    stage_dir: str | Path, step: int, parts: dict[str, tuple[Any, Any]], state: dict, keep: int = 2
) -> Path:
    """Write `parts` ({name: (model, tokenizer or None)}) and `state` as checkpoint `step`; keep the newest `keep`."""
    root = Path(stage_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:07d}"
    tmp = root / f".tmp-step-{step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    for name, (model, tokenizer) in parts.items():
        save_hf(model, tokenizer, tmp / name if name else tmp)
    torch.save({"step": step, "rng": rng_state(), **state}, tmp / STATE_FILE)
    _fsync_tree(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(stage_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())


def list_checkpoints(stage_dir: str | Path) -> list[Path]:
    root = Path(stage_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [
        p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and (p / STATE_FILE).exists()
    ]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def latest_checkpoint(stage_dir: str | Path) -> Path | None:
    found = list_checkpoints(stage_dir)
    return found[-1] if found else None


def load_state(checkpoint: str | Path) -> dict:
    """The trainer state of a checkpoint; restores the global RNGs as a side effect."""
    state = torch.load(Path(checkpoint) / STATE_FILE, map_location="cpu", weights_only=False)
    set_rng_state(state["rng"])
    return state
