"""PPO iteration speed, ours vs TRL 1.12 `trl.experimental.ppo`, on the PERF-NOTES set-up, side by side.

Same models (GPT-2 4 layers d=256 policy and reference, GPT2ForSequenceClassification reward and value, random
init, vocab 8192), same 16 prompts of about 32 tokens (the template's ids, identical on both sides), 48 new tokens at
temperature 0.7, 1 PPO epoch, 4 minibatches of 4, lr 1e-5, fixed KL coefficient 0.05, gamma 1, lambda 0.95.
Seconds per iteration are medians of the gaps between iterations (the first one, warm-up, excluded): wall-clock
seconds, or with --cpu-time the process's own CPU seconds, all threads summed (robust on a busy shared machine with
--threads 1: the work each side does; with 2 threads on a busy machine TRL's two OpenMP threads spin while waiting
for each other and bill that CPU, so its CPU time balloons, and ours gets no credit for running two models at
once). The runs are interleaved in rounds (TRL fp32, TRL bf16, ours fp32, ours bf16; the order flips every round)
so that a machine whose load drifts affects all alike. Each dtype is compared with the same dtype: TRL's bf16 run is
its Accelerate mixed precision (CPU autocast).

    .venv/bin/python benchmarks/ppo.py [--quick] [--threads 2] [--cpu-time] [--rounds N] [--learn-run runs/demo]

`--learn-run RUN` adds reward against KL at equal iterations on a finished loop run's trained models (`learning`).
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from common import CORPUS, parse_args, peer_gpt2_config, peer_tokenizer, result, table
from rlhf.config import cpu_bf16_is_fast

BATCH, NEW_TOKENS, TEMPERATURE, PROMPT_TOKENS = 16, 48, 0.7, 32
CLOCK = time.perf_counter  # --cpu-time: time.process_time


def build_models(tok, folder: Path) -> None:
    """Random-init policy (causal LM) and reward model (sequence classification) saved as local HF folders."""
    from transformers import GPT2ForSequenceClassification, GPT2LMHeadModel

    config = peer_gpt2_config(tok)
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(folder / "policy")
    GPT2ForSequenceClassification(config).save_pretrained(folder / "reward")
    for sub in ("policy", "reward"):
        tok.save_pretrained(folder / sub)


def make_prompts(tok, n: int) -> tuple[list[str], list[list[int]]]:
    """Corpus lines cut so the templated prompt is at most PROMPT_TOKENS ids; the longest are kept."""
    from rlhf.data.template import encode_prompt

    texts, ids = [], []
    for line in CORPUS.read_text(encoding="utf-8").splitlines():
        words = line.replace('"', "").split()
        while words and len(encode_prompt(tok, " ".join(words))) > PROMPT_TOKENS:
            words = words[:-1]
        if len(words) >= 8:
            texts.append(" ".join(words))
            ids.append(encode_prompt(tok, texts[-1]))
        if len(texts) == n:
            break
    return texts, ids


def run_ours(
    folder: Path,
    prompts: list[str],
    iterations: int,
    bf16: bool,
    tag: str = "",
    lr: float = 1e-5,
    seed: int = 0,
) -> dict:
    import json
    import types

    import rlhf.stages.ppo as stage
    import rlhf.tracking as tracking
    from rlhf.config import load_config
    from rlhf.stages.ppo import PPOConfig, run
    from rlhf.tracking import MetricsLogger, read_metrics

    stamps = []

    class StampedLogger(MetricsLogger):  # the clock reading at each iteration's metrics row
        def log(self, step, metrics):
            stamps.append(CLOCK())
            super().log(step, metrics)

    # the stage's own time split (and perf/rollout_tok_s) read CLOCK too; its logger comes from rlhf.tracking
    stage.time, tracking.MetricsLogger = types.SimpleNamespace(perf_counter=CLOCK), StampedLogger

    prompt_file = folder / "prompts.jsonl"
    prompt_file.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts), encoding="utf-8")
    name = f"ours-{'bf16' if bf16 else 'fp32'}{tag}"
    config = load_config(
        PPOConfig,
        None,
        [
            f"model.path={folder / 'policy'}",
            f"reward_model={folder / 'reward'}",
            f"prompts={prompt_file}",
            f"runs_dir={folder / 'runs'}",
            f"name={name}",
            f"seed={seed}",
            f"iterations={iterations}",
            f"batch_size={BATCH}",
            f"max_new_tokens={NEW_TOKENS}",
            f"temperature={TEMPERATURE}",
            "epochs=1",
            "minibatches=4",
            f"lr={lr}",
            f"value_lr={lr}",
            "kl.mode=fixed",
            "kl.coef=0.05",
            "missing_eos=none",
            f"max_prompt_tokens={PROMPT_TOKENS}",
            f"save_every={iterations}",
            "log_samples=0",
            "lr_schedule=linear",  # as TRL (its default linear decay over the run)
            f"bf16={str(bf16).lower()}",
            f"threads={torch.get_num_threads()}",  # the same threads as TRL's side
        ],
    )
    try:
        run(config)
    finally:
        stage.time, tracking.MetricsLogger = time, MetricsLogger
    rows = read_metrics(folder / "runs" / name / "ppo")
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    if len(gaps) != iterations - 1:
        raise RuntimeError(f"expected {iterations} timed metrics rows, got {len(stamps)}")
    tokens = statistics.mean(r["perf/rollout_tok_s"] * r["time/iteration"] for r in rows)
    split = {
        k: statistics.median(r[f"time/{k}"] for r in rows[1:]) for k in ("generation", "scoring", "training")
    }
    splits = {k: [r[f"time/{k}"] for r in rows[1:]] for k in ("generation", "scoring", "training")}
    return {"gaps": gaps, "tokens": tokens, "split": split, "splits": splits, "last": rows[-1], "rows": rows}


def run_trl(
    folder: Path,
    prompt_ids: list[list[int]],
    tok,
    iterations: int,
    tag: str = "",
    bf16: bool = False,
    lr: float = 1e-5,
    seed: int = 0,
) -> dict:
    import logging

    import trl.experimental.ppo.ppo_trainer as trl_ppo
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, TrainerCallback
    from transformers.utils import logging as hf_logging
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    hf_logging.set_verbosity_error()
    logging.getLogger("accelerate").setLevel(logging.ERROR)
    tok.padding_side = "left"
    width = max(len(p) for p in prompt_ids)
    padded = [[tok.pad_token_id] * (width - len(p)) + p for p in prompt_ids]
    dataset = Dataset.from_dict({"input_ids": padded})
    policy = AutoModelForCausalLM.from_pretrained(folder / "policy")
    ref = AutoModelForCausalLM.from_pretrained(folder / "policy")
    reward = AutoModelForSequenceClassification.from_pretrained(folder / "reward", num_labels=1)
    value = AutoModelForSequenceClassification.from_pretrained(folder / "reward", num_labels=1)
    args = PPOConfig(
        output_dir=str(folder / f"trl{tag}"),
        per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=1,
        num_mini_batches=4,
        num_ppo_epochs=1,
        total_episodes=BATCH * iterations,
        local_rollout_forward_batch_size=BATCH,
        response_length=NEW_TOKENS,
        temperature=TEMPERATURE,
        learning_rate=lr,
        kl_coef=0.05,
        stop_token="eos",
        missing_eos_penalty=None,
        num_sample_generations=0,
        report_to=[],
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
        seed=seed,
        use_cpu=True,
        bf16=bf16,  # Accelerate's mixed precision: CPU autocast to bfloat16
    )
    rows, stamps, gen_time = [], [], []
    original = trl_ppo.batch_generation

    def timed_generation(*a, **kw):
        start = CLOCK()
        out = original(*a, **kw)
        gen_time.append(CLOCK() - start)
        return out

    class Clock(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            stamps.append(CLOCK())
            rows.append(dict(logs or {}))

    trl_ppo.batch_generation = timed_generation
    try:
        trainer = PPOTrainer(
            args=args,
            processing_class=tok,
            model=policy,
            ref_model=ref,
            reward_model=reward,
            value_model=value,
            train_dataset=dataset,
            eval_dataset=dataset,
            callbacks=[Clock()],
        )
        trainer.train()
    finally:
        trl_ppo.batch_generation = original
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    rows = [r for r in rows if "objective/scores" in r]  # the end-of-training summary row has none
    return {
        "gaps": gaps,
        "tokens": BATCH * NEW_TOKENS,
        "generations": gen_time[1:],
        "last": rows[-1],
        "rows": rows,
    }


# the learning comparison's lr: 10x the speed runs', so that 40 iterations move a trained policy
LEARN_LR = 1e-4


def learning_models(run: Path, folder: Path) -> list[str]:
    """Copy a trained loop run's SFT policy and newest reward model into `folder` as policy/ and reward/ (the reward
    model without its normalisation file, so both sides score with the same raw head); returns the run's prompts.
    Random-init models cannot show learning: a random reward model's score of random text is noise to climb (its
    head scaled to a spread of about 1, the gains ranged -1.7..+2.6 by seed on both sides at KL 8-9)."""
    import json
    import shutil

    rewards = sorted(run.glob("round-*/reward/model"))
    if not (run / "sft" / "model").is_dir() or not rewards:
        raise SystemExit(
            f"--learn-run {run}: needs sft/model and round-*/reward/model (a finished rlhf loop run)"
        )
    shutil.copytree(run / "sft" / "model", folder / "policy")
    shutil.copytree(rewards[-1], folder / "reward", ignore=shutil.ignore_patterns("rlhf_reward.json"))
    lines = (run / "data" / "prompts.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["prompt"] for line in lines]


def learning(run: Path, iterations: int, seeds: int) -> None:
    """Reward against KL at equal iterations, fp32: both sides train the same trained SFT policy against the same
    trained reward model (learning_models) on the same 16 prompts, with the speed runs' settings but lr LEARN_LR,
    `seeds` seeds each. Gain = mean score of the last 3 iterations - that of the first 3; KL = mean KL of the last
    3. Gao et al. (2022) found the score to grow about linearly in sqrt(KL), so gain / sqrt(KL) compares runs that
    ended at different KLs."""
    from transformers import AutoTokenizer

    from rlhf.data.template import encode_prompt

    def summary(rows: list[dict], key: str) -> list[float]:
        score = [float(r[key]) for r in rows]
        gain = statistics.mean(score[-3:]) - statistics.mean(score[:3])
        kl = statistics.mean(float(r["objective/kl"]) for r in rows[-3:])
        return [gain, kl, gain / max(kl, 1e-9) ** 0.5]

    per_seed: dict[str, list[list[float]]] = {"ours fp32": [], "TRL 1.12 fp32": []}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        prompts = learning_models(run, folder)
        tok = AutoTokenizer.from_pretrained(folder / "policy")
        fitting = [(p, ids) for p in prompts if len(ids := encode_prompt(tok, p)) <= PROMPT_TOKENS][:BATCH]
        if len(fitting) < BATCH:
            raise SystemExit(
                f"--learn-run {run}: fewer than {BATCH} prompts of at most {PROMPT_TOKENS} tokens"
            )
        prompts, prompt_ids = [p for p, _ in fitting], [ids for _, ids in fitting]
        for seed in range(seeds):
            tag = f"-learn-{seed}"
            ours = run_ours(folder, prompts, iterations, False, tag=tag, lr=LEARN_LR, seed=seed)["rows"]
            peer = run_trl(folder, prompt_ids, tok, iterations, tag, lr=LEARN_LR, seed=seed)["rows"]
            per_seed["ours fp32"].append(summary(ours, "objective/score"))
            per_seed["TRL 1.12 fp32"].append(summary(peer, "objective/scores"))
    print(
        f"learning on {run}: {iterations} iterations, lr {LEARN_LR}, same models and prompts, {seeds} seeds"
    )
    header = ["run", "gain by seed", "KL by seed", "mean gain", "mean KL", "mean gain / sqrt(KL)"]
    rows, means = [], {}
    for name, runs in per_seed.items():
        gain, kl = statistics.mean(r[0] for r in runs), statistics.mean(r[1] for r in runs)
        means[name] = statistics.mean(r[2] for r in runs)
        gains = " ".join(f"{r[0]:+.2f}" for r in runs)
        kls = " ".join(f"{r[1]:.2f}" for r in runs)
        rows.append([name, gains, kls, gain, kl, means[name]])
    print(table(rows, header))
    result("ppo_score_gain_per_sqrt_kl", means["ours fp32"], means["TRL 1.12 fp32"], "score/sqrt(nat)")


def pooled(runs: list[dict]) -> dict:
    """One side's rounds pooled: medians over every timed iteration of every round; the last round's end state."""
    out = {"s_it": statistics.median(g for r in runs for g in r["gaps"]), "tokens": runs[-1]["tokens"]}
    out["last"] = runs[-1]["last"]
    if "splits" in runs[0]:
        out["split"] = {
            k: statistics.median(t for r in runs for t in r["splits"][k])
            for k in ("generation", "scoring", "training")
        }
    else:
        out["generation"] = statistics.median(t for r in runs for t in r["generations"])
    return out


def main() -> None:
    global CLOCK
    args = parse_args(
        __doc__.split("\n\n")[0],
        lambda p: (
            p.add_argument(
                "--cpu-time", action="store_true", help="time by process CPU seconds (busy machine)"
            ),
            p.add_argument(
                "--rounds", type=int, default=0, help="interleaved rounds (default 2 quick, 3 full)"
            ),
            p.add_argument(
                "--learn-run",
                type=Path,
                default=None,
                help="a finished `rlhf loop` run (e.g. runs/demo): also compare reward against KL at equal "
                "iterations, both sides training its SFT model against its reward model",
            ),
            p.add_argument("--learn-iterations", type=int, default=40, help="iterations of that comparison"),
            p.add_argument("--learn-seeds", type=int, default=3, help="seeds of that comparison"),
        ),
    )
    if args.cpu_time:
        CLOCK = time.process_time
    print(f"threads {torch.get_num_threads()}, clock: {'process CPU' if args.cpu_time else 'wall'} seconds")
    iterations = 3 if args.quick else 5  # per run; the first gap of each run is warm-up
    rounds = args.rounds or (2 if args.quick else 3)
    tok = peer_tokenizer()
    prompts, prompt_ids = make_prompts(tok, BATCH)
    print(
        f"prompts: {len(prompts)} x {statistics.mean(map(len, prompt_ids)):.1f} tokens (max {PROMPT_TOKENS})"
    )
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        build_models(tok, folder)
        runs: dict[str, list[dict]] = {"trl": [], "trl_bf16": [], "fp32": [], "bf16": []}
        # Without AVX512-BF16/AMX both sides' bf16 would be emulated (30x slower) and ours would fall back to
        # fp32: no like-for-like bf16 comparison exists there, so only fp32 runs.
        with_bf16 = cpu_bf16_is_fast()
        if not with_bf16:
            print("this CPU has no AVX512-BF16/AMX: fp32 only (RLHF_CPU_BF16=1 forces the bf16 runs)")
        for r in range(rounds):
            order = ["trl", "trl_bf16", "fp32", "bf16"] if with_bf16 else ["trl", "fp32"]
            for side in order if r % 2 == 0 else order[::-1]:
                bf16_side = side.endswith("bf16")
                if side.startswith("trl"):
                    runs[side].append(run_trl(folder, prompt_ids, tok, iterations, f"-{side}-{r}", bf16_side))
                else:
                    runs[side].append(run_ours(folder, prompts, iterations, bf16_side, tag=f"-{r}"))
        trl, fp32 = pooled(runs["trl"]), pooled(runs["fp32"])
        trl_bf16, bf16 = (pooled(runs[k]) if with_bf16 else None for k in ("trl_bf16", "bf16"))
    print(
        f"{rounds} interleaved rounds x {iterations} iterations per run (medians of {rounds * (iterations - 1)})"
    )
    rows = []
    for name, r in (("ours fp32", fp32), ("ours bf16", bf16)):
        if r is None:
            continue
        s = r["split"]
        rows.append(
            [
                name,
                r["s_it"],
                r["tokens"] / r["s_it"],
                s["generation"],
                s["scoring"],
                s["training"],
                r["last"]["objective/score"],
                r["last"]["objective/kl"],
            ]
        )
    for name, r in (("TRL 1.12 fp32", trl), ("TRL 1.12 bf16", trl_bf16)):
        if r is None:
            continue
        t = r["last"]
        rows.append(
            [
                name,
                r["s_it"],
                r["tokens"] / r["s_it"],
                r["generation"],
                "-",
                "-",
                t.get("objective/scores", float("nan")),
                t.get("objective/kl", float("nan")),
            ]
        )
    header = [
        "run",
        "s/iteration",
        "rollout tok/s",
        "generation s",
        "scoring s",
        "training s",
        f"score@{iterations}",
        f"kl@{iterations}",
    ]
    print(table(rows, header))
    print(
        "(TRL's scoring and training are not split out; its generation time is timed around batch_generation.)"
    )
    result("ppo_seconds_per_iteration", fp32["s_it"], trl["s_it"], "s", higher_is_better=False)
    if bf16 is not None and trl_bf16 is not None:
        # bf16 against TRL's bf16 run (its Accelerate mixed precision: CPU autocast), like for like
        result(
            "ppo_rollout_tok_s_bf16",
            bf16["tokens"] / bf16["s_it"],
            trl_bf16["tokens"] / trl_bf16["s_it"],
            "tok/s",
        )
    result("ppo_rollout_tok_s", fp32["tokens"] / fp32["s_it"], trl["tokens"] / trl["s_it"], "tok/s")
    if args.learn_run is not None:
        learning(args.learn_run, max(args.learn_iterations, 6), args.learn_seeds)


if __name__ == "__main__":
    sys.exit(main())
