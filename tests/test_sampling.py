"""The sampler: log-probs equal one full forward, greedy equals `model.generate`, seeds, EOS handling, errors."""

from __future__ import annotations

import pytest
import torch

from conftest import make_tiny_model
from rlhf import fast_gpt2, sampling
from rlhf.data.template import encode_prompt
from rlhf.errors import UserError
from rlhf.sampling import _left_pad, generate, join_prompt_response, token_logprobs

PROMPTS = [
    "Tell me a story about a fox.",
    "Hi",
    "What is the best thing to do on a sunny day in the forest with three good friends?",
    "Why is the sky blue?",
    "Name a colour.",
    "Write a short poem about the sea and the moon.",
]


def eos_prone_model(tokenizer, seed: int = 0, strength: float = 0.05):
    """A random tiny GPT-2 whose EOS logit is raised so responses end at mixed lengths (a few % per step)."""
    model = make_tiny_model(tokenizer, seed=seed)
    with torch.no_grad():
        direction = torch.randn(model.config.n_embd, generator=torch.Generator().manual_seed(seed))
        model.transformer.ln_f.bias.copy_(direction)
        model.lm_head.weight[tokenizer.eos_token_id] = direction * strength  # tied with wte
    return model


def peaked_model(tokenizer, seed: int = 0):
    """A random tiny GPT-2 with large weights: varied, confident greedy continuations (no near-ties)."""
    model = make_tiny_model(tokenizer, seed=seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(6.0)
    return model


@pytest.fixture(scope="module")
def prompt_ids(tiny_tokenizer):
    return [encode_prompt(tiny_tokenizer, p) for p in PROMPTS]


@pytest.mark.parametrize("fast", [True, False])
def test_logprobs_equal_one_full_forward(tiny_tokenizer, prompt_ids, fast):
    model = eos_prone_model(tiny_tokenizer, strength=0.02)
    lengths = {len(p) for p in prompt_ids}
    assert len(lengths) > 3  # left padding with mixed prompt lengths
    gen = generate(
        model,
        tiny_tokenizer,
        prompt_ids * 2,
        max_new_tokens=24,
        temperature=0.7,
        top_k=50,
        top_p=0.9,
        generator=torch.Generator().manual_seed(1),
        fast=fast,
    )
    lengths = gen.response_mask.sum(1)
    assert gen.finished.any() and not gen.finished.all()  # mixed response lengths, some cut at max_new
    assert len(set(lengths.tolist())) > 2
    ids, mask, start = join_prompt_response(
        prompt_ids * 2, gen.response_ids, gen.response_mask, tiny_tokenizer.pad_token_id
    )
    with torch.no_grad():
        full = token_logprobs(model, ids, mask, temperature=0.7)[:, start - 1 :]
    assert full.shape == gen.logprobs.shape
    real = gen.response_mask
    torch.testing.assert_close(gen.logprobs[real], full[real], atol=2e-5, rtol=1e-5)
    assert (gen.logprobs[~real] == 0).all()
    # top-k/top-p only shape the sampling: a token sampled with top_k=50 is always inside the top 50.
    assert (gen.logprobs[real] <= 0).all()


def test_fast_greedy_equals_model_generate(tiny_tokenizer, prompt_ids):
    model = peaked_model(tiny_tokenizer)
    ids, mask = _left_pad(prompt_ids, tiny_tokenizer.pad_token_id, "cpu")
    reference = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=30,
        do_sample=False,
        pad_token_id=tiny_tokenizer.pad_token_id,
        eos_token_id=tiny_tokenizer.eos_token_id,
    )[:, ids.shape[1] :]
    gen = generate(model, tiny_tokenizer, prompt_ids, max_new_tokens=30, greedy=True)
    assert len({tuple(r) for r in reference.tolist()}) == len(prompt_ids)  # not a degenerate constant output
    width = gen.response_ids.shape[1]
    assert width == reference.shape[1]
    assert torch.equal(gen.response_ids, reference)  # HF pads finished rows with pad too
    # top_k=1 sampling and a tiny nucleus are greedy as well.
    for kw in ({"top_k": 1}, {"top_p": 1e-6}):
        sampled = generate(model, tiny_tokenizer, prompt_ids, max_new_tokens=30, temperature=1.3, **kw)
        assert torch.equal(sampled.response_ids, reference)


