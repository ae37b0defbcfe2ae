"""Our sampler vs `transformers` `model.generate`: new tokens per second on the same model, batch and settings.

Set-up of PERF-NOTES: 16 prompts x 32 tokens, 48 new tokens, temperature 0.7, no top-k/top-p, fp32, 2 threads, a
random-init GPT-2 (it practically never emits EOS, so every row runs the full 48 tokens on both sides; the tokens
per second count only real response tokens either way). Presets: tiny (4L d=256, the peer model) and small (6L d=384).
Every call of ours includes its per-call set-up (casting and prepacking the weights for oneDNN), as a PPO iteration
pays it after each optimizer step.

`model.generate` also runs with bf16 weights (`model.to(torch.bfloat16)`, its fastest setting here): our fp32 row is
compared with `model.generate` in fp32, our bf16 row with the fastest `model.generate` row of the table.

Our fast path decodes on one intra-op thread (a decode step at this width is a chain of tiny ops and each fork/join
of the thread pool costs more than the op; see `rlhf.sampling`); with 2 threads allowed and both cores idle when a call starts, it
splits the 16 rows into two parts decoded side by side in two Python threads (no barrier between them, +35% CPU time
in all; on a busy machine it keeps one part). The table shows both sides at 1 thread too, and process CPU time per
new token, which a busy machine disturbs much less than wall time.

    .venv/bin/python benchmarks/sample.py [--quick] [--threads 2]
"""

from __future__ import annotations

import copy
import statistics
import time

import torch

from common import CORPUS, parse_args, peer_tokenizer, result, table, timed
from rlhf.data.template import encode_prompt
from rlhf.modeling import build_model
from rlhf.sampling import generate

BATCH, PROMPT_LEN, NEW, TEMPERATURE = 16, 32, 48, 0.7


def prompts_of(tokenizer) -> list[list[int]]:
    """16 real prompts from the corpus, each exactly 32 tokens through the template."""
    words = CORPUS.read_text(encoding="utf-8")[20_000:60_000].split()
    out = []
    for line in (" ".join(words[i * 60 : (i + 1) * 60]) for i in range(BATCH)):
        ids = encode_prompt(tokenizer, line)
        out.append(ids[: PROMPT_LEN - 3] + ids[-3:])  # keep the "Assistant:" tail
    return out


def hf_generate(model, tokenizer, prompt_ids):
    ids = torch.tensor(prompt_ids)
    mask = torch.ones_like(ids)
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            do_sample=True,
            temperature=TEMPERATURE,
            top_k=0,
            top_p=1.0,
            max_new_tokens=NEW,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )[:, ids.shape[1] :]
    # real tokens: up to and including the first EOS
    eos = (out == tokenizer.eos_token_id).int()
    return int(((eos.cumsum(1) - eos) == 0).sum())


def ours(model, tokenizer, prompt_ids, **kw):
    gen = generate(model, tokenizer, prompt_ids, max_new_tokens=NEW, temperature=TEMPERATURE, **kw)
    return int(gen.response_mask.sum())


