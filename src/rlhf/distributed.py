"""Thin helpers over Hugging Face Accelerate, the distribution layer of every training stage.

Accelerate does the work (process groups, DDP/FSDP/DeepSpeed wrapping, gradient all-reduce, bf16 autocast); this
module only maps a stage config onto it and keeps the rules in one place:

- one process, or `accelerate launch -m rlhf <stage> ...`, or `rlhf <stage> ... num_processes=N` (re-launched
  through `accelerate launch`): the same code path. On CPU the processes talk over gloo.
- every rank reads the same data and takes its slice of each *global* batch (`rank_slice`), so N processes x batch
  b make the same optimizer steps as 1 process x batch N*b;
- only the main process writes the run folder (config, log, metrics, checkpoints, final model).

Stage config fields read here (all optional, with these defaults): `device` ("cpu"), `bf16` (False),
`gradient_checkpointing` (False), `num_processes` (1), `accelerate_config` (""). `TrainingStageConfig` declares
them (and `lora`) once for the stages that inherit it; the keys are the same flat names every stage used.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rlhf.config import StageConfig, option
from rlhf.errors import UserError
from rlhf.lora import LoraSettings

log = logging.getLogger("rlhf")


@dataclass
class TrainingStageConfig(StageConfig):
    """The switches every training stage shares (docs/scaling.md): precision, memory, processes, LoRA."""

    bf16: bool = option(False, "bf16 autocast for forward/backward; weights and optimizer state stay fp32")
    gradient_checkpointing: bool = option(False, "recompute activations in backward: less memory, more time")
    num_processes: int = option(
        1, "data-parallel processes: >1 re-launches through `accelerate launch`", low=1
    )
    accelerate_config: str = option(
        "", "accelerate config file for the re-launch (configs/accelerate/*.yaml)"
    )
    lora: LoraSettings = option(LoraSettings(), "LoRA adapters (PEFT) instead of full fine-tuning")


def launched_by_accelerate() -> bool:
    """True inside a process started by `accelerate launch` / torchrun (a rank of a group, possibly of one)."""
    return "LOCAL_RANK" in os.environ or "ACCELERATE_MIXED_PRECISION" in os.environ


def relaunch(config: Any, stage: str, argv: Sequence[str]) -> int | None:
    """When `num_processes` > 1 and we are not yet a launched rank, run this stage again under `accelerate launch`
    with N processes and return its exit code; otherwise return None and the caller trains in this process."""
    n = int(getattr(config, "num_processes", 1) or 1)
    if n <= 1 or launched_by_accelerate():
        return None
    cmd = launch_command(n, getattr(config, "accelerate_config", ""), ["-m", "rlhf", stage, *argv])
    log.info("re-launching on %d processes: %s", n, " ".join(cmd[1:]))
    return subprocess.call(cmd)


def launch_command(n: int, accelerate_config: str, target: Sequence[str]) -> list[str]:
    """`accelerate launch` of `target` (["-m", "rlhf", stage, ...] or a script and its arguments) on n processes."""
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--num_processes",
        str(n),
        "--num_machines",
        "1",
    ]
    if accelerate_config:
        if not Path(accelerate_config).is_file():
            raise UserError(f"config field 'accelerate_config': file not found: {accelerate_config}")
        cmd += ["--config_file", accelerate_config]
    else:
        # Accelerate's torchrun launcher; on a machine without GPUs the ranks find `device=cpu` and use gloo.
        cmd += ["--multi_gpu", "--mixed_precision", "no", "--dynamo_backend", "no"]
    return [*cmd, *target]


def build_accelerator(config: Any) -> Any:
    """An `Accelerator` for a stage config: CPU (gloo between ranks) or CUDA, bf16 autocast when `bf16`.

    Gradient accumulation is left to the stage (`maybe_no_sync`), so the global batch stays explicit. Stages may
    run one after another in one process (`rlhf loop`) with different precisions: the per-run settings are reset,
    the process group is kept.
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    device = str(getattr(config, "device", "cpu"))
    on_cpu = device == "cpu"
    if not on_cpu and not device.startswith("cuda"):
        raise UserError(f"config field 'device': expected cpu, cuda or cuda:N, got '{device}'")
    if not on_cpu and not torch.cuda.is_available():
        raise UserError(f"config field 'device': '{device}' asked for, but torch sees no CUDA device")
    if device.startswith("cuda:") and not launched_by_accelerate():
        torch.cuda.set_device(int(device.split(":", 1)[1]))
    AcceleratorState._reset_state(reset_partial_state=False)
    # bf16=true wins; otherwise the launcher's setting (accelerate config `mixed_precision`), default none
    return Accelerator(cpu=on_cpu, mixed_precision="bf16" if getattr(config, "bf16", False) else None)


