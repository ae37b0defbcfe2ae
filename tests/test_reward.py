"""The reward model and `rlhf reward`: last-token scoring, HF round-trip, learning a planted preference, bad input."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch

from conftest import SLICE_TEXT
from rlhf.config import load_config
from rlhf.data.records import Comparison, Response, SampleRecord, ranks_from_scores, write_jsonl
from rlhf.errors import UserError
from rlhf.labellers import GoldLabeller, get_labeller, label_samples
from rlhf.reward_model import NORM_FILE, RewardModel, position_ids_from_mask, reward_model_from_causal_lm
from rlhf.stages.reward import RewardConfig, run
from rlhf.tracking import read_metrics

PROMPTS = ["Tell me a story.", "What did the fox do?", "Say something about the king."]


def _texts(n: int, seed: int = 0) -> list[str]:
    words = [w for w in SLICE_TEXT.read_text(encoding="utf-8").lower().split() if w.isalpha()][:2000]
    rng = random.Random(seed)
    return [" ".join(rng.sample(words, rng.randint(3, 12))) for _ in range(n)]


def _left_pad(rm: RewardModel, seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), rm.tokenizer.pad_token_id)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s) :] = torch.tensor(s)
        mask[i, width - len(s) :] = 1
    return ids, mask


@pytest.fixture(scope="module")
def fresh_rm(tiny_checkpoint) -> RewardModel:
    return reward_model_from_causal_lm(tiny_checkpoint)


def test_head_is_fresh_and_small(fresh_rm):
    w = fresh_rm.model.score.weight
    d = w.shape[1]
    assert w.shape == (1, d)
    assert 0.5 / (d + 1) ** 0.5 < w.std().item() < 1.5 / (d + 1) ** 0.5
    assert fresh_rm.model.config.pad_token_id == fresh_rm.tokenizer.pad_token_id


def test_score_read_at_last_real_token_whatever_the_padding(fresh_rm):
    rm = fresh_rm
    texts = _texts(5)
    seqs = [rm.encode(PROMPTS[i % 3], t) for i, t in enumerate(texts)]
    with torch.no_grad():
        alone = torch.stack([rm.raw_scores(*rm.pad([s]))[0] for s in seqs])
        right = rm.raw_scores(*rm.pad(seqs))
        left = rm.raw_scores(*_left_pad(rm, seqs))
        # other batch-mates (a much longer one) change nothing
        mixed = rm.raw_scores(*rm.pad([seqs[0], (seqs[1] + seqs[2])[:120]]))[0]
        # reading at a pad, or ignoring the mask, would give another number
        ids, mask = rm.pad(seqs)
        hidden = rm.model.base_model(input_ids=ids).last_hidden_state
        at_last_column = rm.model.score(hidden[:, -1]).squeeze(-1)
    assert torch.allclose(right, alone, atol=1e-5)
    assert torch.allclose(left, alone, atol=1e-5)
    assert mixed.item() == pytest.approx(alone[0].item(), abs=1e-5)
    short = [i for i, s in enumerate(seqs) if len(s) < ids.shape[1]]
    assert short and not torch.allclose(at_last_column[short], alone[short], atol=1e-3)


def test_shared_prompt_pass_equals_flat_sequences(fresh_rm):
    """Each ranking's prompt forwarded once (KV cache) gives the flat per-sequence scores and gradients."""
    from rlhf.data.template import encode_prompt, encode_response
    from rlhf.stages.reward_data import Ranking, batch_scores, set_attention

    tok = fresh_rm.tokenizer
    texts = _texts(7, seed=3)
    batch = []
    for prompt, (lo, hi), ranks in zip(PROMPTS, [(0, 2), (2, 5), (5, 7)], [[2, 1], [1, 3, 2], [1, 1]]):
        p = encode_prompt(tok, prompt)
        batch.append(
            Ranking([p + encode_response(tok, t) for t in texts[lo:hi]], ranks, [""] * (hi - lo), len(p))
        )
    shared, ranks = batch_scores(fresh_rm, batch, bf16=False, share_prompt=True)
    flat, _ = batch_scores(fresh_rm, batch, bf16=False, share_prompt=False)
    set_attention(fresh_rm, "eager", "cpu")  # what `rlhf reward` uses on CPU
    eager, _ = batch_scores(fresh_rm, batch, bf16=False, share_prompt=True)
    set_attention(fresh_rm, "sdpa", "cpu")
    assert torch.allclose(eager, flat, atol=1e-5)
    assert ranks.tolist() == [[2, 1, 0], [1, 3, 2], [1, 1, 0]]
    assert torch.allclose(shared, flat, atol=1e-5) and flat[0, 2] == 0 and flat[1].abs().min() > 0
    weight = fresh_rm.model.base_model.wte.weight
    g_shared = torch.autograd.grad(shared.sum(), weight)[0]
    g_flat = torch.autograd.grad(flat.sum(), weight)[0]
    assert torch.allclose(g_shared, g_flat, atol=1e-4)


