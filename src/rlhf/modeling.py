"""Tokenizers and causal LMs: train a byte-level BPE, build a preset GPT-2-style model, load/save local checkpoints.

Nothing here ever reaches a model hub: the offline switches are set when `rlhf` is imported, and every path must
exist locally.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from rlhf.errors import UserError

log = logging.getLogger("rlhf")

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"

# GPT-2-style presets. `tiny` is the peer set-up of PERF-NOTES (4 layers, d=256, 4 heads, 256 positions).
PRESETS: dict[str, dict[str, int]] = {
    "tiny": {"n_layer": 4, "n_head": 4, "n_embd": 256, "n_positions": 256},
    "small": {"n_layer": 6, "n_head": 6, "n_embd": 384, "n_positions": 512},
    "medium": {"n_layer": 8, "n_head": 8, "n_embd": 512, "n_positions": 1024},
}


def local_path(path: str | Path, what: str) -> Path:
    """`path` as an existing local folder, or a clear error (hub names are never looked up)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"{what} not found: '{path}' is not a local path (rlhf never downloads from a hub)")
    return p


def train_tokenizer(texts: Iterable[str], vocab_size: int = 8192) -> Any:
    """Train a byte-level BPE with distinct PAD, BOS and EOS tokens, wrapped as a Hugging Face fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD)


def load_tokenizer(path: str | Path) -> Any:
    """A local Hugging Face tokenizer; one without a PAD token gets a PAD distinct from EOS added."""
    from transformers import AutoTokenizer

    folder = local_path(path, "tokenizer")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load a tokenizer from '{folder}': {exc}") from None
    ensure_special_tokens(tokenizer)
    return tokenizer


def ensure_special_tokens(tokenizer: Any) -> None:
    """Every model we train needs BOS, EOS and a PAD that is not EOS (else EOS would be masked as padding)."""
    if tokenizer.eos_token is None:
        tokenizer.add_special_tokens({"eos_token": EOS})
    if tokenizer.bos_token is None:
        tokenizer.add_special_tokens({"bos_token": BOS})
    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        tokenizer.add_special_tokens({"pad_token": PAD})


def build_model(preset: str, tokenizer: Any, context: int = 0, dropout: float = 0.0) -> Any:
    """A fresh GPT-2-style causal LM sized by `preset`, with the tokenizer's vocabulary and special ids."""
    from transformers import GPT2Config, GPT2LMHeadModel

    if preset not in PRESETS:
        raise UserError(f"unknown model preset '{preset}' (choose from {', '.join(PRESETS)})")
    shape = dict(PRESETS[preset])
    if context:
        shape["n_positions"] = context
    config = GPT2Config(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        resid_pdrop=dropout,
        embd_pdrop=dropout,
        attn_pdrop=dropout,
        tie_word_embeddings=True,
        **shape,
    )
    return GPT2LMHeadModel(config)


def load_causal_lm(path: str | Path, dtype: torch.dtype | None = None) -> Any:
    from transformers import AutoModelForCausalLM

    folder = local_path(path, "model checkpoint")
    if not (folder / "config.json").exists():
        raise UserError(f"'{folder}' has no config.json: not a Hugging Face checkpoint folder")
    try:
        return AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype or torch.float32)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load a causal LM from '{folder}': {exc}") from None


def context_length(model: Any) -> int:
    config = model.config
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(config, attr, None)
        if value:
            return int(value)
    return 2048


def resize_for_tokenizer(model: Any, tokenizer: Any) -> None:
    """Grow the embeddings when special tokens were added to a loaded tokenizer."""
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.eos_token_id = tokenizer.eos_token_id
    model.config.bos_token_id = tokenizer.bos_token_id


def load_policy(
    model_path: str, tokenizer_path: str = "", dtype: torch.dtype | None = None
) -> tuple[Any, Any]:
    """(model, tokenizer) from a local checkpoint folder; the tokenizer comes from the same folder by default."""
    tokenizer = load_tokenizer(tokenizer_path or model_path)
    model = load_causal_lm(model_path, dtype)
    resize_for_tokenizer(model, tokenizer)
    return model, tokenizer


def count_parameters(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())


def autocast(enabled: bool, device: str = "cpu"):
    """bf16 autocast on CPU or CUDA when `enabled`, else a no-op context."""
    kind = "cuda" if str(device).startswith("cuda") else "cpu"
    return torch.autocast(device_type=kind, dtype=torch.bfloat16, enabled=enabled)
