"""`rlhf sft` and `rlhf sample`: the loss mask, learning on a shipped slice, resume, and K samples per prompt."""

from __future__ import annotations

import json
import math
import shutil
from types import SimpleNamespace

import pytest
import torch

from conftest import DATA
from rlhf.config import load_config
from rlhf.data.records import Demonstration, read_samples
from rlhf.data.template import encode_prompt, encode_response
from rlhf.errors import UserError
from rlhf.modeling import load_causal_lm
from rlhf.stages import sample, sft

SLICE = str(DATA / "slices" / "self-instruct_seed_tasks.first32.jsonl")


def test_loss_mask_on_a_hand_built_example(tiny_tokenizer):
    tok = tiny_tokenizer
    short = sft.build_example(tok, Demonstration("Hi", "Yo"), max_length=64)
    prompt, response = encode_prompt(tok, "Hi"), encode_response(tok, "Yo")
    assert response[-1] == tok.eos_token_id
    assert short.input_ids == prompt + response
    assert short.labels == [-100] * len(prompt) + response
    longer = sft.build_example(tok, Demonstration("Hello there", "Good day to you"), max_length=64)
    batch = sft.collate([short, longer], tok.pad_token_id)
    width = len(longer.input_ids)
    assert batch["input_ids"].shape == (2, width)  # padded to the longest of this batch only
    assert batch["labels"][0].tolist() == short.labels + [-100] * (width - len(short.input_ids))
    assert batch["attention_mask"][0].sum() == len(short.input_ids)

    # A stub model whose logits we control: uniform logits cost log(V) per labelled token, nothing elsewhere.
    vocab = len(tok)
    logits = torch.zeros(2, width, vocab)

    def model(**_):
        return SimpleNamespace(logits=logits)

    n_labelled = len(response) + len(encode_response(tok, "Good day to you"))
    loss, count = sft.response_loss_sum(model, batch)
    assert count == n_labelled
    assert loss.item() == pytest.approx(n_labelled * math.log(vocab), rel=1e-5)
    # Anything predicted at prompt or padding positions carries no loss ...
    logits[0, : len(prompt) - 1] = torch.randn(len(prompt) - 1, vocab) * 10
    logits[0, len(short.input_ids) :] = torch.randn(width - len(short.input_ids), vocab) * 10
    assert sft.response_loss_sum(model, batch)[0].item() == pytest.approx(loss.item(), rel=1e-5)
    # ... while predicting the final EOS (a labelled token) removes exactly its log(V).
    logits[0, len(short.input_ids) - 2, tok.eos_token_id] = 30.0
    assert sft.response_loss_sum(model, batch)[0].item() == pytest.approx(
        loss.item() - math.log(vocab), abs=1e-3
    )


def sft_config(checkpoint, runs, **kw):
    overrides = {
        "model.path": str(checkpoint),
        "runs_dir": str(runs),
        "data": [SLICE],
        "val_fraction": 0.2,
        "batch_size": 4,
        "lr": 3e-3,
        "warmup_steps": 2,
        "max_length": 128,
        "eval_every": 4,
        "sample_prompts": 2,
        **kw,
    }
    return load_config(sft.SFTConfig, extra=overrides)


def test_sft_lowers_held_out_loss_and_resumes_exactly(tiny_checkpoint, tmp_path):
    config = sft_config(
        tiny_checkpoint, tmp_path / "a", max_steps=8, save_every=4, patience=0, sample_prompts=0
    )
    summary = sft.run(config)
    assert summary["steps"] == 8
    assert summary["val_loss"] < summary["val_loss_start"] - 0.5  # learning happened on held-out prompts
    uninterrupted = load_causal_lm(summary["model"]).state_dict()
    metrics = [json.loads(line) for line in open(tmp_path / "a" / "demo" / "sft" / "metrics.jsonl")]
    assert any("train/loss" in m for m in metrics) and any("val/loss" in m for m in metrics)

    # Kill after step 4: drop the newer checkpoint and the model, then resume.
    out = tmp_path / "a" / "demo" / "sft"
    shutil.rmtree(out / "checkpoints" / "step-0000008")
    shutil.rmtree(out / "model")
    resumed = sft.run(
        sft_config(
            tiny_checkpoint,
            tmp_path / "a",
            max_steps=8,
            save_every=4,
            patience=0,
            sample_prompts=0,
            resume=True,
        )
    )
    assert resumed["val_loss"] == pytest.approx(summary["val_loss"], abs=1e-6)
    again = load_causal_lm(resumed["model"]).state_dict()
    for name, tensor in uninterrupted.items():
        torch.testing.assert_close(again[name], tensor, atol=1e-6, rtol=1e-5)