def test_same_seed_same_samples_and_batching(tiny_tokenizer, prompt_ids):
    model = eos_prone_model(tiny_tokenizer, seed=3)

    def run(seed, **kw):
        return generate(
            model,
            tiny_tokenizer,
            prompt_ids,
            max_new_tokens=16,
            generator=torch.Generator().manual_seed(seed),
            **kw,
        )

    a, b, c = run(5), run(5), run(6)
    assert torch.equal(a.response_ids, b.response_ids) and a.texts == b.texts
    assert torch.equal(a.logprobs, b.logprobs)
    assert not torch.equal(a.response_ids, c.response_ids)
    split = run(5, batch_size=4)  # two chunks, padded to a common width
    assert split.response_ids.shape[0] == len(prompt_ids)
    assert torch.equal(split.response_mask.sum(1) > 0, torch.ones(len(prompt_ids), dtype=torch.bool))


def test_finished_sequences_stop_at_their_first_eos(tiny_tokenizer, prompt_ids):
    model = eos_prone_model(tiny_tokenizer, seed=1)
    eos, pad = tiny_tokenizer.eos_token_id, tiny_tokenizer.pad_token_id
    for fast in (True, False):
        gen = generate(
            model,
            tiny_tokenizer,
            prompt_ids * 3,
            max_new_tokens=20,
            generator=torch.Generator().manual_seed(0),
            fast=fast,
        )
        assert gen.finished.any() and not gen.finished.all()
        for row, mask, done, text in zip(gen.response_ids, gen.response_mask, gen.finished, gen.texts):
            n = int(mask.sum())
            assert mask[:n].all() and not mask[n:].any()  # a prefix mask
            ids = row[:n].tolist()
            assert (row[n:] == pad).all()
            if done:
                assert ids[-1] == eos and eos not in ids[:-1]
            else:
                assert eos not in ids and n == 20
            assert text == tiny_tokenizer.decode(ids, skip_special_tokens=True).strip()


def test_max_new_tokens_stays_inside_the_context(tiny_tokenizer):
    model = make_tiny_model(tiny_tokenizer, n_positions=32)
    prompt = encode_prompt(tiny_tokenizer, "a b c d e f g")
    gen = generate(model, tiny_tokenizer, [prompt], max_new_tokens=100, greedy=True)
    assert len(prompt) + gen.response_ids.shape[1] <= 32
    with pytest.raises(UserError, match="context"):
        generate(model, tiny_tokenizer, [list(range(3, 35))], max_new_tokens=4)
    with pytest.raises(UserError, match="no prompts"):
        generate(model, tiny_tokenizer, [], max_new_tokens=4)
    with pytest.raises(UserError, match="temperature"):
        generate(model, tiny_tokenizer, [prompt], max_new_tokens=4, temperature=0.0)


def test_bf16_fast_path_is_close(tiny_tokenizer, prompt_ids):
    model = eos_prone_model(tiny_tokenizer)
    gen = generate(
        model,
        tiny_tokenizer,
        prompt_ids,
        max_new_tokens=12,
        generator=torch.Generator().manual_seed(0),
        bf16=True,
    )
    ids, mask, start = join_prompt_response(
        prompt_ids, gen.response_ids, gen.response_mask, tiny_tokenizer.pad_token_id
    )
    with torch.no_grad():
        full = token_logprobs(model, ids, mask)[:, start - 1 :]
    real = gen.response_mask
    assert (gen.logprobs[real] - full[real]).abs().max() < 0.15  # bf16 rounding only