def test_shared_prompt_pass_with_long_prompt_and_long_response_in_one_batch(fresh_rm):
    """Longest prompt + longest response of different rankings exceed the context: pad columns stay in range."""
    from rlhf.stages.reward_data import Ranking, batch_scores

    context = fresh_rm.context  # 128
    gen = torch.Generator().manual_seed(1)
    long_p, short_p = torch.randint(5, 500, (2, 100), generator=gen).tolist()
    long_r = torch.randint(5, 500, (2, 100), generator=gen).tolist()
    short_r = torch.randint(5, 500, (2, 10), generator=gen).tolist()
    batch = [
        Ranking([long_p + r for r in short_r], [1, 2], ["", ""], 100),
        Ranking([short_p[:10] + r for r in long_r], [2, 1], ["", ""], 10),
    ]
    assert 100 + 100 > context and all(len(s) <= context for r in batch for s in r.sequences)
    shared, _ = batch_scores(fresh_rm, batch, bf16=False, share_prompt=True)
    flat, _ = batch_scores(fresh_rm, batch, bf16=False, share_prompt=False)
    assert torch.allclose(shared, flat, atol=1e-5)


def test_checkpoint_round_trip_through_plain_transformers(fresh_rm, tmp_path):
    from transformers import AutoModelForSequenceClassification

    rm = fresh_rm
    rm.shift, rm.gain = 0.25, 2.0
    folder = rm.save(tmp_path / "rm")
    rm.shift, rm.gain = 0.0, 1.0
    assert json.loads((folder / NORM_FILE).read_text())["gain"] == 2.0
    seqs = [rm.encode(PROMPTS[i % 3], t) for i, t in enumerate(_texts(4, seed=1))]
    hf = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    ids, mask = rm.pad(seqs)
    lids, lmask = _left_pad(rm, seqs)
    with torch.no_grad():
        ours = rm.raw_scores(ids, mask)
        plain_right = hf(input_ids=ids, attention_mask=mask).logits.squeeze(-1)
        plain_left = hf(
            input_ids=lids, attention_mask=lmask, position_ids=position_ids_from_mask(lmask)
        ).logits.squeeze(-1)
    assert torch.equal(plain_right, ours)
    assert torch.allclose(plain_left, ours, atol=1e-5)
    loaded = RewardModel.load(folder)
    assert (loaded.shift, loaded.gain) == (0.25, 2.0)
    assert torch.allclose(loaded.score(ids, mask), (ours - 0.25) * 2.0, atol=1e-6)
    replies = ["a kind fox", "a sad king"]
    by_ids = loaded.score(*loaded.pad([loaded.encode(p, r) for p, r in zip(PROMPTS[:2], replies)]))
    assert loaded.score_texts(PROMPTS[:2], replies) == pytest.approx(by_ids.tolist(), abs=1e-6)
    # a frozen RM folder as the gold labeller: temperature 0 ranks by its normalised score
    gold = get_labeller("gold", temperature=0.0, path=str(folder))
    replies = ["a kind fox", "a sad king", "the end"]
    expected = ranks_from_scores(loaded.score_texts([PROMPTS[0]] * 3, replies))
    assert gold.rank(PROMPTS[0], replies) == expected and gold.name == "gold-rm:rm"


def test_causal_lm_without_head_is_refused(tiny_checkpoint):
    with pytest.raises(UserError, match="causal LM .* without a trained reward head"):
        RewardModel.load(tiny_checkpoint)
    with pytest.raises(UserError, match="not a local path"):
        RewardModel.load(tiny_checkpoint / "missing")


def _planted_comparisons(path, n: int, seed: int = 0) -> None:
    """K = 4 responses per prompt; the (hidden) preference: responses containing 'happy' are better."""
    rng = random.Random(seed)
    pool = [t for t in _texts(4 * n, seed) if "happy" not in t.split()]
    samples = []
    for i in range(n):
        responses = []
        for k in range(4):
            words = pool[4 * i + k].split()
            if (k + i) % 2:
                words.insert(rng.randrange(len(words) + 1), "happy")
            responses.append(Response(" ".join(words), policy="runs/t/sft/model"))
        samples.append(SampleRecord(str(i), PROMPTS[i % 3], responses))
    labeller = GoldLabeller(lambda p, r: float("happy" in r.split()), temperature=0.0, name="planted")
    write_jsonl(path, label_samples(samples, labeller))


