"""LoRA via PEFT: only adapters train, the reference is the base with adapters off, merged checkpoints are plain."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import make_tiny_model
from rlhf.errors import UserError
from rlhf.lora import (
    LoraSettings,
    apply_lora,
    is_lora_model,
    load_adapter_checkpoint,
    merge_and_save,
    reference_logprobs_with_adapters_disabled,
)


def _batch(tokenizer, n: int = 4, length: int = 12) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(3, len(tokenizer), (n, length), generator=g)


def _train(model, ids: torch.Tensor, steps: int = 3) -> None:
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


def test_only_adapters_change_and_base_is_the_reference(tiny_tokenizer):
    base = make_tiny_model(tiny_tokenizer, seed=3)
    ids = _batch(tiny_tokenizer)
    with torch.no_grad():
        base_logits = base(input_ids=ids).logits.clone()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    model = apply_lora(base, LoraSettings(enabled=True, r=4, alpha=8, target_modules=["c_attn", "c_fc"]))
    assert is_lora_model(model)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    _train(model, ids)
    after = model.get_base_model().state_dict()
    changed_lora = [k for k, v in after.items() if "lora_B" in k and v.abs().sum() > 0]
    assert changed_lora  # B starts at zero: a nonzero B means the adapters learned
    for key, value in before.items():  # PEFT renames adapted layers' weights to `<layer>.base_layer.weight`
        new_key = key if key in after else key.rsplit(".", 1)[0] + ".base_layer." + key.rsplit(".", 1)[1]
        assert torch.equal(after[new_key], value), key
    with torch.no_grad():
        tuned = model(input_ids=ids).logits
    assert not torch.allclose(tuned, base_logits, atol=1e-4)
    model.train()
    with reference_logprobs_with_adapters_disabled(model) as ref:
        assert not ref.training and not torch.is_grad_enabled()
        ref_logits = ref(input_ids=ids).logits
    assert model.training  # mode restored
    torch.testing.assert_close(ref_logits, base_logits, rtol=0, atol=1e-6)


def test_merged_checkpoint_is_plain_and_scores_the_same(tiny_tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    model = apply_lora(make_tiny_model(tiny_tokenizer, seed=4), LoraSettings(enabled=True, r=4, alpha=16))
    ids = _batch(tiny_tokenizer)
    _train(model, ids)
    model.save_pretrained(tmp_path / "adapter")  # what a LoRA checkpoint holds
    with torch.no_grad():
        unmerged = model(input_ids=ids).logits.clone()
    merge_and_save(model, tiny_tokenizer, tmp_path / "merged")
    files = {p.name for p in (tmp_path / "merged").iterdir()}
    assert "adapter_config.json" not in files and "model.safetensors" in files
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert not any("lora" in k for k in plain.state_dict())
    with torch.no_grad():
        merged = plain(input_ids=ids).logits
    torch.testing.assert_close(merged, unmerged, rtol=1e-4, atol=1e-4)
    # resuming from a checkpoint: fresh adapters on a fresh base, weights loaded, same scores
    again = apply_lora(make_tiny_model(tiny_tokenizer, seed=4), LoraSettings(enabled=True, r=4, alpha=16))
    load_adapter_checkpoint(again, tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(input_ids=ids).logits, unmerged, rtol=1e-5, atol=1e-5)
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["r"] == 4


def test_classifier_head_trains_and_bad_targets_are_named(tiny_tokenizer):
    from transformers import GPT2ForSequenceClassification

    config = make_tiny_model(tiny_tokenizer).config
    config.num_labels = 1
    rm = apply_lora(GPT2ForSequenceClassification(config), LoraSettings(enabled=True, r=2))
    trainable = {n for n, p in rm.named_parameters() if p.requires_grad}
    assert any("score" in n for n in trainable) and any("lora_A" in n for n in trainable)
    assert not any("wte" in n or "ln_f" in n for n in trainable)
    with pytest.raises(UserError, match="lora.target_modules.*q_proj"):
        apply_lora(make_tiny_model(tiny_tokenizer), LoraSettings(enabled=True, target_modules=["q_proj"]))
    off = make_tiny_model(tiny_tokenizer)
    assert apply_lora(off, LoraSettings()) is off
    with pytest.raises(ValueError, match="no LoRA adapters"), reference_logprobs_with_adapters_disabled(off):
        pass


@pytest.mark.parametrize("bf16", [False, True])
def test_fast_sampler_folds_the_adapters_in(tiny_tokenizer, bf16):
    """The fast GPT-2 decoder samples a LoRA policy (adapters on the block linears) with the adapters folded into the
    weights it casts: its log-probs are the adapted model's, and greedy decoding equals the Hugging Face loop's."""
    from peft import LoraConfig, get_peft_model

    from rlhf.data.template import encode_prompt
    from rlhf.fast_gpt2 import FastGPT2
    from rlhf.sampling import generate, join_prompt_response, token_logprobs

    peft = apply_lora(make_tiny_model(tiny_tokenizer, seed=5), LoraSettings(enabled=True, r=4, alpha=8))
    with torch.no_grad():  # B starts at 0: give the adapters a visible effect
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3, generator=torch.Generator().manual_seed(len(name)))
    policy = peft.get_base_model()  # what PPO samples with
    assert FastGPT2.supports(policy)
    prompts = [encode_prompt(tiny_tokenizer, p) for p in ("once upon a time", "the king", "a happy dog ran")]
    settings = dict(max_new_tokens=12, bf16=bf16)
    gen = generate(
        policy,
        tiny_tokenizer,
        prompts,
        temperature=0.8,
        generator=torch.Generator().manual_seed(2),
        **settings,
    )
    ids, mask, start = join_prompt_response(
        prompts, gen.response_ids, gen.response_mask, tiny_tokenizer.pad_token_id
    )
    with torch.no_grad():
        full = token_logprobs(policy, ids, mask, temperature=0.8)[:, start - 1 :]
        with peft.disable_adapter():
            base = token_logprobs(policy, ids, mask, temperature=0.8)[:, start - 1 :]
    real = gen.response_mask
    tolerance = 0.05 if bf16 else 1e-5
    torch.testing.assert_close(gen.logprobs[real], full[real], atol=tolerance, rtol=0)
    assert (gen.logprobs[real] - base[real]).abs().max() > 10 * tolerance  # the adapters matter
    fast = generate(policy, tiny_tokenizer, prompts, greedy=True, **settings)
    loop = generate(policy, tiny_tokenizer, prompts, greedy=True, fast=False, **settings)
    if not bf16:  # bf16 rounding may flip a near-tie between the two paths
        assert torch.equal(fast.response_ids, loop.response_ids)
    # layers the decoder cannot fold (the tied embedding / output head, DoRA) keep the Hugging Face loop
    other = get_peft_model(make_tiny_model(tiny_tokenizer), LoraConfig(r=2, target_modules=["wte"]))
    dora = get_peft_model(
        make_tiny_model(tiny_tokenizer),
        LoraConfig(r=2, target_modules=["c_attn"], use_dora=True, fan_in_fan_out=True),
    )
    assert not FastGPT2.supports(other.get_base_model()) and not FastGPT2.supports(dora.get_base_model())