@pytest.mark.parametrize("bf16", [False, True])
def test_plain_sampling_logprobs_equal_one_full_forward(tiny_tokenizer, prompt_ids, bf16, monkeypatch):
    """No top-k/top-p: the fast path samples by a two-level inverse CDF and folds 1/T into ln_f; same log-probs.
    Each prompt is given twice: it is prefilled once and its cache rows copied."""
    model = eos_prone_model(tiny_tokenizer, seed=2, strength=0.02)
    prefilled = []
    prefill = fast_gpt2.FastGPT2._prefill

    def spy(self, x, *args):
        prefilled.append(x.shape[0])
        return prefill(self, x, *args)

    monkeypatch.setattr(fast_gpt2.FastGPT2, "_prefill", spy)
    gen = generate(
        model,
        tiny_tokenizer,
        prompt_ids * 2,
        max_new_tokens=20,
        temperature=0.7,
        generator=torch.Generator().manual_seed(4),
        bf16=bf16,
    )
    assert gen.finished.any() and not gen.finished.all()
    assert sum(prefilled) == len(prompt_ids)  # 12 rows, 6 distinct prompts
    ids, mask, start = join_prompt_response(
        prompt_ids * 2, gen.response_ids, gen.response_mask, tiny_tokenizer.pad_token_id
    )
    with torch.no_grad():
        full = token_logprobs(model, ids, mask, temperature=0.7)[:, start - 1 :]
    real = gen.response_mask
    if bf16:
        assert (gen.logprobs[real] - full[real]).abs().max() < 0.15  # bf16 rounding of the weight GEMMs only
    else:
        torch.testing.assert_close(gen.logprobs[real], full[real], atol=2e-5, rtol=1e-5)


def test_decode_restores_the_thread_setting(tiny_tokenizer, prompt_ids, monkeypatch):
    """The fast path decodes small batches on one thread, and gives the caller's setting back (also on error)."""
    model = make_tiny_model(tiny_tokenizer)
    before = torch.get_num_threads()
    seen = []
    choose = fast_gpt2._choose  # the fast path's token choice (the sampler's own, imported there)

    def spy(*args, **kw):
        seen.append(torch.get_num_threads())
        if kw.get("temperature") == 0.5 and len(seen) > 2:
            raise RuntimeError("boom")
        return choose(*args, **kw)

    monkeypatch.setattr(fast_gpt2, "_choose", spy)
    try:
        torch.set_num_threads(2)
        generate(
            model, tiny_tokenizer, prompt_ids, max_new_tokens=4, generator=torch.Generator().manual_seed(0)
        )
        assert seen == [1, 1, 1, 1]  # every token choice runs inside the one-thread decode loop
        assert torch.get_num_threads() == 2
        seen.clear()
        with pytest.raises(RuntimeError, match="boom"):  # a failure inside the decode loop
            generate(model, tiny_tokenizer, prompt_ids, max_new_tokens=4, temperature=0.5)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_token_logprobs_from_start_equals_the_sliced_full_pass(tiny_tokenizer, prompt_ids):
    """`start` computes the LM head on fewer positions only; the values are those of the full pass, sliced."""
    model = make_tiny_model(tiny_tokenizer)
    gen = generate(
        model, tiny_tokenizer, prompt_ids, max_new_tokens=6, generator=torch.Generator().manual_seed(1)
    )
    ids, mask, start = join_prompt_response(
        prompt_ids, gen.response_ids, gen.response_mask, tiny_tokenizer.pad_token_id
    )
    with torch.no_grad():
        full = token_logprobs(model, ids, mask, temperature=0.9)
        cut = token_logprobs(model, ids, mask, temperature=0.9, start=start - 1)
    assert cut.shape == (ids.shape[0], ids.shape[1] - start)
    torch.testing.assert_close(cut, full[:, start - 1 :])
    with pytest.raises(ValueError):
        token_logprobs(model, ids, mask, start=ids.shape[1] - 1)


def test_two_level_sampling_draws_from_the_softmax():
    """`_sample` (block by mass, then token inside the block) has the distribution of the probabilities it gets:
    its total-variation distance to them is that of torch.multinomial with as many draws; zero mass is never drawn.
    A vocabulary that is not a multiple of the block width (1000) exercises the padded last block."""
    vocab, draws = 1000, 40_000
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(vocab, generator=g) * 2
    logits[::7] = -float("inf")  # zero-probability tokens spread over every block
    logits[900:] -= 4.0  # uneven block masses
    probs = torch.softmax(logits, -1)
    tokens = sampling._sample(probs.expand(draws, vocab).contiguous(), g)
    assert tokens.shape == (draws,) and (probs[tokens] > 0).all()
    freq = torch.bincount(tokens, minlength=vocab).float() / draws
    expected_tv = 0.5 * (2 * probs * (1 - probs) / (torch.pi * draws)).sqrt().sum()  # E|TV| of exact sampling
    assert 0.5 * (freq - probs).abs().sum() < 1.3 * expected_tv
    # and one-hot rows always give their token
    onehot = torch.zeros(3, vocab)
    onehot[0, 0], onehot[1, 999], onehot[2, 517] = 1.0, 1.0, 1.0
    assert sampling._sample(onehot, g).tolist() == [0, 999, 517]