def bench(preset: str, tokenizer, repeats: int, quick: bool) -> list[list]:
    torch.manual_seed(0)
    model = build_model(preset, tokenizer).eval()
    model16 = copy.deepcopy(model).to(torch.bfloat16)
    prompt_ids = prompts_of(tokenizer)
    variants = [
        ("model.generate (fp32)", lambda: hf_generate(model, tokenizer, prompt_ids)),
        ("model.generate (bf16)", lambda: hf_generate(model16, tokenizer, prompt_ids)),
        ("ours, fast path (fp32)", lambda: ours(model, tokenizer, prompt_ids)),
        ("ours, fast path (bf16)", lambda: ours(model, tokenizer, prompt_ids, bf16=True)),
    ]
    threads = torch.get_num_threads()
    if threads > 1:
        variants.append(
            ("model.generate (fp32, 1 thread)", lambda: one_thread(hf_generate, model, tokenizer, prompt_ids))
        )
        variants.append(
            (
                "model.generate (bf16, 1 thread)",
                lambda: one_thread(hf_generate, model16, tokenizer, prompt_ids),
            )
        )
        variants.append(
            ("ours, fast path (fp32, 1 thread)", lambda: one_thread(ours, model, tokenizer, prompt_ids))
        )
        variants.append(
            (
                "ours, fast path (bf16, 1 thread)",
                lambda: one_thread(ours, model, tokenizer, prompt_ids, bf16=True),
            )
        )
    if not quick:
        variants.append(
            ("ours, generic HF loop (fp32)", lambda: ours(model, tokenizer, prompt_ids, fast=False))
        )
    # Interleaved repeats: the machine is shared and noisy, so every variant sees the same conditions.
    tokens = [fn() for _, fn in variants]
    times: list[list[float]] = [[] for _ in variants]
    cpu: list[list[float]] = [[] for _ in variants]
    for _ in range(repeats):
        for i, (_, fn) in enumerate(variants):
            start = time.process_time()
            times[i].append(timed(fn, 1, warmup=0)[0])
            cpu[i].append(time.process_time() - start)
    rows = []
    for (name, _), n, ts, cs in zip(variants, tokens, times, cpu):
        seconds, cpu_ms = statistics.median(ts), 1e3 * statistics.median(cs) / n
        rows.append([preset, name, n, seconds, n / seconds, cpu_ms])
        print(
            f"{preset:6s} {name:32s} {n} tokens  {seconds:.3f} s  {n / seconds:.0f} tok/s  {cpu_ms:.3f} cpu-ms/tok",
            flush=True,
        )
    return rows


def one_thread(fn, *args, **kw):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn(*args, **kw)
    finally:
        torch.set_num_threads(before)


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    repeats = 3 if args.quick else 7
    tokenizer = peer_tokenizer()
    rows = []
    for preset in ("tiny", "small"):
        rows += bench(preset, tokenizer, repeats, args.quick)
    print(table(rows, ["preset", "sampler", "new tokens", "median s", "new tok/s", "CPU ms/tok"]))
    # ratios less sensitive to a busy machine than the wall-time RESULT lines
    for preset in ("tiny", "small"):
        by = {r[1]: r for r in rows if r[0] == preset}
        ours32, ours16 = by["ours, fast path (fp32)"], by["ours, fast path (bf16)"]
        base, best = by["model.generate (fp32)"], peer_best(by)
        print(
            f"{preset}: CPU time per token, model.generate fp32 / ours fp32 {base[5] / ours32[5]:.2f}x; "
            f"least CPU of model.generate rows / ours bf16 {min(r[5] for r in peer_rows(by)) / ours16[5]:.2f}x"
        )
        if "model.generate (fp32, 1 thread)" in by:
            one = by["model.generate (fp32, 1 thread)"]
            print(
                f"{preset}: against model.generate fp32 on 1 thread: tok/s fp32 {ours32[4] / one[4]:.2f}x, "
                f"bf16 {ours16[4] / one[4]:.2f}x"
            )
        print(f"{preset}: fastest model.generate row: {best[1]} ({best[4]:.0f} tok/s)")
    for preset in ("tiny", "small"):
        by = {r[1]: r for r in rows if r[0] == preset}
        result(
            f"sample_{preset}_fp32",
            by["ours, fast path (fp32)"][4],
            by["model.generate (fp32)"][4],
            "new_tok/s",
        )
        result(f"sample_{preset}_bf16", by["ours, fast path (bf16)"][4], peer_best(by)[4], "new_tok/s")


def peer_rows(by: dict) -> list[list]:
    return [r for name, r in by.items() if name.startswith("model.generate")]


def peer_best(by: dict) -> list:
    """The fastest model.generate row (fp32 or bf16 weights, either thread setting)."""
    return max(peer_rows(by), key=lambda r: r[4])


if __name__ == "__main__":
    main()
