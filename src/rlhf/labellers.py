"""Labellers: anything that ranks K responses to a prompt (1 = best), behind one small interface shared with humans.

- `GoldLabeller(score_fn, temperature, seed)`: a simulated, imperfect human (the gold/proxy set-up of Gao et al.
  2022). It scores each response with a gold function (or a frozen gold reward model) and samples a ranking from
  the Plackett-Luce model with utilities score / temperature: add independent Gumbel(0, 1) noise to each utility and
  sort (the Gumbel-max trick; for K = 2 this is exactly Bradley-Terry, P(a > b) = sigmoid((s_a - s_b) / T)).
  temperature 0 ranks by the gold score alone (equal scores tie).
- `sentiment`: the demo's SYNTHETIC preference, a transparent lexicon rubric (`gold_score`), never passed off as
  human. Words are the lower-cased runs of letters/apostrophes of the response; n is their count.

      P = number of DISTINCT positive words used      (each counts once, however often it appears)
      N = number of DISTINCT negative words used
      R = repeats: for every word that is not a stop word, (its count - 1) summed
      gold_score = 10 * (P - N - R) / max(n, 10)       # per ten words, so length alone earns nothing
      an empty response scores -1.

  Positive words: see `POSITIVE` below (happy, glad, kind, love, smile, laugh, friend, sweet, bright, ...);
  negative words: `NEGATIVE` (sad, cry, angry, fear, dark, wicked, die, ...); stop words: `STOP` (the, a, and, ...).
  A policy that spams "happy happy happy" gets P = 1, R = 2: a negative score, although a proxy reward model
  that only learned "happy is good" may love it. That gap is what makes reward over-optimisation visible.
- `import`: a pass-through for real human comparisons: it answers with the ranks recorded in a comparison file.

`label_samples(samples, labeller)` turns `rlhf sample` records into `Comparison` records; `main` is
`rlhf label synthetic --labeller sentiment --samples samples.jsonl --out comparisons.jsonl`.
"""

from __future__ import annotations

import argparse
import logging
import math
import random
import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from rlhf.data.records import Comparison, SampleRecord, now_iso, ranks_from_scores, read_samples, write_jsonl
from rlhf.errors import UserError

log = logging.getLogger("rlhf")

# fmt: off
POSITIVE = frozenset("""
happy happily happiness glad gladly joy joyful joyous kind kindly kindness love loved loves lovely loving
smile smiled smiles smiling laugh laughed laughs laughing laughter friend friends friendly sweet sweetly
bright brightly good nice gentle gently warm cheerful cheerfully merry delight delighted delightful fun
wonderful beautiful pretty thank thanks grateful hope hopeful brave safe help helped helpful care caring
share shared together hug play played playing sunshine sunny bless blessed peace peaceful calm
""".split())
NEGATIVE = frozenset("""
sad sadly sadness cry cried cries crying tear tears angry anger mad fear feared afraid scared frightened
dark darkness wicked evil die died dies dying dead death kill killed hurt hurts pain cruel bad hate hated
ugly lonely alone poor sick weep wept sorrow sorry miserable terrible awful horrible fight fought wolf
witch monster danger dangerous grief gloomy cold hungry lost
""".split())
STOP = frozenset("""
a an the and or but so of to in on at by for with from as is was were be been are am it its it's he she
they them his her him their i you we me my your our us this that there then than not no yes do did had
have has will would could can said what when who which if into up out all one very
""".split())
# fmt: on

WORD = re.compile(r"[a-z']+")


def gold_score(prompt: str, response: str) -> float:
    """The `sentiment` rubric (see the module docstring). Pure: depends on the response text only."""
    del prompt  # the rubric judges the response alone
    words = [w.strip("'") for w in WORD.findall(response.lower())]
    words = [w for w in words if w]
    if not words:
        return -1.0
    positive = len({w for w in words if w in POSITIVE})
    negative = len({w for w in words if w in NEGATIVE})
    repeats = sum(c - 1 for w, c in Counter(words).items() if w not in STOP)
    return 10.0 * (positive - negative - repeats) / max(len(words), 10)


