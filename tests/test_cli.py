"""`rlhf pretrain` through the real CLI entry point: help, config errors and bad corpora give one line, exit 2."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import SLICE_TEXT
from rlhf.cli import main


@pytest.fixture(autouse=True)
def _restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def one_error_line(capsys, argv: list[str]) -> str:
    """Run the CLI, expect exit code 2 and exactly one line on stderr (no traceback); return that line."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("rlhf pretrain: error: ")
    return err


def test_help_lists_every_field(capsys):
    assert main(["pretrain", "--help"]) == 0
    out = capsys.readouterr().out
    for name in (
        "model.preset",
        "model.vocab_size",
        "data",
        "val_fraction",
        "block_size",
        "grad_accum",
        "warmup_steps",
        "min_lr",
        "grad_clip",
        "checkpoint_every",
        "bf16",
        "resume",
        "sample_prompt",
    ):
        assert f"  {name} " in out, name


def test_config_errors_name_the_field(capsys, tmp_path):
    err = one_error_line(capsys, ["pretrain", "blok_size=64"])
    assert "unknown field 'blok_size'" in err and "did you mean 'block_size'" in err
    err = one_error_line(capsys, ["pretrain", "--max-steps", "many"])
    assert "'max_steps': expected an integer" in err
    err = one_error_line(capsys, ["pretrain", "model.preset=huge"])
    assert "'model.preset': must be one of tiny, small, medium" in err
    err = one_error_line(capsys, ["pretrain", "lr=1e-4", "min_lr=1e-3"])
    assert "'min_lr'" in err
    preset = tmp_path / "p.yaml"
    preset.write_text("model:\n  vocab: 100\n")
    assert "unknown field 'model.vocab'" in one_error_line(capsys, ["pretrain", "--config", str(preset)])
    err = one_error_line(capsys, ["pretrain", "model.context=32", "block_size=64"])
    assert "'block_size'" in err


def test_bad_corpora_one_line_each(capsys, tmp_path):
    runs = tmp_path / "runs"
    common = [f"runs_dir={runs}", "model.vocab_size=300", "block_size=64"]
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes(b"Once upon a time\nthere was a caf\xe9.\n")
    small = tmp_path / "small.txt"
    small.write_text("Once upon a time there was a little dog.\n" * 3)

    err = one_error_line(capsys, ["pretrain", str(tmp_path / "missing.txt"), *common])
    assert "corpus file not found" in err and "missing.txt" in err
    assert f"{empty} is empty" in one_error_line(capsys, ["pretrain", f"data={empty}", *common])
    err = one_error_line(capsys, ["pretrain", f"data={SLICE_TEXT},{latin1}", *common])
    assert f"{latin1} is not UTF-8" in err and "byte offset 32" in err
    err = one_error_line(capsys, ["pretrain", str(small), *common])
    assert "corpus too small" in err and "block_size+1=65" in err
    assert not runs.exists()  # rejected before anything was written


def test_pretrain_from_scratch_end_to_end(capsys, tmp_path):
    """The default path: train a BPE on the training split, build the tiny preset, train, save, sample."""
    argv = ["pretrain", str(SLICE_TEXT), f"runs_dir={tmp_path}", "name=cli", "model.vocab_size=400"]
    argv += [
        "block_size=32",
        "batch_size=2",
        "--max-steps",
        "3",
        "eval_batches=1",
        "sample_tokens=5",
        "threads=1",
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "val loss" in out and "sample: Once upon a time" in out
    folder = tmp_path / "cli" / "pretrain" / "model"
    tok = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForCausalLM.from_pretrained(str(folder))
    assert len(tok) == 400 == model.config.vocab_size and model.config.n_layer == 4
    assert len({tok.pad_token_id, tok.bos_token_id, tok.eos_token_id}) == 3
    assert (tmp_path / "cli" / "pretrain" / "checkpoints" / "step-0000003").is_dir()
    assert (tmp_path / "cli" / "pretrain" / "config.yaml").read_text().count("block_size: 32") == 1
