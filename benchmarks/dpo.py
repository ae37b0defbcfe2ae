"""DPO side by side with TRL 1.12's `DPOTrainer`: same model, same pairs, same hyper-parameters.

Set-up (PERF-NOTES): GPT-2 4 layers d=256, vocab 8192, random init (the same weights for both); pairs of a
32-token prompt and two 48-token responses cut from the shipped children's-stories corpus, ranked by the project's
synthetic `sentiment` rubric (rlhf.labellers.gold_score; near-ties dropped); batch 8 pairs, beta 0.1, AdamW,
linear decay, 2 epochs over the training pairs (TRL's default is 3); fp32, then both again with bf16. Both trained
models are then scored by ONE function on held-out pairs (implicit-reward accuracy: beta*log(pi/ref) higher for the
preferred response).

Throughput is pairs trained / seconds of the whole training call (wall seconds, and the process's own CPU seconds,
all threads: on a busy shared machine the CPU-second ratio is the robust one; `--cpu-time` makes the RESULT lines use
it, best with `--threads 1`): for `rlhf dpo` that includes loading,
tokenizing, the one-off reference pass, checkpointing and saving; for TRL it is `trainer.train()` (its dataset
tokenization happens earlier and is not counted). The reference pass is the same work for both in the first
epoch; `rlhf dpo` caches it, TRL redoes it every epoch. The machine is noisy: compare ratios within one run.

    .venv/bin/python benchmarks/dpo.py --quick     # about a minute
    .venv/bin/python benchmarks/dpo.py             # more steps: accuracy has time to move
    .venv/bin/python benchmarks/dpo.py --quick --threads 1 --cpu-time   # on a busy shared machine
    .venv/bin/python benchmarks/dpo.py --quick --hh   # real HH-RLHF pairs of varied length (../shared/data)

The default pairs all have the same length, so nothing is padded; `--hh` pairs pad a batch by a quarter to a third,
which both trainers pay for.

TRL runs at its defaults (SDPA attention, fp32; with bf16 its own `bf16=True`); ours at its defaults (eager
attention on CPU, each prompt run once per pair, LM head on response columns only, cross-entropy log-probs,
reference log-probs cached, fused AdamW; on padded batches such as `--hh`'s the trunk's linear layers run on real
tokens only and the head on real response tokens only). bf16 rows compare bf16 with bf16.
"""

from __future__ import annotations

import logging
import random
import shutil
import tempfile
import time
from pathlib import Path

import torch

from common import CORPUS, SHARED, parse_args, peer_gpt2_config, peer_tokenizer, result, table

CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
PROMPT_TOKENS, RESPONSE_TOKENS, BATCH, BETA, LR, EPOCHS = 32, 48, 8, 0.1, 5e-4, 2
# --hh: real pairs of varied length (HH-RLHF harmless-base test, ../shared/data), cut to these many tokens
HH_PAIRS = SHARED / "preference" / "hh-rlhf" / "harmless-base" / "test.jsonl.gz"
HH_PROMPT_TOKENS, HH_RESPONSE_TOKENS = 96, 64


def make_pairs(tokenizer, n: int, seed: int) -> list[dict]:
    """{"prompt", "chosen", "rejected"} texts from corpus passages, ranked by the sentiment rubric."""
    from rlhf.data.template import format_prompt
    from rlhf.labellers import gold_score

    ids = tokenizer(CORPUS.read_text(encoding="utf-8")[:1_500_000], add_special_tokens=False)["input_ids"]
    rng = random.Random(seed)
    head = len(tokenizer(format_prompt(""), add_special_tokens=False)["input_ids"]) + 1  # template + BOS

    def passage(length: int) -> str:
        start = rng.randrange(0, len(ids) - length)
        return tokenizer.decode(ids[start : start + length]).strip()

    pairs = []
    while len(pairs) < n:
        prompt = passage(PROMPT_TOKENS - head)
        a, b = passage(RESPONSE_TOKENS - 1), passage(RESPONSE_TOKENS - 1)  # + EOS
        sa, sb = gold_score(prompt, a), gold_score(prompt, b)
        if abs(sa - sb) < 0.5:
            continue
        chosen, rejected = (a, b) if sa > sb else (b, a)
        pairs.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return pairs


