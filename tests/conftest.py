"""Shared fixtures: a tiny tokenizer and a tiny random GPT-2, built in seconds from shipped text."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data"
SLICE_TEXT = DATA / "slices" / "bryant-stories.first32k.txt"

# Two threads, as on CI; a test never waits on a terminal progress bar.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from rlhf.modeling import train_tokenizer

    lines = SLICE_TEXT.read_text(encoding="utf-8").splitlines()
    return train_tokenizer(lines, vocab_size=512)


def make_tiny_model(tokenizer, seed: int = 0, n_layer: int = 2, n_embd: int = 64, n_positions: int = 128):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_layer=n_layer,
        n_head=2,
        n_embd=n_embd,
        n_positions=n_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(config).eval()


@pytest.fixture()
def tiny_model(tiny_tokenizer):
    return make_tiny_model(tiny_tokenizer)


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_tokenizer, tmp_path_factory) -> Path:
    """A random tiny GPT-2 + tokenizer saved as a local Hugging Face folder (what stages take as `model.path`)."""
    folder = tmp_path_factory.mktemp("tiny_ckpt")
    model = make_tiny_model(tiny_tokenizer)
    model.save_pretrained(folder, safe_serialization=True)
    tiny_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture()
def bf16_on_any_cpu(monkeypatch):
    """Tests of the bf16 path itself keep bf16 where the CPU would make a stage fall back to fp32 (slowly, but
    they are small): without this they would silently compare fp32 with fp32 there."""
    monkeypatch.setenv("RLHF_CPU_BF16", "1")
