"""LoRA through PEFT: one config section every stage can embed, and the three things stages need from it.

    @dataclass
    class MyStageConfig(StageConfig):
        lora: LoraSettings = option(LoraSettings(), "LoRA adapters instead of full fine-tuning")

    model = apply_lora(model, config.lora)                # a PeftModel when lora.enabled, else `model` unchanged
    with reference_logprobs_with_adapters_disabled(model):  # the frozen base acts as the PPO/DPO reference
        ref = token_logprobs(model, ids, mask)
    merge_and_save(model, tokenizer, out / "model")        # a plain Hugging Face checkpoint, adapters folded in

LoRA (Hu et al. 2021, https://arxiv.org/abs/2106.09685) freezes the base weights W and trains a low-rank update
W + (alpha / r) * B A. With adapters switched off the model *is* the base, so the reference policy of PPO and DPO
needs no second copy in memory.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rlhf.config import option
from rlhf.errors import UserError

log = logging.getLogger("rlhf")


@dataclass
class LoraSettings:
    """The `lora.*` section of a stage config."""

    enabled: bool = option(False, "train LoRA adapters (PEFT) instead of every weight")
    r: int = option(8, "LoRA rank", low=1, high=4096)
    alpha: float = option(16.0, "LoRA scaling numerator: the update is (alpha / r) * B A", low=0.0)
    dropout: float = option(0.0, "dropout on the LoRA input", low=0.0, high=0.9)
    target_modules: list[str] = option(
        [],
        "module names to adapt (e.g. c_attn,c_proj for GPT-2, q_proj,v_proj for Llama); empty = every linear "
        "layer except the output head",
    )


def is_lora_model(model: Any) -> bool:
    """True for a PEFT model (possibly wrapped by DDP/FSDP)."""
    from peft import PeftModel

    return isinstance(getattr(model, "module", model), PeftModel)


def apply_lora(model: Any, settings: LoraSettings) -> Any:
    """Wrap `model` with fresh LoRA adapters when `settings.enabled`; only adapter weights stay trainable.

    A sequence-classification model (a reward or value model) also trains its `score` head in full: the head is
    new, so the base alone could not score. Returns `model` itself when LoRA is off.
    """
    if not settings.enabled:
        return model
    from peft import LoraConfig, TaskType, get_peft_model

    is_classifier = hasattr(model, "score") and not hasattr(model, "lm_head")
    targets: Any = list(settings.target_modules) or "all-linear"
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in settings.target_modules if t not in names]
    if missing:
        raise UserError(
            f"config field 'lora.target_modules': no module named {', '.join(missing)} in this model "
            f"(linear layers here: {', '.join(sorted(_linear_names(model)))})"
        )
    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=targets,
        task_type=TaskType.SEQ_CLS if is_classifier else TaskType.CAUSAL_LM,
        fan_in_fan_out=_uses_conv1d(model),  # GPT-2 stores its linear layers transposed (transformers Conv1D)
    )
    peft_model = get_peft_model(model, config)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in peft_model.parameters())
    log.info(
        "LoRA r=%d alpha=%g: %d of %d parameters trainable (%.2f%%)",
        settings.r,
        settings.alpha,
        trainable,
        total,
        100.0 * trainable / max(total, 1),
    )
    return peft_model


def _uses_conv1d(model: Any) -> bool:
    from transformers.pytorch_utils import Conv1D

    return any(isinstance(m, Conv1D) for m in model.modules())


def _linear_names(model: Any) -> set[str]:
    from transformers.pytorch_utils import Conv1D

    return {
        n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, Conv1D))
    }


@contextlib.contextmanager
def reference_logprobs_with_adapters_disabled(model: Any) -> Iterator[Any]:
    """Inside the block `model` computes as the frozen base: adapters off, eval mode (no dropout), no grad.

    The yielded object is the unwrapped PEFT model; the training mode is restored on exit. Raises ValueError for a
    model without adapters: full fine-tuning needs a separate frozen reference copy.
    """
    if not is_lora_model(model):
        raise ValueError("model has no LoRA adapters: keep a separate frozen reference model")
    peft_model = getattr(model, "module", model)
    was_training = peft_model.training
    peft_model.eval()
    try:
        with peft_model.disable_adapter(), torch.no_grad():
            yield peft_model
    finally:
        peft_model.train(was_training)


def merge_and_save(model: Any, tokenizer: Any, folder: str | Path, keep_adapters: bool = False) -> Any:
    """Save a plain Hugging Face checkpoint (safetensors + tokenizer) loadable without PEFT; return that model.

    With adapters, they are folded into the base weights (W + (alpha/r) B A) and removed: `model` must not be
    trained further afterwards; use the returned plain model. `keep_adapters=True` merges a copy instead (a
    snapshot in the middle of training; costs one model's memory while saving). Without adapters: a plain save.
    """
    import copy

    from rlhf.checkpoint import save_hf

    model = getattr(model, "module", model)
    if is_lora_model(model):
        model = (copy.deepcopy(model) if keep_adapters else model).merge_and_unload()
    save_hf(model, tokenizer, folder)
    return model


def load_adapter_checkpoint(model: Any, folder: str | Path) -> None:
    """Load the adapter weights a checkpoint saved (`PeftModel.save_pretrained`) into `model`'s adapters."""
    from peft import set_peft_model_state_dict
    from peft.utils import load_peft_weights

    try:
        weights = load_peft_weights(str(folder), device="cpu")
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read LoRA adapter weights from '{folder}': {exc}") from None
    result = set_peft_model_state_dict(getattr(model, "module", model), weights)
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    if unexpected:
        raise UserError(f"adapter weights in '{folder}' do not fit this model (unexpected: {unexpected[:3]})")