def start_run_on_main(accelerator: Any, config: Any, stage: str) -> Path:
    """`tracking.start_run` on the main process only (it writes and clears the run folder); every rank is seeded
    and sees the folder before this returns."""
    from rlhf.tracking import seed_everything, stage_dir, start_run

    if accelerator.is_main_process:
        out = start_run(config, stage)
        if accelerator.num_processes > 1:
            log.info(
                "data-parallel on %d processes (%s)", accelerator.num_processes, accelerator.distributed_type
            )
    else:
        out = stage_dir(config, stage)
        if getattr(config, "threads", 0):
            torch.set_num_threads(config.threads)
        seed_everything(config.seed)
        logging.getLogger("rlhf").setLevel(logging.WARNING)  # one voice: the main process logs
    accelerator.wait_for_everyone()
    return out


def enable_gradient_checkpointing(model: Any) -> None:
    """Recompute activations in the backward pass (less memory, ~30% more compute). Works for LoRA models too:
    non-reentrant checkpointing needs no input that requires grad."""
    base = getattr(model, "module", model)
    if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5 (the old name is deprecated)
        base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if getattr(base, "config", None) is not None:
        base.config.use_cache = False


@contextlib.contextmanager
def checkpointing_in_eval_mode(*models: Any) -> Iterator[None]:
    """Inside the block, activation checkpointing works for models kept in eval mode (PPO: dropout off while training).

    transformers checkpoints a layer only when the layer itself is in training mode. This flips the `training` flag
    of the checkpointing layers alone (after `enable_gradient_checkpointing`), not of their children: Dropout and
    attention keep eval behaviour, so the numbers are those of eval mode, and the layers are restored on exit
    (sampling with a KV cache must not run under checkpointing, which drops the cache)."""
    layers = [m for model in models for m in model.modules() if getattr(m, "gradient_checkpointing", False)]
    flags = [m.training for m in layers]
    for m in layers:
        m.training = True
    try:
        yield
    finally:
        for m, flag in zip(layers, flags):
            m.training = flag


def rank_slice(items: Sequence[Any], accelerator: Any) -> list[Any]:
    """This rank's contiguous share of a global batch (equal shares; the batch size must divide evenly)."""
    n, rank = accelerator.num_processes, accelerator.process_index
    if len(items) % n:
        raise ValueError(f"global batch of {len(items)} does not split evenly over {n} processes")
    share = len(items) // n
    return list(items[rank * share : (rank + 1) * share])


def rank_split(items: Sequence[Any], accelerator: Any) -> list[Any]:
    """This rank's contiguous share of a global batch that may not split evenly (sizes differ by at most one).
    For losses normalised by a global count (tokens), which stay exact with unequal shares. Every rank must get
    at least one item, or it would have nothing to forward while the others wait in the gradient all-reduce."""
    n, rank = accelerator.num_processes, accelerator.process_index
    if len(items) < n:
        raise ValueError(f"a global batch of {len(items)} cannot feed {n} processes")
    base, extra = divmod(len(items), n)
    start = rank * base + min(rank, extra)
    return list(items[start : start + base + (1 if rank < extra else 0)])


class _NoMetrics:
    """What non-main ranks get instead of a MetricsLogger: they write nothing."""

    def log(self, step: int, metrics: dict) -> None:
        pass

    def close(self) -> None:
        pass


def metrics_logger(accelerator: Any, out: Path) -> Any:
    """A MetricsLogger on the main process; a silent stand-in elsewhere."""
    from rlhf.tracking import MetricsLogger

    return MetricsLogger(out) if accelerator.is_main_process else _NoMetrics()


def mean_across(accelerator: Any, values: dict[str, float | torch.Tensor]) -> dict[str, float]:
    """Average scalar metrics over ranks (each rank's value weighs the same: use equal per-rank batches)."""
    if not values:
        return {}
    keys = sorted(values)
    local = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=accelerator.device)
    if accelerator.num_processes > 1:
        local = accelerator.reduce(local, reduction="mean")
    return {k: float(v) for k, v in zip(keys, local.tolist())}


