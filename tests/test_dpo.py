"""DPO: the loss on hand-computed numbers; the stage learns a planted preference; resume; LoRA reference."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf.losses import dpo_loss


def test_dpo_loss_hand_computed():
    # pair 0: log-ratios chosen +1, rejected -1 -> h = 2; pair 1: everything equal -> h = 0
    pc = torch.tensor([-10.0, -5.0], requires_grad=True)
    pr = torch.tensor([-12.0, -5.0])
    rc = torch.tensor([-11.0, -5.0])
    rr = torch.tensor([-11.0, -5.0])
    losses, chosen, rejected = dpo_loss(pc, pr, rc, rr, beta=0.5)
    # -log sigmoid(0.5 * 2) = log(1 + e^-1) = 0.3132617; -log sigmoid(0) = log 2
    torch.testing.assert_close(losses, torch.tensor([0.3132617, math.log(2.0)]))
    torch.testing.assert_close(chosen, torch.tensor([0.5, 0.0]))
    torch.testing.assert_close(rejected, torch.tensor([-0.5, 0.0]))
    assert not chosen.requires_grad
    losses[0].backward()
    # d/d pc of -log sigmoid(beta h) = -beta * sigmoid(-beta h) = -0.5 * sigmoid(-1) = -0.1344707
    torch.testing.assert_close(pc.grad, torch.tensor([-0.1344707, 0.0]))

    # conservative DPO, 10% flipped labels: 0.9 * log(1+e^-1) + 0.1 * log(1+e^1) = 0.2819355 + 0.1313262
    smoothed, _, _ = dpo_loss(pc[:1], pr[:1], rc[:1], rr[:1], beta=0.5, label_smoothing=0.1)
    torch.testing.assert_close(smoothed, torch.tensor([0.4132617]))


def test_ipo_loss_hand_computed():
    pc, pr, rc, rr = (torch.tensor([v]) for v in (-10.0, -12.0, -11.0, -11.0))
    # beta 0.5 -> target margin 1/(2 beta) = 1; h = 2 -> (2 - 1)^2 = 1
    losses, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.5, loss_type="ipo")
    torch.testing.assert_close(losses, torch.tensor([1.0]))
    # per-token averages: chosen 1/2 = 0.5, rejected -1/4 = -0.25 -> (0.75 - 1)^2 = 0.0625
    losses, chosen, _ = dpo_loss(
        pc,
        pr,
        rc,
        rr,
        beta=0.5,
        loss_type="ipo",
        chosen_lengths=torch.tensor([2]),
        rejected_lengths=torch.tensor([4]),
    )
    torch.testing.assert_close(losses, torch.tensor([0.0625]))
    torch.testing.assert_close(chosen, torch.tensor([0.5]))  # rewards stay beta * summed log-ratio
    with pytest.raises(ValueError, match="loss_type"):
        dpo_loss(pc, pr, rc, rr, loss_type="hinge")


# ---------------------------------------------------------------------------------------------------------------
# The stage, on a planted preference: cheerful words are preferred to gloomy ones.

GOOD = "happy glad kind love smile laugh friend sweet bright warm".split()
BAD = "sad cry angry fear dark wicked die cold lost alone".split()
ANIMALS = "fox bear rabbit bird mouse frog cat dog owl wolf horse lamb".split()


def _planted(path, n: int, seed: int, k: int = 2) -> None:
    import random

    from rlhf.data.records import Comparison, write_jsonl

    rng = random.Random(seed)
    rows = []
    for i in range(n):
        animal = rng.choice(ANIMALS)
        good = [f"The {animal} was {' '.join(rng.sample(GOOD, 3))}." for _ in range(k - 1)]
        responses = [*good, f"The {animal} was {' '.join(rng.sample(BAD, 3))}."]
        ranks = [1] * (k - 1) + [2]  # the k-1 cheerful ones tie: ties give no pair
        order = rng.sample(range(k), k)
        rows.append(
            Comparison(
                prompt=f"Tell me about the {animal}, story {seed}-{i}.",
                responses=[responses[j] for j in order],
                ranks=[ranks[j] for j in order],
                labeller="synthetic:planted",
            )
        )
    write_jsonl(path, rows)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    root = tmp_path_factory.mktemp("dpo")
    _planted(root / "train.jsonl", 24, seed=1, k=3)  # 24 prompts x 2 pairs (the two cheerful answers tie)
    _planted(root / "val.jsonl", 16, seed=2)
    return root


def _config(planted, ckpt, name: str, **overrides):
    from rlhf.config import load_config
    from rlhf.stages.dpo import DPOConfig

    base = {
        "comparisons": planted / "train.jsonl",
        "val_file": planted / "val.jsonl",
        "model.path": ckpt,
        "runs_dir": planted / "runs",
        "name": name,
        "steps": 6,
        "batch_size": 8,
        "lr": 3e-3,
        "lr_schedule": "constant",
        "warmup_steps": 0,
        "log_every": 1,
        "eval_every": 0,
        "max_length": 48,
        "max_prompt_length": 24,
        "threads": 2,
    }
    base.update(overrides)
    return load_config(DPOConfig, None, [f"{k}={v}" for k, v in base.items()])


def _losses(run_dir) -> dict[int, float]:
    from rlhf.tracking import read_metrics

    return {r["step"]: r["train/loss"] for r in read_metrics(run_dir) if "train/loss" in r}


class _OneProcess:  # the accelerator view all_pair_logprobs needs, for scoring outside a run
    num_processes, process_index, is_main_process = 1, 0, True

    def autocast(self):
        return torch.autocast("cpu", enabled=False)


@pytest.fixture(scope="module")
def learned(planted, tiny_checkpoint):
    """One 16-step run shared by the tests below (checkpoints at 8 and 16)."""
    from rlhf.stages.dpo import run

    config = _config(planted, tiny_checkpoint, "learn", steps=16, eval_every=8, save_every=8)
    summary = run(config)
    out = planted / "runs" / "learn" / "dpo"
    return config, summary, out, _losses(out)


@pytest.fixture(scope="module")
def base_logprobs(planted, tiny_checkpoint):
    """Log-probs of the first 8 training pairs under the untouched starting model, computed independently."""
    from transformers import AutoModelForCausalLM

    from rlhf.data.comparisons import read_any_comparisons
    from rlhf.modeling import load_tokenizer
    from rlhf.stages.dpo import all_pair_logprobs, build_pairs

    tok = load_tokenizer(tiny_checkpoint)
    pairs = build_pairs(read_any_comparisons(planted / "train.jsonl")[0], tok, 48, 24)[:8]
    base = AutoModelForCausalLM.from_pretrained(tiny_checkpoint).eval()
    return pairs, tok, all_pair_logprobs(base, pairs, tok.pad_token_id, 16, _OneProcess())


def test_dpo_learns_planted_preference_on_held_out_pairs(learned, base_logprobs):
    from transformers import AutoModelForCausalLM

    from rlhf.stages.dpo import REF_CACHE, all_pair_logprobs
    from rlhf.tracking import read_metrics

    _, summary, out, losses = learned
    assert summary["pairs"] == 48  # 24 rankings of 3 with a tie at the top: 2 pairs each
    # at step 0 the policy is the reference: every implicit reward and margin is exactly 0; DPO must raise it
    assert summary["val/margin"] > 1.0 and summary["val/accuracy"] >= 0.9, summary
    assert losses[16] < 0.5 * losses[1]
    rows = read_metrics(out)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "train/lr"):
        assert key in rows[0]
    assert [r["step"] for r in rows if "val/accuracy" in r] == [8, 16]
    # the cached reference is the starting policy's log-probs
    pairs, tok, fresh = base_logprobs
    cache = torch.load(out / REF_CACHE, weights_only=True)
    torch.testing.assert_close(cache["train"][:8], fresh, rtol=1e-5, atol=1e-4)
    # the final policy is a plain HF checkpoint that prefers the cheerful answers more than the base did
    tuned = AutoModelForCausalLM.from_pretrained(out / "model").eval()
    after = all_pair_logprobs(tuned, pairs, tok.pad_token_id, 16, _OneProcess())
    assert ((after[:, 0] - after[:, 1]) - (fresh[:, 0] - fresh[:, 1])).min() > 0


def test_resume_reaches_the_same_result(learned, caplog):
    import dataclasses
    import shutil

    from rlhf.checkpoint import list_checkpoints
    from rlhf.stages.dpo import run

    config, _, out, whole = learned
    weights = (out / "model" / "model.safetensors").read_bytes()
    newest = list_checkpoints(out)[-1]
    assert newest.name.endswith("16")
    shutil.rmtree(newest)  # as if killed between step 8 and step 16
    shutil.rmtree(out / "model")
    with caplog.at_level("INFO", logger="rlhf"):
        run(dataclasses.replace(config, resume=True))
    assert "reusing" in caplog.text and "at step 8" in caplog.text
    assert _losses(out) == whole
    assert (out / "model" / "model.safetensors").read_bytes() == weights


def test_gradient_checkpointing_is_exact_and_bf16_is_close(
    planted, tiny_checkpoint, learned, bf16_on_any_cpu
):
    from rlhf.stages.dpo import run

    fp32 = learned[3]  # constant learning rate: its first 3 steps are a 3-step run's
    run(_config(planted, tiny_checkpoint, "ckpt", steps=3, gradient_checkpointing=True))
    run(_config(planted, tiny_checkpoint, "bf16", steps=3, bf16=True))
    gc, bf16 = (_losses(planted / "runs" / n / "dpo") for n in ("ckpt", "bf16"))
    for step in (1, 2, 3):
        assert gc[step] == pytest.approx(fp32[step], abs=1e-6)  # recomputation changes no arithmetic
        # bf16 autocast: ~3 significant digits per matmul; the reference is computed under the same autocast
        assert bf16[step] == pytest.approx(fp32[step], abs=0.03)
    assert bf16[3] < bf16[1]


def test_lora_dpo_uses_the_base_as_reference_and_saves_a_plain_model(planted, tiny_checkpoint, base_logprobs):
    from transformers import AutoModelForCausalLM

    from rlhf.stages.dpo import REF_CACHE, run

    lora = {"lora.enabled": True, "lora.r": 4, "lora.target_modules": "c_attn,c_fc"}
    summary = run(_config(planted, tiny_checkpoint, "lora", steps=4, **lora))
    out = planted / "runs" / "lora" / "dpo"
    # adapters disabled == the base: the cached reference equals the untouched model's log-probs
    lora_ref = torch.load(out / REF_CACHE, weights_only=True)
    torch.testing.assert_close(lora_ref["train"][:8], base_logprobs[2], rtol=1e-5, atol=1e-4)
    assert (
        out / "checkpoints" / "step-0000004" / "adapter_config.json"
    ).exists()  # checkpoints: adapters only
    assert not (out / "model" / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(out / "model").state_dict()
    base = AutoModelForCausalLM.from_pretrained(tiny_checkpoint).state_dict()
    changed = {k for k in base if not torch.equal(base[k], merged[k])}
    assert changed and all(".attn.c_attn." in k or ".mlp.c_fc." in k for k in changed), changed
    assert summary["val/margin"] > 0


@pytest.mark.parametrize("real_tokens_only", [True, False])
def test_pair_layout_log_probs_equal_unpadded_forwards(tiny_model, monkeypatch, real_tokens_only):
    """Left-padded prompts + right-padded responses (the LM head on response columns only) give each response's
    summed log-prob of an unpadded forward over that row alone, whatever the prompt and response lengths: through
    `rlhf.unpadded` (linear layers on real tokens, the head on real response tokens) and through Hugging Face's
    padded forward alike."""
    import rlhf.unpadded
    from rlhf.stages.dpo_pairs import Pair, collate, sequence_logprobs, shared_prompt_logprobs

    calls = []
    unpadded = rlhf.unpadded.trunk_forward
    monkeypatch.setattr(
        rlhf.unpadded, "trunk_forward", lambda *a, **k: (calls.append(1), unpadded(*a, **k))[1]
    )
    # these pairs are 40-60 % padding: a 0.0 bound sends every pass to the Hugging Face forward
    monkeypatch.setattr(rlhf.unpadded, "MAX_REAL_SHARE", 0.9 if real_tokens_only else 0.0)

    pairs = [Pair([1, 5, 6], [7, 8, 2], [9, 2]), Pair([1, 10, 11, 12, 13], [14, 2], [15, 16, 17, 18, 2])]
    ids, attn, start = collate(pairs, pad_id=0)
    assert start == 5 and ids.shape == (4, 10)
    assert ids[2].tolist() == [
        0,
        0,
        1,
        5,
        6,
        9,
        2,
        0,
        0,
        0,
    ]  # rejected of pair 0: prompt ends at the start column
    tiny_model.eval()
    with torch.no_grad():
        sums, lengths = sequence_logprobs(tiny_model, pairs, pad_id=0)
        expected = []
        rows = [(p.prompt_ids, p.chosen_ids) for p in pairs] + [(p.prompt_ids, p.rejected_ids) for p in pairs]
        for prompt, response in rows:
            row = torch.tensor([prompt + response])
            logp = torch.log_softmax(tiny_model(row).logits[0, :-1].float(), -1)
            picked = logp.gather(-1, row[0, 1:, None]).squeeze(-1)
            expected.append(picked[len(prompt) - 1 :].sum())
    assert lengths.tolist() == [3, 2, 2, 5]
    torch.testing.assert_close(sums, torch.stack(expected), rtol=1e-5, atol=1e-4)
    # each prompt run once, its keys/values reused by both responses: the same numbers, and the same gradients
    tiny_model.zero_grad()
    sequence_logprobs(tiny_model, pairs, pad_id=0)[0].sum().backward()
    plain = [p.grad.clone() for p in tiny_model.parameters()]
    tiny_model.zero_grad()
    shared, shared_lengths = shared_prompt_logprobs(tiny_model, pairs, pad_id=0)
    shared.sum().backward()
    assert shared_lengths.tolist() == [3, 2, 2, 5]
    torch.testing.assert_close(shared.detach(), sums, rtol=1e-5, atol=1e-4)
    for a, b in zip(plain, (p.grad for p in tiny_model.parameters())):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    tiny_model.zero_grad()
    # the sequence layout twice (no grad, then grad), the shared one once: its prompt pass and its response pass
    assert len(calls) == (4 if real_tokens_only else 0)
