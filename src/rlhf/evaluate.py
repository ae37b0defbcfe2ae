"""`rlhf eval`: what RLHF really did to a policy, measured on fresh samples from held-out prompts.

For the SFT reference and every policy (final models and PPO snapshots) it samples `samples_per_prompt` responses
per prompt at temperature 1 and reports:

- proxy score: the reward model's normalised score (what PPO optimised);
- gold score: the `sentiment` rubric (what we actually want; PPO never sees it);
- KL to the reference: sum over response tokens of log pi - log ref on the policy's own samples (an unbiased
  estimate of the sequence KL), with sqrt(KL) for the over-optimisation view of Gao, Schulman & Hilton 2022;
- win rate against the reference: response j of the policy vs response j of the reference on the same prompt,
  judged by the gold rubric without noise, ties counted half; the pairs are also written as K=2 sample records
  (`pairs-<policy>.jsonl`) for human judging in the feedback app (`rlhf label import`), and a file of such human
  judgements can be scored with `judgements=FILE`;
- response length (words, tokens) and EOS rate;
- diversity: distinct-1/2 and self-BLEU over the policy's responses, mean per-token entropy of its samples;
- best-of-n on the reference: pick the proxy-best of n reference samples, report its gold and proxy score at the
  analytic KL log n - (n-1)/n (the simplest alternative PPO must beat);
- the reward model's held-out accuracy, read from the reward stage's metrics beside `reward_model`.

Output: `<run>/eval/metrics.json` (everything), `metrics.jsonl` (one row per policy), `samples.jsonl` (every
response with its scores, for the report), `best_of_n.json`, and the pair files.
"""

from __future__ import annotations

import json
import logging
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rlhf import eval_metrics as em
from rlhf.config import StageConfig, option
from rlhf.data.records import Response, SampleRecord, read_comparisons, write_jsonl
from rlhf.errors import UserError
from rlhf.policies import (
    policy_label,
    policy_method,
    read_prompts,
    snapshot_folders,
    unique_labels,
)
from rlhf.stagecli import parse_stage_args
from rlhf.tracking import MetricsLogger, progress, read_metrics, start_run

log = logging.getLogger("rlhf")


@dataclass
class EvalConfig(StageConfig):
    POSITIONAL = ("policies",)

    policies: list[str] = option(
        [], "policy model folders to evaluate (HF folders, e.g. runs/demo/round-1/ppo/model)"
    )
    snapshots: list[str] = option(
        [],
        "PPO stage folders: each checkpoint in them and their model/ is evaluated (over-optimisation view)",
    )
    reference: str = option("", "the SFT reference model folder (KL, win rate and best-of-n are against it)")
    reward_model: str = option("", "reward model folder for the proxy score and best-of-n; empty = none")
    prompts: str = option("", "held-out prompts: a JSONL with a 'prompt' field per line")
    num_prompts: int = option(32, "how many prompts to use (the first N)", low=1)
    samples_per_prompt: int = option(2, "responses sampled per prompt and policy", low=1)
    max_new_tokens: int = option(48, "longest response in tokens", low=1)
    gold: str = option("sentiment", "gold scorer: the demo rubric, or none", choices=("sentiment", "none"))
    best_of_n: list[int] = option(
        [1, 2, 4, 8, 16], "n values of the best-of-n baseline (needs reward_model); [] = skip it"
    )
    judgements: str = option("", "comparisons of exported pairs judged by humans: adds a human win rate")
    self_bleu_texts: int = option(64, "responses per policy used for self-BLEU (it is quadratic)", low=2)
    batch_size: int = option(64, "rows per generation / scoring batch", low=1)
    stage: str = option("eval", "folder name of this evaluation inside the run")

    def validate(self) -> None:
        super().validate()
        if not self.reference:
            raise UserError("config field 'reference': give the SFT model folder to compare against")
        if not self.prompts:
            raise UserError("config field 'prompts': give a JSONL of held-out prompts")
        if any(n < 1 for n in self.best_of_n):
            raise UserError(f"config field 'best_of_n': every n must be >= 1, got {self.best_of_n}")


# ---------------------------------------------------------------------------------------------------------------
# Sampling and scoring


@dataclass
class Scored:
    """Responses of one policy: rows are prompt-major (prompt i, sample j at row i * k + j)."""

    texts: list[str]
    ids: list[list[int]]  # response token ids (EOS included when finished)
    finished: list[bool]
    logprobs: list[list[float]]  # sampled-token log-probs at temperature 1
    kl: list[float]
    gold: list[float]
    proxy: list[float]