def test_early_stopping_keeps_the_best_weights(tiny_checkpoint, tmp_path):
    # A learning rate this high makes the held-out loss get worse after the first evaluations.
    summary = sft.run(
        sft_config(tiny_checkpoint, tmp_path, lr=0.3, warmup_steps=0, max_steps=40, eval_every=2, patience=2)
    )
    assert summary["stopped_early"] and summary["steps"] < 40
    metrics = [json.loads(line) for line in open(tmp_path / "demo" / "sft" / "metrics.jsonl")]
    vals = [m["val/loss"] for m in metrics if "val/loss" in m]
    assert summary["val_loss"] == pytest.approx(min(vals))


def test_config_rejects_nothing_to_train():
    with pytest.raises(UserError, match="epochs"):
        load_config(sft.SFTConfig, overrides=["epochs=0"])


def test_rlhf_sample_writes_k_responses_per_prompt(tiny_checkpoint, tiny_tokenizer, tmp_path):
    eos = tiny_tokenizer.eos_token_id
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Tell me a story.\nName a colour.\nWhy is the sky blue?\n", encoding="utf-8")
    out = tmp_path / "samples.jsonl"
    argv = [
        f"model.path={tiny_checkpoint}",
        f"prompts={prompts}",
        f"runs_dir={tmp_path}",
        "max_new_tokens=12",
    ]
    assert sample.main([*argv, "--k", "4", f"out={out}", "batch_size=5"]) == 0
    records = read_samples(out)
    assert [r.prompt for r in records] == ["Tell me a story.", "Name a colour.", "Why is the sky blue?"]
    for record in records:
        assert len(record.responses) == 4
        assert record.meta["temperature"] == 1.0
        for r in record.responses:
            assert 1 <= len(r.token_ids) <= 12 and r.logprob < 0 and r.policy == str(tiny_checkpoint)
            if r.finished:
                assert r.token_ids[-1] == eos and eos not in r.token_ids[:-1]
            else:
                assert len(r.token_ids) == 12 and eos not in r.token_ids
    # Same seed, same file; K out of range and an empty prompt file are clear errors that write nothing.
    again = tmp_path / "again.jsonl"
    sample.main([*argv, "k=4", f"out={again}", "batch_size=5"])
    assert again.read_text() == out.read_text()
    with pytest.raises(UserError, match="'k'"):
        sample.main([*argv, "k=10", f"out={tmp_path / 'bad.jsonl'}"])
    empty = tmp_path / "empty.txt"
    empty.write_text("\n", encoding="utf-8")
    with pytest.raises(UserError, match="no prompts"):
        sample.main([f"model.path={tiny_checkpoint}", f"prompts={empty}", f"runs_dir={tmp_path}", "k=2"])
    assert not (tmp_path / "bad.jsonl").exists()
    # A prompt longer than the context: an error by default, or skipped and counted with long_prompts=skip.
    long = tmp_path / "long.txt"
    long.write_text("Short one.\n" + "word " * 300 + "\n", encoding="utf-8")
    base = [
        f"model.path={tiny_checkpoint}",
        f"prompts={long}",
        f"runs_dir={tmp_path}",
        "k=2",
        "max_new_tokens=8",
    ]
    with pytest.raises(UserError, match="context"):
        sample.main([*base, f"out={tmp_path / 'long.jsonl'}"])
    assert not (tmp_path / "long.jsonl").exists()
    sample.main([*base, f"out={tmp_path / 'long.jsonl'}", "long_prompts=skip"])
    assert [r.prompt for r in read_samples(tmp_path / "long.jsonl")] == ["Short one."]


def test_response_only_head_equals_the_full_forward(tiny_model, tiny_tokenizer):
    examples = [
        sft.build_example(tiny_tokenizer, Demonstration("Hi there", "Yo ho ho, a story."), 64),
        sft.build_example(tiny_tokenizer, Demonstration("Hello there friend of mine", "Good"), 64),
    ]
    batch = sft.collate(examples, tiny_tokenizer.pad_token_id)

    class Wrapped(torch.nn.Module):  # not a GPT2LMHeadModel: takes the generic full-logits path
        def __init__(self):
            super().__init__()
            self.inner = tiny_model

        def forward(self, **kw):
            return self.inner(**kw)

    def loss_and_grads(model):
        loss, n = sft.response_loss_sum(model, batch)
        loss.backward()
        grads = [p.grad.clone() for p in tiny_model.parameters()]
        tiny_model.zero_grad()
        return loss.detach(), n, grads

    fast, n_fast, fast_grads = loss_and_grads(tiny_model)
    full, n_full, full_grads = loss_and_grads(Wrapped())
    assert n_fast == n_full
    torch.testing.assert_close(fast, full)
    for a, b in zip(fast_grads, full_grads):  # skipping the prompts' head rows must not change what trains
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