def hh_pairs(tokenizer, n: int) -> list[dict]:
    """The first n HH-RLHF harmless-base test pairs (human choices, real lengths): prompts cut to their last
    HH_PROMPT_TOKENS tokens and replies to their first HH_RESPONSE_TOKENS, so neither trainer truncates further."""
    from rlhf.data.comparisons import import_hh_rlhf

    comparisons, _ = import_hh_rlhf(HH_PAIRS)

    def cut(text: str, tokens: int, keep_end: bool) -> str:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        return tokenizer.decode(ids[-tokens:] if keep_end else ids[:tokens]).strip()

    return [
        {"prompt": cut(c.prompt, HH_PROMPT_TOKENS, True), "chosen": cut(c.responses[0], HH_RESPONSE_TOKENS, False),
         "rejected": cut(c.responses[1], HH_RESPONSE_TOKENS, False)}
        for c in comparisons[:n]
    ]  # fmt: skip


def held_out_accuracy(model, ref_model, tokenizer, pairs: list[dict]) -> float:
    """Share of held-out pairs whose implicit reward log(pi/ref) is higher for the preferred response."""
    from rlhf.data.template import encode_prompt, encode_response
    from rlhf.stages.dpo import Pair, all_pair_logprobs

    class Single:  # one process
        num_processes, process_index, is_main_process = 1, 0, True

        def autocast(self):
            return torch.autocast("cpu", enabled=False)

    toks = [
        Pair(encode_prompt(tokenizer, p["prompt"]), encode_response(tokenizer, p["chosen"]),
             encode_response(tokenizer, p["rejected"]))
        for p in pairs
    ]  # fmt: skip
    pol = all_pair_logprobs(model.eval(), toks, tokenizer.pad_token_id, 32, Single())
    ref = all_pair_logprobs(ref_model.eval(), toks, tokenizer.pad_token_id, 32, Single())
    margin = (pol[:, 0] - ref[:, 0]) - (pol[:, 1] - ref[:, 1])
    return (margin > 0).float().mean().item()


def _rates(run, pairs: int) -> dict[str, float]:
    """pairs/s of `run()` by wall and by this process's CPU seconds."""
    start = {name: clock() for name, clock in CLOCKS.items()}
    run()
    return {name: pairs / (clock() - start[name]) for name, clock in CLOCKS.items()}


def run_ours(
    base: Path, train: list[dict], steps: int, work: Path, threads: int, bf16: bool, lengths: tuple[int, int]
) -> tuple[dict[str, float], Path]:
    from rlhf.config import load_config
    from rlhf.data.records import Comparison, write_jsonl
    from rlhf.stages.dpo import DPOConfig, run

    records = [Comparison(p["prompt"], [p["chosen"], p["rejected"]], [1, 2]) for p in train]
    write_jsonl(work / "train.jsonl", records)
    name = "bf16" if bf16 else "fp32"
    overrides = {
        "comparisons": work / "train.jsonl", "model.path": base, "runs_dir": work / "runs", "name": name,
        "steps": steps, "batch_size": BATCH, "lr": LR, "beta": BETA, "warmup_steps": 0, "val_fraction": 0,
        "max_length": lengths[0], "max_prompt_length": lengths[1], "log_every": 10,
        "save_every": 10_000, "threads": threads, "bf16": bf16, "seed": 0,
    }  # fmt: skip
    config = load_config(DPOConfig, None, [f"{k}={v}" for k, v in overrides.items()])
    return _rates(lambda: run(config), steps * BATCH), work / "runs" / name / "dpo" / "model"


