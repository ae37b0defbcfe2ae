"""The unpadded GPT-2 trunk forward equals Hugging Face's on the padded grid: outputs, gradients, KV caches."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from rlhf.rollout import position_ids
from rlhf.sampling import token_logprobs
from rlhf.unpadded import applies, trunk_forward

PROMPT, RESPONSE = 7, 6
# (left padding of the prompt, real response tokens) per row: a full row, an empty response, long padding
ROWS = [(0, 6), (3, 2), (5, 0), (1, 4), (6, 5)]


def tiny_lm(seed: int = 0, **overrides) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(
        n_layer=2,
        n_head=4,
        n_embd=32,
        vocab_size=64,
        n_positions=32,
        bos_token_id=0,
        eos_token_id=0,
        **overrides,
    )
    return GPT2LMHeadModel(config).eval()


def padded_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """(B, P + T) ids and mask: prompts left-padded, responses right-padded, as a PPO rollout lays them out."""
    torch.manual_seed(1)
    ids = torch.randint(1, 64, (len(ROWS), PROMPT + RESPONSE))
    mask = torch.ones_like(ids, dtype=torch.bool)
    for row, (left, real) in enumerate(ROWS):
        mask[row, :left] = False
        mask[row, PROMPT + real :] = False
    return ids, mask


def hf_hidden(trunk, ids, mask, **kw) -> torch.Tensor:
    return trunk(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), **kw).last_hidden_state


@pytest.mark.parametrize("kernel", [False, True])
@pytest.mark.parametrize("bf16", [False, True])
def test_forward_equals_hugging_face_on_real_tokens_and_pads_come_back_zero(bf16, kernel, monkeypatch):
    """Either attention (plain matmuls, or the SDPA kernel a no-grad caller may ask for) gives the same forward."""
    import rlhf.unpadded

    kernel_calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(
        rlhf.unpadded.F,
        "scaled_dot_product_attention",
        lambda *a, **k: (kernel_calls.append(1), sdpa(*a, **k))[1],
    )
    trunk = tiny_lm().transformer
    ids, mask = padded_batch()
    assert applies(trunk, mask, ids.shape[1])  # 37 % padding: the unpadded path runs
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        expected = hf_hidden(trunk, ids, mask)
        kernel_calls.clear()  # Hugging Face's own attention may call it too
        ours, cache = trunk_forward(trunk, ids, mask, position_ids(mask), kernel_without_grad=kernel)
    assert cache is None and len(kernel_calls) == (2 if kernel else 0)  # once per layer, or never
    tolerance = 2e-2 if bf16 else 1e-5
    assert torch.allclose(ours[mask], expected[mask], atol=tolerance)
    assert ours[~mask].abs().max() == 0


def test_gradients_equal_hugging_face():
    ids, mask = padded_batch()
    grads = []
    for unpadded in (False, True):
        model = tiny_lm()
        hidden = (
            trunk_forward(model.transformer, ids, mask, position_ids(mask))[0]
            if unpadded
            else hf_hidden(model.transformer, ids, mask)
        )
        (hidden[mask] ** 2).sum().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for name, g in grads[0].items():  # fp32 rounding: the attention sums in another order
        assert (grads[1][name] - g).abs().max() <= 1e-4 * g.abs().max(), name


def test_kv_cache_of_the_prompt_works_either_way_round():
    """A prefix cache built here continues in Hugging Face's forward and vice versa, like one full pass."""
    trunk = tiny_lm().transformer
    ids, mask = padded_batch()
    with torch.no_grad():
        full = hf_hidden(trunk, ids, mask)
        head = mask[:, : PROMPT - 1]
        ours_prefix = trunk_forward(trunk, ids[:, : PROMPT - 1], head, position_ids(head), use_cache=True)[1]
        hf_prefix = trunk(
            input_ids=ids[:, : PROMPT - 1],
            attention_mask=head,
            position_ids=position_ids(head),
            use_cache=True,
        ).past_key_values
        rest_ids, rest_positions = ids[:, PROMPT - 1 :], position_ids(mask)[:, PROMPT - 1 :]
        hf_rest = trunk(
            input_ids=rest_ids,
            attention_mask=mask,
            position_ids=rest_positions,
            past_key_values=ours_prefix,
            use_cache=True,
        ).last_hidden_state
        ours_rest, _ = trunk_forward(trunk, rest_ids, mask, rest_positions, past=hf_prefix, use_cache=True)
    real = mask[:, PROMPT - 1 :]
    assert torch.allclose(hf_rest[real], full[:, PROMPT - 1 :][real], atol=1e-5)
    assert torch.allclose(ours_rest[real], full[:, PROMPT - 1 :][real], atol=1e-5)


def test_full_grids_and_active_dropout_take_the_hugging_face_forward():
    ids, mask = padded_batch()
    trunk = tiny_lm().transformer
    assert not applies(trunk, torch.ones_like(mask), ids.shape[1])  # nothing to skip
    assert not applies(tiny_lm(resid_pdrop=0.1).transformer.train(), mask, ids.shape[1])
    assert applies(tiny_lm(resid_pdrop=0.1).transformer, mask, ids.shape[1])  # eval mode: dropout is off


def test_gradient_checkpointing_recomputes_each_layer_with_the_same_gradients():
    ids, mask = padded_batch()
    grads = []
    for checkpointing in (False, True):
        model = tiny_lm(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        calls = []
        if checkpointing:
            model.gradient_checkpointing_enable()
            model.train()
            for block in model.transformer.h:
                replay = block._gradient_checkpointing_func
                block._gradient_checkpointing_func = lambda f, *a, r=replay, c=calls: (c.append(1), r(f, *a))[
                    1
                ]
        hidden, _ = trunk_forward(model.transformer, ids, mask, position_ids(mask))
        (hidden[mask] ** 2).sum().backward()
        assert len(calls) == (2 if checkpointing else 0)
        grads.append([p.grad for p in model.parameters()])
    for a, b in zip(*grads):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)


def test_token_logprobs_take_the_unpadded_path_with_the_same_numbers(monkeypatch):
    import rlhf.sampling

    calls = []
    unpadded = rlhf.sampling.trunk_forward
    monkeypatch.setattr(
        rlhf.sampling, "trunk_forward", lambda *a, **k: (calls.append(1), unpadded(*a, **k))[1]
    )
    model = tiny_lm()
    ids, mask = padded_batch()
    start = PROMPT - 1
    ours = token_logprobs(model, ids, mask, start=start)  # (B, T)
    assert calls == [1]
    logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask)).logits[:, start:-1]
    expected = torch.log_softmax(logits, -1).gather(-1, ids[:, start + 1 :, None]).squeeze(-1)
    real = mask[:, start + 1 :]
    assert ours.shape == expected.shape == (len(ROWS), RESPONSE)
    assert torch.allclose(ours[real], expected[real], atol=1e-5)
