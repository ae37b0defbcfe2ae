"""`rlhf sft` vs TRL's `SFTTrainer`: training tokens per second on the same model and data (batch 8 x 128).

Model: the PERF-NOTES peer GPT-2 (4L d=256, vocab 8192, random init); data: LIMA demonstrations from
`../shared/data/sft/lima/lima.json` (falls back to the shipped Self-Instruct seeds), truncated to 128 tokens, so
nearly every row is a full 128 tokens on both sides. Both compute the loss on the response only, fp32 (and bf16), AdamW.
Step times are medians after a warm-up; tokens/s = real (non-pad) tokens per step / median step time.

    .venv/bin/python benchmarks/sft.py [--quick] [--threads 2]
"""

from __future__ import annotations

import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from common import ROOT, SHARED, parse_args, peer_gpt2_config, peer_tokenizer, result, table
from rlhf.checkpoint import save_hf
from rlhf.config import load_config
from rlhf.data.demonstrations import read_demonstrations
from rlhf.data.records import write_jsonl
from rlhf.data.template import format_prompt
from rlhf.stages import sft

BATCH, LENGTH, WARMUP = 8, 128, 3


def demos(n: int):
    lima = SHARED / "sft" / "lima" / "lima.json"
    path = lima if lima.exists() else ROOT / "data" / "sft" / "self-instruct_seed_tasks.jsonl"
    return read_demonstrations(path)[:n], path.name


def fresh_model(tokenizer):
    import torch
    from transformers import GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(peer_gpt2_config(tokenizer))


def ours(tokenizer, data, steps: int, bf16: bool, work: Path) -> tuple[float, float]:
    """(median step seconds, mean tokens per step) of the real `rlhf sft` stage."""
    save_hf(fresh_model(tokenizer), tokenizer, work / "base")
    write_jsonl(work / "demos.jsonl", [{"prompt": d.prompt, "response": d.response} for d in data])
    config = load_config(
        sft.SFTConfig,
        extra={
            "model.path": str(work / "base"),
            "runs_dir": str(work / "runs"),
            "data": [str(work / "demos.jsonl")],
            "val_fraction": 0.0,
            "max_steps": steps,
            "batch_size": BATCH,
            "max_length": LENGTH,
            "lr": 1e-4,
            "warmup_steps": 0,
            "log_every": 1,
            "save_every": 0,
            "sample_prompts": 0,
            "bf16": bf16,
        },
    )
    sft.run(config)
    rows = [
        json.loads(x) for x in open(work / "runs" / "demo" / "sft" / "metrics.jsonl") if "train/loss" in x
    ]
    times = [b["time"] - a["time"] for a, b in zip(rows[WARMUP:], rows[WARMUP + 1 :])]
    return statistics.median(times), statistics.mean(r["train/batch_tokens"] for r in rows)


def trl(tokenizer, data, steps: int, bf16: bool, work: Path) -> tuple[float, float]:
    """(median step seconds, mean tokens per step) of TRL's SFTTrainer on prompt/completion pairs."""
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    stamps: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            stamps.append(time.perf_counter())

    dataset = Dataset.from_list(
        [{"prompt": format_prompt(d.prompt), "completion": " " + d.response.strip()} for d in data]
    )
    args = SFTConfig(
        output_dir=str(work / "trl"),
        per_device_train_batch_size=BATCH,
        max_length=LENGTH,
        max_steps=steps,
        learning_rate=1e-4,
        lr_scheduler_type="cosine",
        logging_steps=1000,
        save_strategy="no",
        report_to=[],
        bf16=bf16,
        use_cpu=True,
        completion_only_loss=True,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    trainer = SFTTrainer(
        model=fresh_model(tokenizer),
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[Clock()],
    )
    lengths = [len(x) for x in trainer.train_dataset["input_ids"]]
    trainer.train()
    times = [b - a for a, b in zip(stamps[WARMUP:], stamps[WARMUP + 1 :])]
    return statistics.median(times), BATCH * statistics.mean(lengths)


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    steps = 15 if args.quick else 60
    tokenizer = peer_tokenizer()
    data, source = demos(steps * BATCH)
    rows, figures = [], {}
    for bf16 in (False, True):
        for name, fn in (("rlhf sft", ours), ("TRL SFTTrainer", trl)):
            work = Path(tempfile.mkdtemp(prefix="bench-sft-"))
            try:
                seconds, tokens = fn(tokenizer, data, steps, bf16, work)
            finally:
                shutil.rmtree(work, ignore_errors=True)
            precision = "bf16" if bf16 else "fp32"
            figures[(name, precision)] = tokens / seconds
            rows.append([name, precision, source, round(tokens), seconds, tokens / seconds])
    print(table(rows, ["trainer", "precision", "data", "tokens/step", "median step s", "tokens/s"]))
    for precision in ("fp32", "bf16"):
        result(
            f"sft_{precision}",
            figures[("rlhf sft", precision)],
            figures[("TRL SFTTrainer", precision)],
            "tok/s",
        )


if __name__ == "__main__":
    main()
