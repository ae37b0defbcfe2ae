"""`rlhf sample`: K responses per prompt from a policy, written as `SampleRecord`s (docs/formats.md, "Samples").

The file is what labellers (`rlhf label synthetic`) and the feedback app read. Each response keeps its token ids,
the sum of its per-token log-probs at the sampling temperature, and whether it ended with EOS.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from rlhf.config import ModelConfig, StageConfig, option
from rlhf.data.demonstrations import read_prompts
from rlhf.data.records import Response, SampleRecord, write_jsonl
from rlhf.data.template import encode_prompt
from rlhf.errors import UserError
from rlhf.modeling import context_length, load_policy
from rlhf.sampling import generate
from rlhf.stagecli import parse_stage_args
from rlhf.tracking import MetricsLogger, log, stage_dir, start_run


@dataclass
class SampleConfig(StageConfig):
    model: ModelConfig = option(
        ModelConfig(), "policy to sample from; empty path = <runs_dir>/<name>/sft/model"
    )
    prompts: str = option(
        "data/sft/self-instruct_seed_tasks.jsonl",
        'prompts: JSONL {"prompt": ...} or any demonstration format, or a text file with one prompt per line',
    )
    max_prompts: int = option(0, "use only the first N prompts (0 = all)", low=0)
    k: int = option(4, "responses per prompt", low=1, high=9)
    max_new_tokens: int = option(64, "longest response in tokens", low=1)
    temperature: float = option(
        1.0, "sampling temperature (log-probs are taken at this temperature)", low=1e-4
    )
    top_k: int = option(0, "sample among the k most likely tokens (0 = all)", low=0)
    top_p: float = option(1.0, "nucleus sampling mass", low=1e-6, high=1.0)
    batch_size: int = option(64, "sequences generated together", low=1)
    bf16: bool = option(False, "bfloat16 matmuls in the fast GPT-2 decoder (log-probs carry bf16 rounding)")
    long_prompts: str = option(
        "error",
        "a prompt that leaves fewer than max_new_tokens of the model's context: error, or skip it (counted)",
        choices=("error", "skip"),
    )
    out: str = option("", "output JSONL; empty = <runs_dir>/<name>/sample/samples.jsonl")


def _model_path(config: SampleConfig) -> str:
    return config.model.path or str(stage_dir(config, "sft") / "model")


def run(config: SampleConfig) -> dict:
    out_dir = start_run(config, "sample")
    prompts = read_prompts(config.prompts)
    if config.max_prompts:
        prompts = prompts[: config.max_prompts]
    if not prompts:
        raise UserError(f"prompts file {config.prompts} holds no prompts")
    policy = _model_path(config)
    model, tokenizer = load_policy(policy, config.model.tokenizer)
    model.to(config.device)
    ids = [encode_prompt(tokenizer, p) for _, p in prompts]
    if config.long_prompts == "skip":
        room = context_length(model) - config.max_new_tokens
        kept = [i for i, x in enumerate(ids) if len(x) <= room]
        if len(kept) < len(ids):
            log.warning(
                "skipped %d of %d prompts longer than %d tokens (long_prompts=skip)",
                len(ids) - len(kept),
                len(ids),
                room,
            )
        prompts, ids = [prompts[i] for i in kept], [ids[i] for i in kept]
        if not prompts:
            raise UserError(f"every prompt in {config.prompts} is longer than {room} tokens")
    repeated = [p for p in ids for _ in range(config.k)]  # prompt i's responses are rows i*k .. i*k+k-1
    start = time.perf_counter()
    gen = generate(
        model,
        tokenizer,
        repeated,
        max_new_tokens=config.max_new_tokens,
        temperature=config.temperature,
        top_k=config.top_k,
        top_p=config.top_p,
        generator=torch.Generator(device=config.device).manual_seed(config.seed),
        batch_size=config.batch_size,
        bf16=config.bf16,
    )
    seconds = time.perf_counter() - start
    lengths = gen.response_mask.sum(1).tolist()
    token_rows = gen.response_ids.tolist()
    logprob = (gen.logprobs * gen.response_mask).sum(1).tolist()
    finished = gen.finished.tolist()
    meta = {
        "temperature": config.temperature,
        "top_k": config.top_k,
        "top_p": config.top_p,
        "max_new_tokens": config.max_new_tokens,
        "seed": config.seed,
    }
    records = []
    for i, (prompt_id, prompt) in enumerate(prompts):
        rows = range(i * config.k, (i + 1) * config.k)
        responses = [
            Response(
                text=gen.texts[r],
                token_ids=token_rows[r][: lengths[r]],
                logprob=round(logprob[r], 4),
                finished=bool(finished[r]),
                policy=policy,
            )
            for r in rows
        ]
        records.append(SampleRecord(prompt_id=prompt_id, prompt=prompt, responses=responses, meta=dict(meta)))
    out = Path(config.out) if config.out else out_dir / "samples.jsonl"
    write_jsonl(out, records)
    summary = {
        "samples": str(out),
        "prompts": len(records),
        "responses": len(repeated),
        "eos_rate": sum(finished) / len(finished),
        "mean_length": sum(lengths) / len(lengths),
        "tokens_per_s": sum(lengths) / max(seconds, 1e-9),
    }
    metrics = MetricsLogger(out_dir)
    metrics.log(0, {f"sample/{k}": v for k, v in summary.items() if isinstance(v, float)})
    metrics.close()
    log.info(
        "wrote %d prompts x %d responses to %s (EOS rate %.2f, mean length %.1f, %.0f tok/s)",
        len(records), config.k, out, summary["eos_rate"], summary["mean_length"], summary["tokens_per_s"],
    )  # fmt: skip
    return summary


def main(argv: list[str]) -> int:
    config = parse_stage_args(
        SampleConfig, argv, "rlhf sample", "Sample K responses per prompt from a policy into a samples JSONL."
    )
    if config is None:
        return 0
    summary = run(config)
    print(  # noqa: T201
        f"samples: {summary['samples']}  ({summary['prompts']} prompts x {config.k}, "
        f"EOS rate {summary['eos_rate']:.2f})"
    )
    return 0
