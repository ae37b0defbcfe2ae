"""Reward-model training: rlhf's K-way ranking trainer vs TRL 1.12's RewardTrainer, side by side.

Same backbone (benchmarks.common.peer_gpt2_config: GPT-2 4 layers d=256, vocab 8192, same initial weights), same
token ids (our template: 32-ish-token prompt + 48-token response), same number of pair-updates, same learning rate.

- Synthetic rankings: K responses (40-word story windows from the shipped corpus with 0-4 random words of the
  sentiment lexicons inserted) per prompt, ranked by the `sentiment` gold labeller (Plackett-Luce, temperature 0.1,
  seeded). Modes: plain pairs (K=2), K=4 and K=9. TRL sees every
  ranking expanded into its C(K,2) pairs (batch 8 pairs); we forward each response once per ranking (batch of
  `rankings` per step, bf16 autocast). pairs/s = pairs trained / wall seconds of the training loop after its first
  step. Held-out accuracy: both models on the same 256 held-out pairs labelled by the same labeller.
- HH-RLHF harmless-base (not with --quick): the 2,312-pair test file, the first 2,000 pairs for training and the
  last 312 held out (pairs with an empty reply or mismatched prompts are dropped, as the importer does), on a
  backbone pre-trained here on the corpus (--pretrain-steps of 16 x 256 tokens); one epoch for both. Sequences are cut to 256 tokens
  (prompt cut from the left, response to at most 128 tokens), identically for both trainers.

TRL runs with its own defaults (bf16 on, gradient checkpointing on, as PERF-NOTES measured it); the table also shows
TRL with gradient checkpointing off.

    .venv/bin/python benchmarks/reward.py --quick      # about a minute
    .venv/bin/python benchmarks/reward.py              # + longer runs and HH-RLHF (~10 minutes)
    .venv/bin/python benchmarks/reward.py --quick --threads 1 --cpu-time   # on a busy shared machine: rates
        per CPU-second of each (single-threaded) trainer, so other processes' load does not skew the ratio
"""

from __future__ import annotations

import copy
import itertools
import logging
import math
import random
import tempfile
import time
import warnings

import torch

from common import CORPUS, SHARED, parse_args, peer_gpt2_config, peer_tokenizer, result, table
from rlhf.data.comparisons import import_hh_rlhf
from rlhf.data.template import encode_prompt, encode_response
from rlhf.labellers import NEGATIVE, POSITIVE, GoldLabeller, gold_score
from rlhf.losses import ranking_loss
from rlhf.modeling import autocast
from rlhf.reward_model import RewardModel
from rlhf.stages.reward_data import Ranking, batch_scores, set_attention

LR = 1e-4
LEXICON = sorted(POSITIVE | NEGATIVE)
CLOCK = (
    time.perf_counter
)  # --cpu-time: time.process_time, the process's own CPU seconds (robust on a busy host)
HH = SHARED / "preference" / "hh-rlhf" / "harmless-base" / "test.jsonl.gz"


# ---------------------------------------------------------------------------------------------------------------
# Data


def story_rankings(tok, n: int, k: int, seed: int, prompt_tokens: int = 32, response_tokens: int = 48):
    """n rankings of k corpus windows, ranked by the noisy sentiment labeller; token ids through our template."""
    words = CORPUS.read_text(encoding="utf-8").split()
    rng = random.Random(seed)
    labeller = GoldLabeller(gold_score, temperature=0.1, seed=seed, name="sentiment")
    out = []
    for _ in range(n):
        start = rng.randrange(len(words) - 40)
        prompt_ids = encode_prompt(tok, "Continue the story: " + " ".join(words[start : start + 20]))[
            :prompt_tokens
        ]
        texts, seqs = [], []
        for _ in range(k):
            at = rng.randrange(len(words) - 60)
            window = words[at : at + 40]
            for _ in range(rng.randint(0, 4)):  # plant a few lexicon words so the preference is learnable
                window.insert(rng.randrange(len(window) + 1), rng.choice(LEXICON))
            ids = encode_response(tok, " ".join(window), add_eos=False)[: response_tokens - 1]
            ids.append(tok.eos_token_id)
            texts.append(tok.decode(ids, skip_special_tokens=True))
            seqs.append(prompt_ids + ids)
        out.append(Ranking(seqs, labeller.rank("", texts), ["sft"] * k))
    return out


def expand_pairs(rankings: list[Ranking]) -> list[tuple[list[int], list[int]]]:
    """(chosen ids, rejected ids) for every pair of every ranking: what TRL trains on."""
    return [
        (r.sequences[i], r.sequences[j])
        for r in rankings
        for i, j in itertools.permutations(range(len(r.ranks)), 2)
        if r.ranks[i] < r.ranks[j]
    ]