def sum_across(accelerator: Any, tensor: torch.Tensor) -> torch.Tensor:
    """Element-wise sum over ranks (ranks fill disjoint entries of a zero tensor to share computed results)."""
    if accelerator.num_processes == 1:
        return tensor
    return accelerator.reduce(tensor.to(accelerator.device), reduction="sum").cpu()


def unwrap(accelerator: Any, model: Any) -> Any:
    """The plain model (no DDP/FSDP/autocast wrapper) for saving or evaluation."""
    return accelerator.unwrap_model(model)


class _GatheredModel:
    """A model whose `save_pretrained` writes a full state dict gathered from sharded ranks."""

    def __init__(self, model: Any, state_dict: dict):
        self.model, self.state_dict = model, state_dict

    def save_pretrained(self, folder: Any, **kwargs: Any) -> None:
        self.model.save_pretrained(folder, state_dict=self.state_dict, **kwargs)


def savable(accelerator: Any, model: Any, inner: str = "") -> Any:
    """What to hand to `save_checkpoint`/`save_hf`. Under FSDP or DeepSpeed the shards are gathered into a full
    state dict first: a collective, so EVERY rank must call this; only the main process then saves.

    `inner` names the attribute holding the Hugging Face model when the prepared module wraps one (the reward
    stage prepares its whole `RewardModel`, whose `.model` is what gets saved)."""
    from accelerate.utils import DistributedType

    plain = unwrap(accelerator, model)
    if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        state = accelerator.get_state_dict(model)
        if inner:
            state = {k[len(inner) + 1 :]: v for k, v in state.items() if k.startswith(inner + ".")}
        return _GatheredModel(getattr(plain, inner) if inner else plain, state)
    return getattr(plain, inner) if inner else plain


@contextlib.contextmanager
def maybe_no_sync(accelerator: Any, model: Any, sync: bool) -> Iterator[None]:
    """Skip the gradient all-reduce on micro-batches that are not the last of an optimizer step."""
    if sync or accelerator.num_processes == 1:
        yield
    else:
        with accelerator.no_sync(model):
            yield


def on_main(accelerator: Any, fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Run `fn` on the main process only (saving, metrics), then let every rank continue together."""
    result = fn(*args, **kwargs) if accelerator.is_main_process else None
    accelerator.wait_for_everyone()
    return result


def replace_folder(src: Path, dst: Path) -> None:
    """Move a fully written folder into place (the final model), replacing an old one."""
    if dst.exists():
        shutil.rmtree(dst)
    os.replace(src, dst)


def all_reduce_gradients(accelerator: Any, params: Any) -> None:
    """Average the gradients of `params` over ranks in one flat all-reduce (what DDP does in its backward hooks).

    For stages whose forward passes do not go through a DDP wrapper (PPO calls the policy trunk and the sampler's
    own decoder directly): call it once per optimizer step, after the last micro-batch's backward and before
    clipping. A parameter without a gradient on this rank counts as zero, so every rank sends the same layout."""
    if accelerator.num_processes == 1:
        return
    params = [p for p in params if p.requires_grad]
    if not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).float() for g in grads]).to(accelerator.device)
    flat = accelerator.reduce(flat, reduction="mean").cpu()
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset : offset + n].view_as(g).to(dtype=p.dtype, device=p.device)
        offset += n


def check_in_sync(accelerator: Any, params: Any, what: str) -> None:
    """Raise when ranks hold different weights (a gradient that was not all-reduced). One tiny collective: the
    float64 sum and sum of squares of the weights, gathered from every rank."""
    if accelerator.num_processes == 1:
        return
    with torch.no_grad():
        flat = [p.detach().double().reshape(-1) for p in params]
        local = torch.stack([sum(f.sum() for f in flat), sum((f * f).sum() for f in flat)])
    every = accelerator.gather(local.to(accelerator.device).view(1, 2)).cpu()  # (world, 2)
    if not torch.allclose(every, every[:1].expand_as(every), rtol=1e-9, atol=0.0):
        raise RuntimeError(f"data-parallel ranks hold different {what} weights: {every.tolist()}")


def gather_generator_states(accelerator: Any, generator: torch.Generator) -> list[torch.Tensor]:
    """Every rank's CPU generator state, rank order (checkpoints of stages whose ranks sample differently)."""
    state = generator.get_state()
    if accelerator.num_processes == 1:
        return [state]
    every = accelerator.gather(state.to(accelerator.device).view(1, -1)).cpu()
    return [row.clone() for row in every]
