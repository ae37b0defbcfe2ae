"""Data-parallel training through Accelerate: 2 CPU processes (gloo) x batch b == 1 process x batch 2b.

Starting a group of processes costs more than these tiny runs: `two_ranks` starts ONE group (tests/two_ranks.py,
with the command line `rlhf <stage> num_processes=2` re-launches with) that runs the SFT, DPO, reward, pretrain and
PPO stages one after another, each through `rlhf.cli.main` exactly as a rank of `rlhf <stage> ... num_processes=2`
does; the tests compare its outputs with 1-process runs in this process.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from rlhf.distributed import build_accelerator, launch_command, mean_across, rank_slice, relaunch
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


# ---------------------------------------------------------------------------------------------------------------
# One 2-process group for every training stage


def _prompts(path: Path) -> Path:
    from conftest import SLICE_TEXT

    lines = [
        line.strip()[:40].replace('"', "") for line in SLICE_TEXT.read_text(encoding="utf-8").splitlines()
    ]
    path.write_text("".join(f'{{"prompt": "{p}"}}\n' for p in [x for x in lines if x][:16]), encoding="utf-8")
    return path


def _stage_args(folder: Path, ckpt: Path) -> dict[str, list[str]]:
    """The arguments both sides share (the 1-process side adds batch_size=2b, the 2-process side b)."""
    from conftest import SLICE_TEXT

    runs = f"runs_dir={folder / 'runs'}"
    demos = ROOT / "data" / "slices" / "self-instruct_seed_tasks.first32.jsonl"  # 28 train / 4 held out
    dpo = _config(folder, ckpt, "x", steps=3, batch_size=8, eval_every=3)
    skip = ("model", "lora", "name", "batch_size", "threads")
    return {
        "sft": [
            f"model.path={ckpt}", f"data={demos}", runs, "max_steps=3", "val_fraction=0.125", "log_every=1",
            "eval_every=0", "patience=0", "save_every=0", "sample_prompts=0", "max_length=64", "warmup_steps=0",
            "lr=0.003",
        ],
        "dpo": [*(f"{k}={v}" for k, v in vars(dpo).items() if k not in skip), f"model.path={ckpt}"],
        "reward": [
            f"model.path={ckpt}", f"comparisons={folder / 'c.jsonl'}", runs, "max_steps=3", "eval_every=0",
            "ckpt_every=0", "val_fraction=0.2", "lr=1e-3", "warmup_steps=0", "threads=1",
        ],
        "pretrain": [
            f"model.path={ckpt}", f"data={SLICE_TEXT}", runs, "max_steps=3", "block_size=32", "log_every=1",
            "eval_every=3", "eval_batches=2", "warmup_steps=0", "lr=3e-3", "min_lr=3e-4", "sample_prompt=",
            "threads=1",
        ],
        "ppo": [
            "--config", str(ROOT / "configs" / "tiny_ppo.yaml"), f"model.path={ckpt}",
            f"reward_model={folder / 'rm'}", f"prompts={folder / 'prompts.jsonl'}", runs, "iterations=2",
            "batch_size=8", "minibatches=2", "max_new_tokens=8", "save_every=2", "snapshot_every=0", "bf16=false",
            "kl.stop_above=0", "lora.enabled=true", "lora.r=4", "threads=1",
        ],
    }  # fmt: skip


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, tiny_checkpoint) -> Path:
    import json

    from rlhf.reward_model import reward_model_from_causal_lm
    from test_reward import _planted_comparisons

    folder = tmp_path_factory.mktemp("two_ranks")
    _planted_comparisons(folder / "c.jsonl", 40)  # 32 train / 8 held-out rankings of K = 4
    reward_model_from_causal_lm(tiny_checkpoint).save(folder / "rm")
    _prompts(folder / "prompts.jsonl")
    _planted(folder / "train.jsonl", 16, seed=1)  # DPO pairs
    _planted(folder / "val.jsonl", 8, seed=2)
    args = _stage_args(folder, tiny_checkpoint)
    plan = [
        ["sft", [*args["sft"], "name=two", "batch_size=4", "threads=1"]],
        ["dpo", [*args["dpo"], "name=two", "batch_size=4", "threads=1"]],
        ["reward", [*args["reward"], "name=two", "batch_size=4"]],
        ["pretrain", [*args["pretrain"], "name=two", "batch_size=4"]],
        ["ppo", [*args["ppo"], "name=two"]],
    ]
    (folder / "plan.json").write_text(json.dumps(plan), encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "TOKENIZERS_PARALLELISM": "false"}
    launch = launch_command(2, "", [str(ROOT / "tests" / "two_ranks.py"), str(folder / "plan.json")])
    done = subprocess.run(launch, cwd=folder, env=env, capture_output=True, text=True, timeout=500)
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stderr.count("data-parallel on 2 processes") == len(plan)
    return folder


def _one_process(stage: str, folder: Path, ckpt: Path, *extra: str) -> dict:
    import importlib

    from rlhf.config import load_config

    module = importlib.import_module(f"rlhf.stages.{stage}")
    cls = {"sft": "SFTConfig", "reward": "RewardConfig", "pretrain": "PretrainConfig"}[stage]
    threads = torch.get_num_threads()
    try:
        return module.run(
            load_config(getattr(module, cls), None, [*_stage_args(folder, ckpt)[stage], *extra])
        )
    finally:
        torch.set_num_threads(threads)


def test_sft_two_processes_match_one_process_with_double_batch(two_ranks, tiny_checkpoint):
    _one_process("sft", two_ranks, tiny_checkpoint, "name=one", "batch_size=8", "threads=2")
    one, two = (_losses(two_ranks / "runs" / n / "sft") for n in ("one", "two"))
    assert sorted(two) == [1, 2, 3]
    # the loss is a mean over the response tokens of all ranks; the token count is all-reduced first
    for step, loss in one.items():
        assert two[step] == pytest.approx(loss, abs=1e-5)


def test_dpo_two_processes_match_one_process_with_double_batch(two_ranks, tiny_checkpoint):
    from rlhf.stages.dpo import run
    from rlhf.tracking import read_metrics

    threads = torch.get_num_threads()
    try:
        run(_config(two_ranks, tiny_checkpoint, "one", steps=3, batch_size=8, eval_every=3))
    finally:
        torch.set_num_threads(threads)
    runs = two_ranks / "runs"
    one_losses, two_losses = _losses(runs / "one" / "dpo"), _losses(runs / "two" / "dpo")
    assert sorted(two_losses) == [1, 2, 3]
    # Same 8 pairs per step; the gradient is the mean of two half-batch means (all-reduced) instead of one mean:
    # only fp32 summation order differs (~1e-7 relative per step), so 3 Adam steps agree to far better than 1e-5.
    for step, loss in one_losses.items():
        assert two_losses[step] == pytest.approx(loss, abs=1e-5)
    assert one_losses[3] < one_losses[1]
    val = [[r for r in read_metrics(runs / n / "dpo") if "val/accuracy" in r][-1] for n in ("one", "two")]
    assert val[1]["val/margin"] == pytest.approx(val[0]["val/margin"], abs=1e-4)


def test_reward_two_processes_match_one_process_with_double_batch(two_ranks, tiny_checkpoint):
    from rlhf.reward_model import RewardModel
    from rlhf.tracking import read_metrics

    one_summary = _one_process("reward", two_ranks, tiny_checkpoint, "name=one", "batch_size=8")
    runs = two_ranks / "runs"
    one, two = _losses(runs / "one" / "reward"), _losses(runs / "two" / "reward")
    assert sorted(two) == [1, 2, 3]
    # Same 8 rankings per step (2 x 4 vs 1 x 8); the gradient is the mean of two half-batch means, all-reduced by
    # DDP, instead of one mean over 8; the shared-prompt pass pads prompts to each rank's longest instead of the
    # batch's longest (masked columns add exact zeros). So only fp32 summation order differs: ~1e-7 relative per
    # step (measured 3e-8 on the loss), and 3 AdamW steps at lr 1e-3 keep that far below 1e-5.
    for step, loss in one.items():
        assert two[step] == pytest.approx(loss, abs=1e-5)
    assert one_summary["train_rankings"] == 32 and one_summary["steps"] == 3
    val = [[r for r in read_metrics(runs / n / "reward") if "val/accuracy" in r][-1] for n in ("one", "two")]
    assert val[1]["val/accuracy"] == val[0]["val/accuracy"]
    assert val[1]["val/margin"] == pytest.approx(val[0]["val/margin"], abs=1e-4)
    rms = [RewardModel.load(runs / n / "reward" / "model") for n in ("one", "two")]  # rank 0 wrote a whole RM
    ids, mask = rms[0].pad(
        [rms[0].encode("Tell me a story.", t) for t in ("a happy fox", "the end", "a king")]
    )
    with torch.no_grad():
        torch.testing.assert_close(rms[1].score(ids, mask), rms[0].score(ids, mask), atol=1e-4, rtol=1e-4)


def test_pretrain_two_processes_match_one_process_with_double_batch(two_ranks, tiny_checkpoint):
    from rlhf.tracking import read_metrics

    _one_process("pretrain", two_ranks, tiny_checkpoint, "name=one", "batch_size=8")
    runs = two_ranks / "runs"
    one, two = _losses(runs / "one" / "pretrain"), _losses(runs / "two" / "pretrain")
    assert sorted(two) == [1, 2, 3]
    # every rank draws the same global batch of 8 windows and trains on its 4: the mean of two 4-window means is the
    # 8-window mean, so as for the RM only fp32 summation order differs (measured 5e-7 on the loss)
    for step, loss in one.items():
        assert two[step] == pytest.approx(loss, abs=1e-5)
    val = [
        [r["val/loss"] for r in read_metrics(runs / n / "pretrain") if "val/loss" in r]
        for n in ("one", "two")
    ]
    assert len(val[1]) == 2 and val[1] == pytest.approx(
        val[0], abs=1e-5
    )  # steps 0 and 3, on the same windows


def test_ppo_runs_to_completion_on_two_processes_with_rollouts_split(two_ranks):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from rlhf.checkpoint import load_state
    from rlhf.tracking import read_metrics

    stage = two_ranks / "runs" / "two" / "ppo"
    rows = read_metrics(stage)
    assert [r["step"] for r in rows] == [1, 2]  # rank 0 alone writes metrics (averaged over the ranks)
    assert all(torch.isfinite(torch.tensor(r["objective/kl"])) for r in rows)
    # each rank sampled its 4 of the 8 prompts with its own generator: the checkpoint keeps both generators
    state = load_state(stage / "checkpoints" / "step-0000002")
    assert len(state["generators"]) == 2 and not torch.equal(state["generators"][0], state["generators"][1])
    assert (
        stage / "checkpoints" / "step-0000002" / "policy" / "adapter_config.json"
    ).exists()  # LoRA adapters
    # the final policy is merged into plain GPT-2 weights and loads without PEFT (the run itself checked that both
    # ranks ended with the same weights: distributed.check_in_sync)
    assert not (stage / "model" / "adapter_config.json").exists()
    policy = AutoModelForCausalLM.from_pretrained(stage / "model")
    assert set(load_file(stage / "model" / "model.safetensors")) == set(policy.state_dict()) - {
        "lm_head.weight"
    }
    assert (stage / "value" / "model.safetensors").exists()