def _sample(model, tokenizer, prompt_ids: list[list[int]], cfg: EvalConfig, seed: int):
    from rlhf.sampling import generate

    gen = torch.Generator().manual_seed(seed)
    return generate(
        model,
        tokenizer,
        prompt_ids,
        max_new_tokens=cfg.max_new_tokens,
        temperature=1.0,
        generator=gen,
        batch_size=cfg.batch_size,
    )


def _sequence_kl(policy, ref, prompt_ids, gen, pad_id: int, batch: int) -> list[float]:
    from rlhf.sampling import join_prompt_response, token_logprobs

    out: list[float] = []
    with torch.no_grad():
        for s in range(0, len(prompt_ids), batch):
            ids, mask = gen.response_ids[s : s + batch], gen.response_mask[s : s + batch]
            inputs, attn, start = join_prompt_response(prompt_ids[s : s + batch], ids, mask, pad_id)
            lp_pol = token_logprobs(policy, inputs, attn, start=start - 1)  # (B, T) response tokens only
            lp_ref = token_logprobs(ref, inputs, attn, start=start - 1)
            out.extend(em.sequence_kl(lp_pol, lp_ref, mask).tolist())
    return out


def _proxy(rm, prompts: list[str], ids: list[list[int]], batch: int) -> list[float]:
    if rm is None:
        return [float("nan")] * len(prompts)
    out: list[float] = []
    with torch.no_grad():
        for s in range(0, len(prompts), batch):
            seqs = [
                rm.encode(p, "", response_ids=r) for p, r in zip(prompts[s : s + batch], ids[s : s + batch])
            ]
            out.extend(rm.score(*rm.pad(seqs)).tolist())
    return out


def score_policy(
    policy, ref, tokenizer, rm, prompts: list[str], prompt_ids, cfg: EvalConfig, k: int
) -> Scored:
    rows_p = [p for p in prompts for _ in range(k)]
    rows_ids = [ids for ids in prompt_ids for _ in range(k)]
    gen = _sample(policy, tokenizer, rows_ids, cfg, cfg.seed)
    mask = gen.response_mask
    ids = [row[m].tolist() for row, m in zip(gen.response_ids, mask)]
    lps = [row[m].tolist() for row, m in zip(gen.logprobs, mask)]
    kl = (
        [0.0] * len(ids)
        if policy is ref
        else _sequence_kl(policy, ref, rows_ids, gen, tokenizer.pad_token_id, cfg.batch_size)
    )
    gold = [_gold(cfg, p, t) for p, t in zip(rows_p, gen.texts)]
    return Scored(
        gen.texts, ids, gen.finished.tolist(), lps, kl, gold, _proxy(rm, rows_p, ids, cfg.batch_size)
    )


def _gold(cfg: EvalConfig, prompt: str, text: str) -> float:
    if cfg.gold == "none":
        return float("nan")
    from rlhf.labellers import gold_score

    return float(gold_score(prompt, text))


def _subset(s: Scored, k_from: int, k_to: int) -> Scored:
    """The first k_to of every k_from samples per prompt."""
    rows = [i for i in range(len(s.texts)) if i % k_from < k_to]
    pick = lambda xs: [xs[i] for i in rows]  # noqa: E731
    return Scored(*(pick(getattr(s, f)) for f in Scored.__dataclass_fields__))


def summarise(s: Scored, ref: Scored, cfg: EvalConfig) -> dict[str, float]:
    """One policy's metrics against the reference's samples (paired row by row)."""
    lengths = [len(em.words(t)) for t in s.texts]
    flat_lp = [x for row in s.logprobs for x in row]
    texts = s.texts[: cfg.self_bleu_texts]
    gold_ok = cfg.gold != "none"
    kl_mean = em.mean(s.kl)
    return {
        "gold/score": em.mean(s.gold),
        "gold/stderr": em.stderr(s.gold),
        "proxy/score": em.mean(s.proxy),
        "proxy/stderr": em.stderr(s.proxy),
        "kl/mean": kl_mean,
        "kl/stderr": em.stderr(s.kl),
        "kl/sqrt": math.sqrt(max(kl_mean, 0.0)),
        "win_rate/gold": em.win_rate(s.gold, ref.gold) if gold_ok else float("nan"),
        "length/words": em.mean(lengths),
        "length/tokens": em.mean([len(i) for i in s.ids]),
        "eos_rate": em.mean([1.0 if f else 0.0 for f in s.finished]),
        "diversity/distinct_1": em.distinct_n(s.texts, 1),
        "diversity/distinct_2": em.distinct_n(s.texts, 2),
        "diversity/self_bleu": em.self_bleu(texts),
        "diversity/entropy": -sum(flat_lp) / max(len(flat_lp), 1),
    }


