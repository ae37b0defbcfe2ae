"""Tokenizer and model building/loading: round trips, distinct special tokens, no hub, same logits after save/load."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import DATA, SLICE_TEXT
from rlhf.checkpoint import latest_checkpoint, save_checkpoint
from rlhf.errors import UserError
from rlhf.modeling import (
    BOS,
    EOS,
    PAD,
    build_model,
    load_causal_lm,
    load_policy,
    load_tokenizer,
    train_tokenizer,
)


def test_tokenizer_round_trips_shipped_text(tiny_tokenizer):
    for path in (SLICE_TEXT, DATA / "slices" / "tinyshakespeare.first32k.txt"):
        text = path.read_text(encoding="utf-8")[:6000]
        ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tiny_tokenizer.decode(ids) == text
        assert len(ids) < 0.7 * len(text)  # merges were learned: well under one token per byte (vocab 512)
    odd = "naïve café — “quotes”, tabs\tand 🙂 emoji\n"
    assert tiny_tokenizer.decode(tiny_tokenizer(odd, add_special_tokens=False)["input_ids"]) == odd


def test_special_tokens_distinct_and_survive_save_load(tiny_tokenizer, tmp_path):
    tok = tiny_tokenizer
    ids = {tok.pad_token_id, tok.bos_token_id, tok.eos_token_id}
    assert len(ids) == 3 and None not in ids
    assert (tok.pad_token, tok.bos_token, tok.eos_token) == (PAD, BOS, EOS)
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(str(tmp_path))  # plain transformers, no rlhf code
    assert (again.pad_token_id, again.bos_token_id, again.eos_token_id) == (
        tok.pad_token_id,
        tok.bos_token_id,
        tok.eos_token_id,
    )
    text = "Once upon a time" + EOS
    assert (
        again(text, add_special_tokens=False)["input_ids"] == tok(text, add_special_tokens=False)["input_ids"]
    )
    assert (
        again(text, add_special_tokens=False)["input_ids"][-1] == tok.eos_token_id
    )  # EOS is one atomic token


def test_foreign_tokenizer_without_pad_gets_a_distinct_pad(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel()
    raw.train_from_iterator(
        ["hello world"] * 10, trainers.BpeTrainer(vocab_size=300, special_tokens=["</s>"])
    )
    PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="</s>").save_pretrained(tmp_path)
    tok = load_tokenizer(tmp_path)
    assert tok.pad_token_id is not None and tok.bos_token_id is not None
    assert tok.pad_token_id != tok.eos_token_id


def test_tiny_preset_shape(tiny_tokenizer):
    model = build_model("tiny", tiny_tokenizer)
    cfg = model.config
    assert (cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.n_positions) == (4, 256, 4, 256)
    assert cfg.vocab_size == len(tiny_tokenizer) and cfg.pad_token_id == tiny_tokenizer.pad_token_id
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()  # tied head
    with pytest.raises(UserError, match="unknown model preset 'huge'"):
        build_model("huge", tiny_tokenizer)


def test_missing_paths_are_clear_errors(tmp_path):
    with pytest.raises(UserError, match="never downloads"):
        load_causal_lm("gpt2")  # a hub name is not a local path
    with pytest.raises(UserError, match="no config.json"):
        load_causal_lm(tmp_path)
    with pytest.raises(UserError, match="tokenizer not found"):
        load_tokenizer(tmp_path / "nope")


def test_checkpoint_loads_in_plain_transformers_with_same_logits(tiny_tokenizer, tmp_path):
    from conftest import make_tiny_model

    model = make_tiny_model(tiny_tokenizer, seed=3).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    batch = torch.randint(3, len(tiny_tokenizer), (2, 16))
    model(input_ids=batch, labels=batch).loss.backward()
    opt.step()  # weights now differ from any fresh init
    model.eval()
    save_checkpoint(tmp_path, 1, {"": (model, tiny_tokenizer)}, {"optimizer": opt.state_dict()})
    folder = latest_checkpoint(tmp_path)
    plain = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    with torch.no_grad():
        assert torch.equal(plain(input_ids=batch).logits, model(input_ids=batch).logits)
    assert AutoTokenizer.from_pretrained(str(folder)).eos_token_id == tiny_tokenizer.eos_token_id
    loaded, tok = load_policy(str(folder))
    assert len(tok) == len(tiny_tokenizer) and loaded.config.pad_token_id == tiny_tokenizer.pad_token_id


def test_train_tokenizer_respects_vocab_size():
    tok = train_tokenizer(SLICE_TEXT.read_text(encoding="utf-8").splitlines(), vocab_size=300)
    assert len(tok) == 300