def _config(tmp_path, ckpt, comparisons, *extra):
    return load_config(
        RewardConfig,
        None,
        [
            f"model.path={ckpt}",
            f"comparisons={comparisons}",
            f"runs_dir={tmp_path / 'runs'}",
            "lr=1e-3",
            "batch_size=8",
            "warmup_steps=3",
            "eval_every=0",
            "ckpt_every=0",
            *extra,
        ],
    )


@pytest.fixture()
def restore_threads():
    """A run sets torch's thread count (one thread: a 64-wide model only waits on a second one); put it back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_rm_learns_planted_preference_and_resumes_identically(tiny_checkpoint, tmp_path, restore_threads):
    data = tmp_path / "c.jsonl"
    _planted_comparisons(data, 64)
    args = ("val_fraction=0.25", "epochs=3", "ckpt_every=6", "threads=1")
    summary = run(_config(tmp_path, tiny_checkpoint, data, *args))
    assert summary["val_accuracy"] > 0.9
    assert summary["val_rankings"] == 16 and summary["steps"] == 18
    rm = RewardModel.load(summary["model"])
    plain = [t for t in _texts(40, seed=7) if "happy" not in t.split()][:10]
    happy = rm.score_texts(["Tell me a story."] * 10, [t + " happy" for t in plain])
    sad = rm.score_texts(["Tell me a story."] * 10, plain)
    assert sum(h > s for h, s in zip(happy, sad)) >= 9
    # normalised on the SFT-policy training responses
    norm = json.loads((Path(summary["model"]) / NORM_FILE).read_text())
    assert norm["n"] == 48 * 4 and "SFT" in norm["fitted_on"]
    stage = tmp_path / "runs/demo/reward"
    calibration = json.loads((stage / "calibration.json").read_text())
    assert sum(row["count"] for row in calibration) == 16 * 4  # 2 happy x 2 plain responses per ranking
    # killed after the step-6 checkpoint, then resumed: the same final model as the straight run
    final = {n: p.detach().clone() for n, p in rm.model.named_parameters()}
    shutil.rmtree(stage / "checkpoints/step-0000012")
    shutil.rmtree(stage / "model")
    resumed = run(_config(tmp_path, tiny_checkpoint, data, *args, "resume=true"))
    assert resumed["val_accuracy"] == pytest.approx(summary["val_accuracy"])
    again = RewardModel.load(resumed["model"])
    for name, p in again.model.named_parameters():
        assert torch.allclose(p, final[name], atol=1e-6), name
    steps = [row["step"] for row in read_metrics(stage / "metrics.jsonl") if "train/loss" in row]
    assert steps == list(range(1, 19))


def test_bad_inputs_are_clear_errors(tiny_checkpoint, tmp_path, restore_threads):
    with pytest.raises(UserError, match="not found"):
        run(_config(tmp_path, tiny_checkpoint, tmp_path / "nope.jsonl"))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(UserError, match="holds no records"):
        run(_config(tmp_path, tiny_checkpoint, empty))
    tied = tmp_path / "tied.jsonl"
    write_jsonl(tied, [Comparison("p", ["a", "b", "c"], [1, 1, 1]), Comparison("q", ["a", "b"], [1, 1])])
    with pytest.raises(UserError, match="all 2 rankings are ties"):
        run(_config(tmp_path, tiny_checkpoint, tied))
    gap = tmp_path / "gap.jsonl"
    gap.write_text(json.dumps({"prompt": "p", "responses": ["a", "b", "c"], "ranks": [1, 3, 3]}) + "\n")
    with pytest.raises(UserError, match=r"gap.jsonl:1: field 'ranks'.*skip rank 2"):
        run(_config(tmp_path, tiny_checkpoint, gap))
    long_prompt = tmp_path / "long.jsonl"
    write_jsonl(long_prompt, [Comparison("the fox " * 200, ["a", "b"], [1, 2], prompt_id="x7")] * 2)
    with pytest.raises(UserError, match="prompt_id 'x7'.*no room for a response"):
        run(_config(tmp_path, tiny_checkpoint, long_prompt))
    with pytest.raises(UserError, match="model.path"):
        load_config(RewardConfig, None, [f"comparisons={gap}"])


def test_lora_rm_trains_adapters_and_head_only_merges_to_a_plain_rm_and_resumes(
    tiny_checkpoint, tmp_path, restore_threads
):
    from transformers import AutoModelForSequenceClassification

    from rlhf.losses import ranking_loss
    from rlhf.stages.reward import _start_model
    from rlhf.stages.reward_data import batch_scores, tokenize_rankings

    data = tmp_path / "c.jsonl"
    _planted_comparisons(data, 32)
    args = ("lora.enabled=true", "lora.r=4", "lora.alpha=8", "lr=2e-2", "epochs=2", "val_fraction=0.25")
    config = _config(tmp_path, tiny_checkpoint, data, *args, "ckpt_every=3", "threads=1")
    # 1. In pieces: only the adapters and the new score head train; the merged folder is a plain RM that scores
    #    exactly like the adapters did.
    rm = _start_model(config, None)
    trainable = [n for n, p in rm.model.named_parameters() if p.requires_grad]
    assert all("lora_" in n or "score" in n for n in trainable) and any("score" in n for n in trainable)
    frozen = {n: p.detach().clone() for n, p in rm.model.named_parameters() if not p.requires_grad}
    head = rm.trunk_and_head()[1].weight.detach().clone()
    rankings = tokenize_rankings(rm, json_comparisons(data), "c", rm.context)[:8]
    opt = torch.optim.AdamW([p for p in rm.model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        loss, _ = ranking_loss(*batch_scores(rm, rankings, bf16=False))
        loss.backward()
        opt.step()
        opt.zero_grad()
    for name, p in rm.model.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]), name
    assert not torch.equal(rm.trunk_and_head()[1].weight, head)
    assert any(p.abs().sum() > 0 for n, p in rm.model.named_parameters() if "lora_B" in n)
    rm.model.eval()
    ids, mask = rm.pad([s for r in rankings for s in r.sequences])
    with torch.no_grad():
        unmerged = rm.raw_scores(ids, mask)
    rm.merge_lora()
    folder = rm.save(tmp_path / "merged")
    assert not (folder / "adapter_config.json").exists()
    plain = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    assert not any("lora" in k or "modules_to_save" in k for k in plain.state_dict())
    with torch.no_grad():
        assert torch.allclose(
            plain(input_ids=ids, attention_mask=mask).logits.squeeze(-1), unmerged, atol=1e-5
        )
        assert torch.allclose(RewardModel.load(folder).raw_scores(ids, mask), unmerged, atol=1e-5)
    # 2. `rlhf reward lora.enabled=true`: checkpoints hold adapters (+ head); killed after step 3 and resumed, the
    #    merged final RM equals the uninterrupted run's.
    summary = run(config)
    stage = tmp_path / "runs/demo/reward"
    assert (stage / "checkpoints/step-0000003/adapter_config.json").exists()
    assert summary["steps"] == 6 and not (Path(summary["model"]) / "adapter_config.json").exists()
    final = {n: p.detach().clone() for n, p in RewardModel.load(summary["model"]).model.named_parameters()}
    shutil.rmtree(stage / "model")
    run(_config(tmp_path, tiny_checkpoint, data, *args, "ckpt_every=3", "threads=1", "resume=true"))
    for name, p in RewardModel.load(summary["model"]).model.named_parameters():
        assert torch.allclose(p, final[name], atol=1e-6), name
    assert (
        summary["val_accuracy"] > 0.7
    )  # 8 held-out rankings (32 pairs), 6 steps: the adapters learned (0.78)


def json_comparisons(path):
    from rlhf.data.records import read_comparisons

    return read_comparisons(path)


def test_gradient_checkpointing_and_bf16_switches(
    tiny_checkpoint, tmp_path, restore_threads, bf16_on_any_cpu
):
    """`gradient_checkpointing=true` recomputes activations in backward (and forwards whole sequences: the shared
    prompt cache needs use_cache, which checkpointing turns off): the same losses as the flat pass without it."""
    data = tmp_path / "c.jsonl"
    _planted_comparisons(data, 16)
    common = ("val_fraction=0", "max_steps=3", "normalise=none", "threads=1")
    run(_config(tmp_path, tiny_checkpoint, data, *common, "name=plain", "share_prompt=false"))
    run(_config(tmp_path, tiny_checkpoint, data, *common, "name=ckpt", "gradient_checkpointing=true"))
    log_text = (tmp_path / "runs" / "ckpt" / "reward" / "log.txt").read_text()
    assert "gradient_checkpointing: training forwards whole sequences" in log_text
    losses = [
        [r["train/loss"] for r in read_metrics(tmp_path / "runs" / n / "reward") if "train/loss" in r]
        for n in ("plain", "ckpt")
    ]
    assert len(losses[0]) == 3
    assert losses[1] == pytest.approx(losses[0], abs=1e-6)  # same ops, recomputed: measured bit-identical
    # bf16 autocast: the same trajectory up to bf16 rounding of the activations
    run(_config(tmp_path, tiny_checkpoint, data, *common, "name=bf16", "bf16=true"))
    bf16 = [r["train/loss"] for r in read_metrics(tmp_path / "runs" / "bf16" / "reward") if "train/loss" in r]
    assert bf16 == pytest.approx(losses[0], abs=0.03) and bf16 != losses[0]