def gold_agreement(comparisons: list) -> float:
    """How often the labeller's top choice has the top gold score (the simulated human's noise level)."""
    hits, total = 0, 0
    for c in comparisons:
        gold = c.meta.get("gold_scores") if isinstance(c.meta, dict) else None
        if not gold:
            continue
        best = max(gold)
        top = [i for i, rank in enumerate(c.ranks) if rank == 1]
        hits += any(gold[i] == best for i in top)
        total += 1
    return hits / total if total else float("nan")


class Labeller:
    """Ranks K responses to a prompt: `rank(prompt, responses) -> dense ranks`, 1 = best, ties share a rank."""

    name: str = "labeller"
    kind: str = "synthetic"  # the `labeller` field of the comparisons it writes is "<kind>:<name>"

    def rank(self, prompt: str, responses: list[str]) -> list[int]:
        raise NotImplementedError

    def meta(self) -> dict:
        """What to record with each comparison besides the ranks."""
        return {}


class GoldLabeller(Labeller):
    """Gold scores + Plackett-Luce noise with `temperature` (0 = deterministic ranking by score)."""

    def __init__(
        self,
        score_fn: Callable[[str, str], float] | None = None,
        temperature: float = 1.0,
        seed: int = 0,
        name: str = "gold",
        batch_score_fn: Callable[[str, list[str]], list[float]] | None = None,
    ):
        if score_fn is None and batch_score_fn is None:
            raise ValueError("GoldLabeller needs a score function")
        if temperature < 0 or not math.isfinite(temperature):
            raise UserError(f"labeller temperature must be >= 0, got {temperature}")
        self.score_fn = score_fn
        self.batch_score_fn = batch_score_fn
        self.temperature = float(temperature)
        self.seed = seed
        self.name = name
        self.rng = random.Random(seed)
        self.last_scores: list[float] = []

    def scores(self, prompt: str, responses: list[str]) -> list[float]:
        if self.batch_score_fn is not None:
            return [float(s) for s in self.batch_score_fn(prompt, responses)]
        return [float(self.score_fn(prompt, r)) for r in responses]

    def rank(self, prompt: str, responses: list[str]) -> list[int]:
        scores = self.scores(prompt, responses)
        self.last_scores = scores
        if self.temperature == 0:
            return ranks_from_scores(scores)
        # Plackett-Luce sample via Gumbel-max: sort utilities s/T + Gumbel noise, best first.
        perturbed = [s / self.temperature - math.log(-math.log(self._uniform())) for s in scores]
        order = sorted(range(len(scores)), key=lambda i: -perturbed[i])
        ranks = [0] * len(scores)
        for position, i in enumerate(order, 1):
            ranks[i] = position
        return ranks

    def _uniform(self) -> float:
        u = self.rng.random()
        while u <= 0.0:
            u = self.rng.random()
        return u

    def meta(self) -> dict:
        return {"gold_scores": [round(s, 6) for s in self.last_scores], "temperature": self.temperature}

    @classmethod
    def from_reward_model(cls, path: str, temperature: float = 1.0, seed: int = 0) -> GoldLabeller:
        """A frozen gold reward model folder as the scorer (its normalised scores)."""
        from rlhf.reward_model import RewardModel

        model = RewardModel.load(path)

        def batch(prompt: str, responses: list[str]) -> list[float]:
            return model.score_texts([prompt] * len(responses), responses)

        return cls(
            batch_score_fn=batch, temperature=temperature, seed=seed, name=f"gold-rm:{Path(path).name}"
        )


class ImportLabeller(Labeller):
    """Real human rankings read from a comparison file, answered for the same prompt and responses."""

    kind = "import"

    def __init__(self, path: str):
        from rlhf.data.records import read_comparisons

        self.name = Path(path).name
        self.table: dict[tuple[str, tuple[str, ...]], list[int]] = {}
        for record in read_comparisons(path):
            key = (record.prompt, tuple(sorted(record.responses)))
            self.table[key] = [record.ranks[record.responses.index(r)] for r in sorted(record.responses)]

    def rank(self, prompt: str, responses: list[str]) -> list[int]:
        ranked = self.table.get((prompt, tuple(sorted(responses))))
        if ranked is None:
            raise UserError(
                f"no imported ranking for prompt '{prompt[:60]}' with these {len(responses)} responses"
            )
        by_text = dict(zip(sorted(responses), ranked))
        return [by_text[r] for r in responses]