def best_of_n(pool: Scored, n_max: int, ns: list[int]) -> list[dict[str, float]]:
    """Proxy-best of n among each prompt's n_max reference samples, using every disjoint group of n."""
    out = []
    prompts = len(pool.texts) // n_max
    for n in sorted(set(x for x in ns if x <= n_max)):
        gold, proxy = [], []
        for p in range(prompts):
            for g in range(n_max // n):
                rows = range(p * n_max + g * n, p * n_max + (g + 1) * n)
                best = max(rows, key=lambda r: pool.proxy[r])
                gold.append(pool.gold[best])
                proxy.append(pool.proxy[best])
        kl = em.best_of_n_kl(n)
        out.append(
            {
                "n": n,
                "kl": kl,
                "sqrt_kl": math.sqrt(kl),
                "gold/score": em.mean(gold),
                "gold/stderr": em.stderr(gold),
                "proxy/score": em.mean(proxy),
                "groups": len(gold),
            }
        )
    return out


def reward_accuracy(reward_model: str) -> float | None:
    """The reward stage's last held-out accuracy, from the metrics.jsonl beside its model/ folder."""
    if not reward_model:
        return None
    path = Path(reward_model).parent / "metrics.jsonl"
    if not path.exists():
        return None
    value = None
    for row in read_metrics(path):
        for key, v in row.items():
            if key.startswith(("val/", "eval/")) and "acc" in key and isinstance(v, (int, float)):
                value = float(v)
    return value


def human_win_rate(path: str, policy: str, reference: str) -> dict[str, float]:
    """Win rate of `policy` over `reference` in human-judged pair comparisons (their `policies` name each side)."""
    wins = []
    for c in read_comparisons(path):
        if len(c.responses) != 2 or sorted(c.policies) != sorted([policy, reference]):
            continue
        mine = c.policies.index(policy)
        wins.append([c.ranks[mine], c.ranks[1 - mine]])
    return {
        "win_rate/human": em.win_rate_from_ranks(wins) if wins else float("nan"),
        "judged_pairs": len(wins),
    }


def export_pairs(
    path: Path, prompts, s: Scored, ref: Scored, label: str, ref_label: str, seed: int, k: int
) -> int:
    """K=2 sample records (policy vs reference, sides shuffled) for blind human judging in the feedback app."""
    rng = random.Random(seed)
    rows = []
    for i, (pid, prompt) in enumerate((pid, p) for pid, p in prompts for _ in range(k)):
        pair = [
            Response(s.texts[i], s.ids[i], None, s.finished[i], label),
            Response(ref.texts[i], ref.ids[i], None, ref.finished[i], ref_label),
        ]
        rng.shuffle(pair)
        rows.append(SampleRecord(f"{pid}-{i % k}", prompt, pair, {"pair": f"{label} vs {ref_label}"}))
    return write_jsonl(path, rows)


# ---------------------------------------------------------------------------------------------------------------
# The stage


def run(config: EvalConfig) -> dict[str, Any]:
    from rlhf.data.template import encode_prompt
    from rlhf.modeling import load_causal_lm, load_policy

    out = start_run(config, config.stage)
    prompts = read_prompts(config.prompts, config.num_prompts)
    ref_model, tokenizer = load_policy(config.reference)
    ref_model.eval()
    rm = None
    if config.reward_model:
        from rlhf.reward_model import RewardModel

        rm = RewardModel.load(config.reward_model).eval()
    texts = [p for _, p in prompts]
    prompt_ids = [encode_prompt(tokenizer, p) for p in texts]
    k = config.samples_per_prompt
    ref_label = policy_label(config.reference)
    folders = [Path(p) for p in config.policies]
    snapshots: set[Path] = set()
    for stage in config.snapshots:
        for folder in snapshot_folders(stage):
            if folder.resolve() not in {f.resolve() for f in folders}:
                folders.append(folder)
                snapshots.add(folder)
    labels = unique_labels(folders, taken=(ref_label,))
    # a snapshot's label is its stage's label + @step
    snapshot_of = {lab: lab.split("@")[0] for f, lab in zip(folders, labels) if f in snapshots}
    bar = progress(len(folders) + 1, "eval", unit="policy")

    # 1. The reference: one pool of n_max samples per prompt serves best-of-n; its first k are the SFT row.
    # best-of-n picks by proxy score: without a reward model the pool is just the k SFT samples
    n_max = max(config.best_of_n + [k]) if rm is not None else k
    pool = score_policy(ref_model, ref_model, tokenizer, rm, texts, prompt_ids, config, n_max)
    ref = _subset(pool, n_max, k)
    bar.update(1)
    results: dict[str, dict] = {
        ref_label: {
            "path": str(config.reference),
            "role": "reference",
            "method": policy_method(ref_label),
            **summarise(ref, ref, config),
        }
    }
    scored = {ref_label: ref}
    # 2. Every policy and snapshot, on the same prompts and the same sampling seed.
    for folder, label in zip(folders, labels):
        policy = load_causal_lm(folder).eval()
        s = score_policy(policy, ref_model, tokenizer, rm, texts, prompt_ids, config, k)
        scored[label] = s
        row = {
            "path": str(folder),
            "role": "snapshot" if label in snapshot_of else "policy",
            "method": policy_method(label),
            **summarise(s, ref, config),
        }
        if label in snapshot_of:
            row["snapshot_of"] = snapshot_of[label]
            row["step"] = int(label.split("@")[1]) if "@" in label else None
        if config.judgements:
            row.update(human_win_rate(config.judgements, label, ref_label))
        results[label] = row
        if label not in snapshot_of:
            safe = label.replace("/", "_")
            export_pairs(out / f"pairs-{safe}.jsonl", prompts, s, ref, label, ref_label, config.seed, k)
        log.info(
            "%s: gold %.3f proxy %.3f KL %.2f win %.2f distinct-2 %.3f",
            label,
            row["gold/score"],
            row["proxy/score"],
            row["kl/mean"],
            row["win_rate/gold"],
            row["diversity/distinct_2"],
        )
        del policy
        bar.update(1)
    bar.close()
    bon = best_of_n(pool, n_max, config.best_of_n) if rm is not None and config.best_of_n else []
    if rm is None and config.best_of_n:
        log.info("no reward_model: best-of-n skipped (it picks by proxy score)")

    # 3. Files: everything the report needs, none of it recomputed there.
    rows = []
    for label, s in scored.items():
        for i in range(len(s.texts)):
            pid, prompt = prompts[i // k]
            rows.append(
                {
                    "policy": label,
                    "prompt_id": pid,
                    "prompt": prompt,
                    "sample": i % k,
                    "text": s.texts[i],
                    "gold": s.gold[i],
                    "proxy": s.proxy[i],
                    "kl": s.kl[i],
                    "finished": s.finished[i],
                }
            )
    write_jsonl(out / "samples.jsonl", rows)
    summary = {
        "reference": ref_label,
        "reward_model": config.reward_model,
        "rm_accuracy": reward_accuracy(config.reward_model),
        "prompts": len(prompts),
        "samples_per_prompt": k,
        "policies": results,
        "best_of_n": bon,
    }
    (out / "metrics.json").write_text(json.dumps(summary, indent=2, allow_nan=True) + "\n", encoding="utf-8")
    (out / "best_of_n.json").write_text(json.dumps(bon, indent=2) + "\n", encoding="utf-8")
    logger = MetricsLogger(out, tensorboard=False)
    for step, (label, row) in enumerate(results.items()):
        logger.log(
            step, {"policy": label, **{f"eval/{k_}": v for k_, v in row.items() if isinstance(v, float)}}
        )
    logger.close()
    return {"out": str(out), "metrics": str(out / "metrics.json"), **summary}


def main(argv: list[str]) -> int:
    config = parse_stage_args(
        EvalConfig,
        argv,
        "rlhf eval",
        "Evaluate policy checkpoints against the SFT reference: proxy and gold score, KL, win rate, length, "
        "diversity, best-of-n, over-optimisation.",
    )
    if config is None:
        return 0
    summary = run(config)
    # one line per policy, side by side: e.g. `rlhf eval runs/x/round-2/ppo/model runs/x/round-2/dpo/model ...`
    print(f"{'policy':<24} {'method':<6} gold    proxy   KL     win   distinct-2 self-BLEU entropy")  # noqa: T201
    for label, row in summary["policies"].items():
        print(  # noqa: T201
            f"{label:<24} {row.get('method', ''):<6} {row['gold/score']:+.3f}  {row['proxy/score']:+.3f}  "
            f"{row['kl/mean']:5.2f}  {row['win_rate/gold']:.2f}  {row['diversity/distinct_2']:.3f}      "
            f"{row['diversity/self_bleu']:.3f}     {row['diversity/entropy']:.2f}"
        )
    for row in summary["best_of_n"]:
        bon = f"best-of-{row['n']:<3} KL {row['kl']:.2f}  gold {row['gold/score']:+.3f}"
        print(f"{bon}  proxy {row['proxy/score']:+.3f}")  # noqa: T201
    print(f"wrote {summary['metrics']}")  # noqa: T201
    return 0
