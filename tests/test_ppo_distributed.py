"""PPO with LoRA on the policy (one process): the reference is the base with adapters off (no second copy), only
adapters train, the merged policy is a plain Hugging Face model equal to the adapted one. The 2-process PPO run
(rollouts split across ranks) is in tests/test_distributed.py, which shares one launch between stages."""

from __future__ import annotations

import pytest
import torch

from rlhf.lora import load_adapter_checkpoint
from rlhf.stages.ppo import load_models, run
from rlhf.tracking import read_metrics
from test_ppo import prompt_file, target_share, tiny_config  # noqa: F401  (prompt_file: a fixture)


def test_lora_policy_reference_is_the_base_and_merged_policy_is_plain(
    tmp_path,
    tiny_checkpoint,
    prompt_file,  # noqa: F811 (the fixture imported above)
):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    lora = ["lora.enabled=true", "lora.r=4", "lora.alpha=16", "lora.target_modules=c_attn,c_fc"]
    config = tiny_config(
        tmp_path, tiny_checkpoint, prompt_file, *lora, "iterations=2", "batch_size=8", "save_every=1",
        "value_model=" + str(tiny_checkpoint), "threads=1", "lr=2e-2",
    )  # fmt: skip
    models = load_models(config, None, with_reward=False)
    assert models.ref is None and models.peft is not None  # no reference copy in memory
    trainable = [n for n, p in models.policy.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    del models
    summary = run(config, score_fn=target_share)
    rows = read_metrics(tmp_path / "runs" / "demo" / "ppo")
    # iteration 1 samples from the policy whose adapters start at B = 0: it IS the reference, so the KL is 0 up to
    # fp32 rounding between the sampler's log-probs and the reference forward pass (measured 2e-7 per response)
    assert abs(rows[0]["objective/kl"]) < 1e-5 and abs(rows[1]["objective/kl"]) > 1e-4
    # the merged policy: plain GPT-2 keys, only the adapted matrices moved, and it equals base + adapters
    base = load_file(f"{tiny_checkpoint}/model.safetensors")
    merged = load_file(f"{summary['model']}/model.safetensors")
    assert set(merged) == set(base)
    moved = {k for k in base if not torch.equal(base[k], merged[k])}
    assert moved and all(k.endswith((".c_attn.weight", ".c_fc.weight")) for k in moved), moved
    adapted = load_models(config, None, with_reward=False)
    load_adapter_checkpoint(
        adapted.peft, tmp_path / "runs" / "demo" / "ppo" / "checkpoints" / "step-0000002" / "policy"
    )
    plain = AutoModelForCausalLM.from_pretrained(summary["model"]).eval()
    ids = torch.randint(3, 500, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(
            plain(input_ids=ids).logits, adapted.policy(input_ids=ids).logits, atol=1e-4, rtol=1e-4
        )
    # killed after iteration 1's adapter checkpoint and resumed: the same merged policy
    import shutil

    stage = tmp_path / "runs" / "demo" / "ppo"
    shutil.rmtree(stage / "checkpoints" / "step-0000002")
    shutil.rmtree(stage / "model")
    config.resume = True
    again = load_file(f"{run(config, score_fn=target_share)['model']}/model.safetensors")
    assert all(torch.allclose(again[k], merged[k], atol=1e-6) for k in merged)


def test_gradient_checkpointing_recomputes_and_changes_nothing(
    tmp_path,
    tiny_checkpoint,
    prompt_file,  # noqa: F811 (the fixture imported above)
    monkeypatch,
):
    """PPO keeps its models in eval mode (dropout off); `gradient_checkpointing=true` still recomputes the policy's
    and value model's layers in backward (only during the update), with the same numbers."""
    import transformers.modeling_utils as hf

    calls = []
    real = hf.checkpoint
    monkeypatch.setattr(hf, "checkpoint", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    common = ("iterations=2", "batch_size=8", "threads=1", "value_model=" + str(tiny_checkpoint))
    run(tiny_config(tmp_path, tiny_checkpoint, prompt_file, *common, "name=plain"), score_fn=target_share)
    assert not calls
    run(
        tiny_config(
            tmp_path, tiny_checkpoint, prompt_file, *common, "name=ckpt", "gradient_checkpointing=true"
        ),
        score_fn=target_share,
    )
    # 2 layers x (policy + value) x 2 minibatches x 2 epochs x 2 iterations
    assert len(calls) == 2 * 2 * 2 * 2 * 2
    keys = (
        "objective/score",
        "objective/kl",
        "policy/loss",
        "value/loss",
        "policy/clipfrac",
        "objective/entropy",
    )
    plain, ckpt = (
        [{k: r[k] for k in keys} for r in read_metrics(tmp_path / "runs" / n / "ppo")]
        for n in ("plain", "ckpt")
    )
    assert len(plain) == 2
    for a, b in zip(plain, ckpt):
        assert b == pytest.approx(a, abs=1e-6)