def hh_rankings(tok, max_len: int = 256, max_response: int = 128) -> tuple[list[Ranking], list[Ranking]]:
    records, counts = import_hh_rlhf(HH)
    lines = [c.meta["line"] for c in records]
    out = []
    for c in records:
        prompt = encode_prompt(tok, c.prompt)
        seqs = []
        for text in c.responses:
            resp = encode_response(tok, text)[:max_response]
            seqs.append(prompt[-(max_len - len(resp)) :] + resp)
        out.append(Ranking(seqs, [1, 2], ["", ""]))
    train = [r for r, line in zip(out, lines) if line <= 2000]
    val = [r for r, line in zip(out, lines) if line > 2000]
    print(
        f"HH-RLHF: {counts}; train {len(train)} pairs (of lines 1-2000), held out {len(val)} (lines 2001-2312)"
    )
    return train, val


# ---------------------------------------------------------------------------------------------------------------
# Models


def fresh_rm(tok, base_state: dict) -> RewardModel:
    from transformers import GPT2ForSequenceClassification

    model = GPT2ForSequenceClassification(peer_gpt2_config(tok))
    model.load_state_dict(base_state)
    return RewardModel(model, tok)


def base_state(tok, seed: int, trunk: dict | None = None) -> dict:
    """Initial weights shared by both trainers: a random (or given) trunk and a small random head."""
    from transformers import GPT2ForSequenceClassification

    torch.manual_seed(seed)
    model = GPT2ForSequenceClassification(peer_gpt2_config(tok))
    if trunk is not None:
        model.transformer.load_state_dict(trunk)
    d = model.config.n_embd
    with torch.no_grad():
        model.score.weight.normal_(0.0, 1.0 / math.sqrt(d + 1))
    return copy.deepcopy(model.state_dict())


def pretrain_trunk(tok, steps: int, seed: int) -> dict:
    """A quick language-model pre-training of the peer backbone on the corpus (same for both trainers)."""
    from transformers import GPT2LMHeadModel

    torch.manual_seed(seed)
    model = GPT2LMHeadModel(peer_gpt2_config(tok))
    ids = torch.tensor(tok(CORPUS.read_text(encoding="utf-8")[:1_500_000])["input_ids"])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        at = torch.randint(0, len(ids) - 257, (16,), generator=gen)
        batch = torch.stack([ids[a : a + 256] for a in at.tolist()])
        with autocast(True):
            loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    print(f"pre-trained the backbone: {steps} steps of 16 x 256 tokens, final LM loss {loss.item():.2f}")
    return copy.deepcopy(model.transformer.state_dict())


@torch.no_grad()
def accuracy(rm: RewardModel, pairs: list[tuple[list[int], list[int]]]) -> float:
    rm.model.eval()
    right = 0.0
    for start in range(0, len(pairs), 16):
        chunk = pairs[start : start + 16]
        scores = rm.raw_scores(*rm.pad([c for c, _ in chunk] + [r for _, r in chunk]))
        diff = scores[: len(chunk)] - scores[len(chunk) :]
        right += ((diff > 0).float() + 0.5 * (diff == 0).float()).sum().item()
    return right / len(pairs)


# ---------------------------------------------------------------------------------------------------------------
# Trainers


def train_ours(rm: RewardModel, rankings: list[Ranking], per_step: int, epochs: int = 1) -> tuple[float, int]:
    """The `rlhf reward` step (stages.reward.batch_scores + losses.ranking_loss), bf16: (pairs/s, pairs)."""
    set_attention(rm, "auto", "cpu")  # as `rlhf reward` does on CPU
    opt = torch.optim.AdamW(rm.model.parameters(), lr=LR, weight_decay=0.0, fused=True)  # as TRL's default
    rm.model.train()
    batches = [rankings[i : i + per_step] for i in range(0, len(rankings), per_step)] * epochs
    pairs, started = 0, None
    for n, batch in enumerate(batches):
        scores, ranks = batch_scores(rm, batch, bf16=True)
        loss, stats = ranking_loss(scores, ranks)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(rm.model.parameters(), 1.0)
        opt.step()
        if n == 0:
            started = CLOCK()  # the first step (warm-up, allocation) is not timed
        else:
            pairs += int(stats["pairs"])
    seconds = CLOCK() - started
    return pairs / seconds, pairs