def get_labeller(name: str, temperature: float = 1.0, seed: int = 0, path: str = "") -> Labeller:
    """`sentiment` (the demo rubric), `gold` (a frozen gold RM folder at `path`) or `import` (a comparison file)."""
    if name == "sentiment":
        return GoldLabeller(gold_score, temperature=temperature, seed=seed, name="sentiment")
    if name == "gold":
        if not path:
            raise UserError(
                "labeller 'gold' needs the folder of a frozen gold reward model (--gold-model PATH)"
            )
        return GoldLabeller.from_reward_model(path, temperature=temperature, seed=seed)
    if name == "import":
        if not path:
            raise UserError("labeller 'import' needs a comparison file (--comparisons PATH)")
        return ImportLabeller(path)
    raise UserError(f"unknown labeller '{name}' (choose from sentiment, gold, import)")


def label_samples(samples: list[SampleRecord], labeller: Labeller) -> list[Comparison]:
    """One comparison per sample record with at least two responses; responses' policies and ids are kept."""
    out, skipped = [], 0
    for record in samples:
        texts = [r.text for r in record.responses]
        if len(texts) < 2:
            skipped += 1
            continue
        ranks = labeller.rank(record.prompt, texts)
        ids = [r.token_ids for r in record.responses]
        out.append(
            Comparison(
                prompt=record.prompt,
                responses=texts,
                ranks=ranks,
                prompt_id=record.prompt_id,
                labeller=f"{labeller.kind}:{labeller.name}",
                labelled_at=now_iso(),
                policies=[r.policy for r in record.responses],
                response_token_ids=[list(i) for i in ids] if all(i is not None for i in ids) else None,
                meta=labeller.meta(),
            )
        )
    if skipped:
        log.warning("skipped %d sample record(s) with fewer than 2 responses (nothing to compare)", skipped)
    return out


def main(argv: list[str]) -> int:
    """`rlhf label synthetic --labeller NAME --samples FILE --out FILE [--temperature T] [--seed S]`."""
    if argv and argv[0] == "synthetic":
        argv = argv[1:]
    parser = argparse.ArgumentParser(
        prog="rlhf label synthetic",
        description="Rank sampled responses with a synthetic labeller and write comparison records (JSONL).",
    )
    parser.add_argument("samples_pos", nargs="?", metavar="SAMPLES", help="samples JSONL (same as --samples)")
    parser.add_argument("--samples", default="", help="samples JSONL written by `rlhf sample`")
    parser.add_argument("--out", required=True, help="comparison JSONL to write")
    parser.add_argument(
        "--labeller", default="sentiment", help="sentiment | gold | import (default sentiment)"
    )
    parser.add_argument(
        "--temperature",
        type=float,
        default=0.0,
        help="Plackett-Luce noise on the scores (a simulated, inconsistent annotator); 0 = exact ranking, ties "
        "kept (default). The sentiment rubric's steps are ~0.5: 0.1 flips close calls, 1 is mostly noise",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the labeller's noise")
    parser.add_argument("--gold-model", default="", help="frozen gold reward model folder (labeller gold)")
    parser.add_argument("--comparisons", default="", help="human comparison file (labeller import)")
    args = parser.parse_args(argv)
    samples_path = args.samples or args.samples_pos
    if not samples_path:
        raise UserError("give the samples file: --samples FILE")
    from rlhf.tracking import setup_logging

    setup_logging()
    labeller = get_labeller(
        args.labeller, args.temperature, args.seed, path=args.gold_model or args.comparisons
    )
    comparisons = label_samples(read_samples(samples_path), labeller)
    if not comparisons:
        raise UserError(f"{samples_path}: no record has two or more responses to compare")
    count = write_jsonl(args.out, comparisons)
    tied = sum(1 for c in comparisons if len(set(c.ranks)) == 1)
    log.info("wrote %d comparisons (%d all tied) labelled by %s to %s", count, tied, labeller.name, args.out)
    return 0