def run_trl(
    base: Path, tokenizer, train: list[dict], steps: int, work: Path, bf16: bool, max_length: int
) -> tuple[dict[str, float], object]:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    from rlhf.data.template import format_prompt

    data = Dataset.from_list(
        [{"prompt": format_prompt(p["prompt"]), "chosen": " " + p["chosen"], "rejected": " " + p["rejected"]}
         for p in train]
    )  # fmt: skip
    args = DPOConfig(
        output_dir=str(work / "trl"), per_device_train_batch_size=BATCH, max_steps=steps, learning_rate=LR,
        beta=BETA, lr_scheduler_type="linear", warmup_steps=0, max_length=max_length,
        logging_steps=10, save_strategy="no", report_to=[], use_cpu=True, seed=0, dataloader_num_workers=0,
        bf16=bf16, disable_tqdm=True,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(base)
    trainer = DPOTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    return _rates(trainer.train, steps * BATCH), trainer.model


def main() -> None:
    args = parse_args(
        __doc__.splitlines()[0],
        lambda p: (
            p.add_argument(
                "--cpu-time", action="store_true", help="RESULT lines by process CPU seconds (busy machine)"
            ),
            p.add_argument(
                "--hh",
                action="store_true",
                help="real pairs of varied length instead of fixed-length ones: HH-RLHF harmless-base test from "
                f"../shared/data, prompts cut to {HH_PROMPT_TOKENS} tokens and replies to {HH_RESPONSE_TOKENS}",
            ),
        ),
    )
    logging.getLogger("rlhf").setLevel(logging.WARNING)
    clock = "cpu" if args.cpu_time else "wall"
    steps = 20 if args.quick else 150
    n_train, n_val = steps * BATCH // EPOCHS, 64 if args.quick else 200
    tokenizer = peer_tokenizer()
    pairs = (
        hh_pairs(tokenizer, n_train + n_val) if args.hh else make_pairs(tokenizer, n_train + n_val, seed=0)
    )
    # (max_length, max_prompt_length), never reached: both trainers see whole pairs
    lengths = (192, 128) if args.hh else (PROMPT_TOKENS + RESPONSE_TOKENS, PROMPT_TOKENS)
    tag = "_hh" if args.hh else ""
    train, val = pairs[:n_train], pairs[n_train:]
    work = Path(tempfile.mkdtemp(prefix="bench_dpo_"))
    try:
        from transformers import AutoModelForCausalLM, GPT2LMHeadModel

        torch.manual_seed(0)
        base = work / "base"
        GPT2LMHeadModel(peer_gpt2_config(tokenizer)).save_pretrained(base)
        tokenizer.save_pretrained(base)
        ref = AutoModelForCausalLM.from_pretrained(base)

        rows, rates, accs = [], {}, {}
        for bf16 in (False, True):
            precision = "bf16" if bf16 else "fp32"
            rate, model = run_trl(base, tokenizer, train, steps, work, bf16, lengths[0])
            rates["trl", precision], accs["trl", precision] = (
                rate,
                held_out_accuracy(model, ref, tokenizer, val),
            )
            del model
            rate, path = run_ours(base, train, steps, work, args.threads, bf16, lengths)
            rates["ours", precision] = rate
            accs["ours", precision] = held_out_accuracy(
                AutoModelForCausalLM.from_pretrained(path), ref, tokenizer, val
            )
            for who, name in (("trl", "TRL 1.12 DPOTrainer"), ("ours", "rlhf dpo")):
                r = rates[who, precision]
                rows.append([f"{name} ({precision})", r["wall"], r["cpu"], accs[who, precision]])

        shape = (
            f"HH-RLHF, up to {HH_PROMPT_TOKENS}+{HH_RESPONSE_TOKENS} tokens"
            if args.hh
            else f"{PROMPT_TOKENS}+{RESPONSE_TOKENS} tokens"
        )
        print(f"\n{steps} steps x {BATCH} pairs ({EPOCHS} epochs of {len(train)} pairs, {shape}), "
              f"{len(val)} held-out pairs, {args.threads} threads")  # fmt: skip
        print(table(rows, ["trainer", "pairs/s (wall)", "pairs/CPU-s", "held-out accuracy"]))
        print(f"RESULT lines use {'CPU' if args.cpu_time else 'wall'} seconds")
        for precision in ("fp32", "bf16"):
            ours, peer = rates["ours", precision][clock], rates["trl", precision][clock]
            result(
                f"dpo_pairs_per_s_{precision}{tag}",
                ours,
                peer,
                "pairs/s" if clock == "wall" else "pairs/cpu-s",
            )
        result(
            f"dpo_bf16_vs_trl_fp32{tag}", rates["ours", "bf16"][clock], rates["trl", "fp32"][clock], "pairs/s"
        )
        for precision in ("fp32", "bf16"):
            result(
                f"dpo_heldout_accuracy_{precision}{tag}",
                accs["ours", precision],
                accs["trl", precision],
                "accuracy",
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