def train_trl(rm: RewardModel, pairs: list[tuple[list[int], list[int]]], checkpointing: bool = True):
    """TRL's RewardTrainer on the same ids, 8 pairs per step, its defaults otherwise: (pairs/s, pairs)."""
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import RewardConfig, RewardTrainer

    class Clock(TrainerCallback):
        started = None

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 1:
                Clock.started = CLOCK()

    data = Dataset.from_dict({"chosen_ids": [c for c, _ in pairs], "rejected_ids": [r for _, r in pairs]})
    with tempfile.TemporaryDirectory() as out:
        args = RewardConfig(
            output_dir=out,
            per_device_train_batch_size=8,
            num_train_epochs=1,
            learning_rate=LR,
            lr_scheduler_type="constant",
            warmup_steps=0,
            weight_decay=0.0,
            save_strategy="no",
            report_to=[],
            logging_steps=10,
            use_cpu=True,
            dataloader_num_workers=0,
            gradient_checkpointing=checkpointing,
            disable_tqdm=True,
            seed=0,
        )
        trainer = RewardTrainer(
            model=rm.model, args=args, train_dataset=data, processing_class=rm.tokenizer, callbacks=[Clock()]
        )
        trainer.train()
        seconds = CLOCK() - Clock.started
    trained = len(pairs) - 8  # the first step is not timed
    return trained / seconds, trained


# ---------------------------------------------------------------------------------------------------------------


def main() -> None:
    args = parse_args(
        __doc__.splitlines()[0],
        lambda p: (
            p.add_argument("--hh-only", action="store_true", help="only the HH-RLHF comparison"),
            p.add_argument("--pretrain-steps", type=int, default=400, help="LM steps (16 x 256) before HH"),
            p.add_argument(
                "--pairs", type=int, default=0, help="pair-updates per mode (default 160 quick, 1440)"
            ),
            p.add_argument(
                "--cpu-time",
                action="store_true",
                help="time by process CPU seconds, not wall seconds (use with --threads 1 on a shared machine)",
            ),
        ),
    )
    global CLOCK
    if args.cpu_time:
        CLOCK = time.process_time
    warnings.filterwarnings("ignore")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    tok = peer_tokenizer()
    budget = args.pairs or (160 if args.quick else 1440)  # pair-updates per mode
    held_out = expand_pairs(story_rankings(tok, 256, 2, seed=99))
    init = base_state(tok, seed=0)
    quick = args.quick and not args.hh_only
    rows, results = [], []
    for k, per_step in () if args.hh_only else ((2, 8), (4, 2), (9, 1)):
        per_ranking = k * (k - 1) // 2
        rankings = story_rankings(tok, budget // per_ranking + per_step, k, seed=k)
        pairs = expand_pairs(rankings)[: budget + 8]
        ours = fresh_rm(tok, init)
        ours_rate, ours_pairs = train_ours(ours, rankings, per_step)
        ours_acc = accuracy(ours, held_out)
        trl = fresh_rm(tok, init)
        trl_rate, trl_pairs = train_trl(trl, pairs)
        trl_acc = accuracy(trl, held_out)
        row = [f"K={k}", per_step, ours_pairs, ours_rate, ours_acc, trl_pairs, trl_rate, trl_acc]
        if not args.quick:
            plain = fresh_rm(tok, init)
            row.append(train_trl(plain, pairs, checkpointing=False)[0])
        rows.append(row)
        name = "pairs" if k == 2 else f"k{k}"
        results.append((f"reward_pairs_per_s_{name}", ours_rate, trl_rate, "pairs/s"))
        results.append((f"reward_heldout_acc_{name}", ours_acc, trl_acc, "accuracy"))
        print(table([row], HEADER + (["TRL no-ckpt pairs/s"] if not args.quick else [])), flush=True)
    hh = None
    if not quick and HH.exists():
        train, val = hh_rankings(tok)
        trunk = pretrain_trunk(tok, steps=args.pretrain_steps, seed=0)
        init_hh = base_state(tok, seed=0, trunk=trunk)
        val_pairs = expand_pairs(val)
        ours = fresh_rm(tok, init_hh)
        before = accuracy(ours, val_pairs)
        ours_rate, _ = train_ours(ours, train, 8)
        trl = fresh_rm(tok, init_hh)
        trl_rate, _ = train_trl(trl, expand_pairs(train))
        hh = (before, accuracy(ours, val_pairs), accuracy(trl, val_pairs), ours_rate, trl_rate)
        print(f"HH-RLHF harmless-base held-out accuracy: before training {before:.3f}", flush=True)
    print()
    if rows:
        print(table(rows, HEADER + (["TRL no-ckpt pairs/s"] if not args.quick else [])))
    if hh:
        print(
            f"HH-RLHF harmless-base (2,000 train / {len(val)} held-out pairs, 1 epoch, same pre-trained backbone): "
            f"ours {hh[1]:.3f} ({hh[3]:.1f} pairs/s), TRL {hh[2]:.3f} ({hh[4]:.1f} pairs/s), untrained {hh[0]:.3f}"
        )
    for name, ours_value, peer_value, unit in results:
        result(name, ours_value, peer_value, unit)
    if hh:
        result("reward_hh_heldout_acc", hh[1], hh[2], "accuracy")


HEADER = [
    "mode",
    "rankings/step",
    "ours pairs",
    "ours pairs/s",
    "ours acc",
    "TRL pairs",
    "TRL pairs/s",
    "TRL acc",
]

if __name__ == "__main__":
    main()
