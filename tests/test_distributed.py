"""Data-parallel training through Accelerate: 2 CPU processes (gloo) x batch b == 1 process x batch 2b."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from rlhf.distributed import build_accelerator, mean_across, rank_slice, relaunch
from test_dpo import _config, _losses, _planted

ROOT = Path(__file__).resolve().parents[1]


def test_helpers_in_one_process(monkeypatch):
    acc = build_accelerator(SimpleNamespace(device="cpu", bf16=False))
    assert acc.num_processes == 1 and rank_slice(list(range(6)), acc) == list(range(6))
    assert mean_across(acc, {"a": torch.tensor(2.0), "b": 3}) == {"a": 2.0, "b": 3.0}
    fake = SimpleNamespace(num_processes=2, process_index=1)
    assert rank_slice([10, 11, 12, 13], fake) == [12, 13]
    with pytest.raises(ValueError, match="evenly"):
        rank_slice([1, 2, 3], fake)
    # `num_processes=N` re-launches the same command line under `accelerate launch`; a launched rank never does
    calls = []
    monkeypatch.setattr(subprocess, "call", lambda cmd: calls.append(cmd) or 0)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    assert relaunch(SimpleNamespace(num_processes=1), "dpo", ["x=1"]) is None
    assert (
        relaunch(
            SimpleNamespace(num_processes=2, accelerate_config=""), "dpo", ["a.jsonl", "num_processes=2"]
        )
        == 0
    )
    cmd = calls[0]
    assert cmd[1:3] == ["-m", "accelerate.commands.launch"] and cmd[cmd.index("--num_processes") + 1] == "2"
    assert cmd[-5:] == ["-m", "rlhf", "dpo", "a.jsonl", "num_processes=2"]
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert relaunch(SimpleNamespace(num_processes=2), "dpo", []) is None


def test_dpo_two_processes_match_one_process_with_double_batch(tmp_path, tiny_checkpoint):
    from rlhf.stages.dpo import run

    _planted(tmp_path / "train.jsonl", 16, seed=1)
    _planted(tmp_path / "val.jsonl", 8, seed=2)
    one = _config(tmp_path, tiny_checkpoint, "one", steps=3, batch_size=8, eval_every=3)
    run(one)
    skip = ("model", "lora", "name", "batch_size", "threads")
    args = [f"{k}={v}" for k, v in vars(one).items() if k not in skip]
    _two_process_run("dpo", [*args, f"model.path={tiny_checkpoint}", "name=two", "batch_size=4"])
    one_losses, two_losses = (
        _losses(tmp_path / "runs" / "one" / "dpo"),
        _losses(tmp_path / "runs" / "two" / "dpo"),
    )
    assert sorted(two_losses) == [1, 2, 3]
    # Same 8 pairs per step; the gradient is the mean of two half-batch means (all-reduced) instead of one mean:
    # only fp32 summation order differs (~1e-7 relative per step), so 3 Adam steps agree to far better than 1e-5.
    for step, loss in one_losses.items():
        assert two_losses[step] == pytest.approx(loss, abs=1e-5)
    assert one_losses[3] < one_losses[1]
    from rlhf.tracking import read_metrics

    val = [
        [r for r in read_metrics(tmp_path / "runs" / n / "dpo") if "val/accuracy" in r][-1]
        for n in ("one", "two")
    ]
    assert val[1]["val/margin"] == pytest.approx(val[0]["val/margin"], abs=1e-4)


def _two_process_run(stage: str, args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(
        [sys.executable, "-m", "rlhf", stage, *args, "num_processes=2", "threads=1"],
        env=env, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "data-parallel on 2 processes" in done.stderr
    return done


def test_sft_two_processes_match_one_process_with_double_batch(tmp_path, tiny_checkpoint):
    from rlhf.config import load_config
    from rlhf.stages import sft

    demos = ROOT / "data" / "slices" / "self-instruct_seed_tasks.first32.jsonl"  # 28 train / 4 held out
    common = [
        f"model.path={tiny_checkpoint}", f"data={demos}", f"runs_dir={tmp_path}", "max_steps=3",
        "val_fraction=0.125", "log_every=1", "eval_every=0", "patience=0", "save_every=0", "sample_prompts=0",
        "max_length=64", "warmup_steps=0", "lr=0.003",
    ]  # fmt: skip
    sft.run(load_config(sft.SFTConfig, None, [*common, "name=one", "batch_size=8", "threads=2"]))
    _two_process_run("sft", [*common, "name=two", "batch_size=4"])
    one, two = (_losses(tmp_path / n / "sft") for n in ("one", "two"))
    assert sorted(two) == [1, 2, 3]
    # the loss is a mean over the response tokens of all ranks; the token count is all-reduced first
    for step, loss in one.items():
        assert two[step] == pytest.approx(loss, abs=1e-5)