def test_batch_split_across_threads_gives_the_same_samples(tiny_tokenizer, prompt_ids, monkeypatch):
    """With 2 threads and idle cores the fast path decodes parts of the batch side by side; the uniform draws come
    from the generator before the split, so the samples and log-probs equal those of one part on one thread."""
    model = eos_prone_model(tiny_tokenizer, seed=4)
    monkeypatch.setattr(fast_gpt2.FastGPT2, "MIN_PART_ROWS", 4)
    monkeypatch.setattr(sampling, "_idle_cores", lambda: 2)  # as on an idle machine
    before = torch.get_num_threads()
    parts = []
    decode_parts = fast_gpt2.FastGPT2.decode_parts

    def spy(self, prompts, n, **kw):
        parts.append(n)
        return decode_parts(self, prompts, n, **kw)

    monkeypatch.setattr(fast_gpt2.FastGPT2, "decode_parts", spy)
    try:
        for kw in ({}, {"top_k": 40, "top_p": 0.9}):
            runs = []
            for threads in (1, 2):
                torch.set_num_threads(threads)
                runs.append(
                    generate(
                        model,
                        tiny_tokenizer,
                        prompt_ids * 2,
                        max_new_tokens=12,
                        temperature=0.8,
                        generator=torch.Generator().manual_seed(7),
                        **kw,
                    )
                )
                assert torch.get_num_threads() == threads
            one, split = runs
            assert torch.equal(one.response_ids, split.response_ids) and one.texts == split.texts
            torch.testing.assert_close(one.logprobs, split.logprobs, atol=1e-6, rtol=0)
        assert parts == [1, 2, 1, 2]
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("bf16", [False, True])
def test_scripted_decode_step_equals_the_eager_step(tiny_tokenizer, prompt_ids, bf16, monkeypatch):
    """Over prepacked weights a decode step runs as one TorchScript call (`_packed_step`): the same tokens and
    log-probs, bit for bit, as the eager step; rows finishing on the way, 1 and 2 parts (2 also prepacks in 2
    threads), a prompt given twice."""
    scripted = fast_gpt2._scripted_step()
    if scripted is None:
        pytest.skip("TorchScript is not available in this torch: the eager step runs")
    calls = []

    def counting(*args):
        calls.append(args[0].shape[0])
        return scripted(*args)

    monkeypatch.setattr(fast_gpt2, "_scripted_step", lambda: counting)
    monkeypatch.setattr(fast_gpt2.FastGPT2, "MIN_PART_ROWS", 4)
    monkeypatch.setattr(sampling, "_idle_cores", lambda: 2)  # as on an idle machine
    model = eos_prone_model(tiny_tokenizer, seed=6)
    before = torch.get_num_threads()
    runs = {}
    try:
        for use_script in (False, True):
            monkeypatch.setattr(fast_gpt2.FastGPT2, "SCRIPTED_STEP", use_script)
            for threads in (1, 2):
                torch.set_num_threads(threads)
                runs[use_script, threads] = generate(
                    model,
                    tiny_tokenizer,
                    prompt_ids * 2,
                    max_new_tokens=16,
                    temperature=0.8,
                    generator=torch.Generator().manual_seed(9),
                    bf16=bf16,
                )
    finally:
        torch.set_num_threads(before)
    eager = runs[False, 1]
    assert eager.finished.any() and not eager.finished.all()
    for run in runs.values():
        assert torch.equal(run.response_ids, eager.response_ids) and torch.equal(run.logprobs, eager.logprobs)
    packed = fast_gpt2._can_pack(torch.bfloat16 if bf16 else torch.float32, torch.device("cpu"))
    assert bool(calls) == packed  # the scripted step ran wherever the weights are prepacked
    if packed:
        assert 12 in calls and 6 in calls and set(calls) - {12, 6}  # 1 and 2 parts; finished rows dropped
