"""Export a batch's submitted feedback as training data, in the formats of docs/formats.md.

- rankings, pairwise choices and ratings (higher over lower) -> `comparisons.jsonl` (`rlhf reward`, `rlhf dpo`);
- corrections -> a demonstration (corrected text) AND a comparison (corrected over original);
- written ideal responses -> `demonstrations.jsonl` (`rlhf sft`);
- critiques and flags ride in each comparison's `meta` and are listed with their item in `critiques.jsonl`;
- every ranked pair again as TRL-style `{"prompt", "chosen", "rejected"}` in `trl_pairs.jsonl`.
Skipped items and unfinished drafts are not exported.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy.orm import Session

from rlhf.data.comparisons import export_trl_pairs
from rlhf.data.records import Comparison, Demonstration, ranking_pairs, ranks_from_scores, write_jsonl
from rlhf.feedback.progress import batch_annotations
from rlhf.feedback.store import Annotation, Batch, Item

FILES = ("comparisons.jsonl", "demonstrations.jsonl", "critiques.jsonl", "trl_pairs.jsonl")


@dataclass
class Export:
    comparisons: list[Comparison] = field(default_factory=list)
    demonstrations: list[Demonstration] = field(default_factory=list)
    critiques: list[dict] = field(default_factory=list)

    def trl_pairs(self) -> list[dict]:
        return [
            {"prompt": c.prompt, "chosen": c.responses[better], "rejected": c.responses[worse]}
            for c in self.comparisons
            for better, worse in ranking_pairs(c.ranks)
        ]


def _comparison(item: Item, ann: Annotation, labeller: str, form: str, indices: list[int], ranks: list[int]):
    texts = [item.responses[i]["text"] for i in indices]
    token_ids = [item.responses[i].get("token_ids") for i in indices]
    fb = ann.feedback
    meta = {
        "form": form,
        "batch_item": item.id,
        **{k: fb[k] for k in ("critique", "flags", "note") if k in fb},
    }
    if form == "rating":
        meta["ratings"] = fb["ratings"]
    return Comparison(
        prompt=item.prompt,
        responses=texts,
        ranks=ranks,
        prompt_id=item.prompt_id,
        labeller=labeller,
        labelled_at=ann.submitted_at.isoformat(timespec="seconds") if ann.submitted_at else "",
        policies=[item.responses[i].get("policy") or "" for i in indices],
        response_token_ids=token_ids if all(t is not None for t in token_ids) else None,
        meta=meta,
    )


def records_of(item: Item, ann: Annotation, annotator: str, rating_scale: int) -> Export:
    """Everything one submitted annotation yields."""
    out, fb, labeller = Export(), ann.feedback, f"annotator:{annotator}"
    k = len(item.responses)
    everyone = list(range(k))
    if "ranks" in fb:
        out.comparisons.append(_comparison(item, ann, labeller, "ranking", everyone, fb["ranks"]))
    if "ratings" in fb:
        ranks = ranks_from_scores([float(r) for r in fb["ratings"]])
        if max(ranks) > 1:  # all equal: no preference to learn from
            record = _comparison(item, ann, labeller, "rating", everyone, ranks)
            record.meta["rating_scale"] = rating_scale
            out.comparisons.append(record)
    if fb.get("pairwise") in ("a", "b"):
        a, b = item.pair
        order = [a, b] if fb["pairwise"] == "a" else [b, a]
        out.comparisons.append(_comparison(item, ann, labeller, "pairwise", order, [1, 2]))
    if "correction" in fb:
        index, text = fb["correction"]["index"], fb["correction"]["text"]
        record = _comparison(item, ann, labeller, "correction", [index, index], [1, 2])
        record.responses[0] = text
        record.policies[0] = labeller
        record.response_token_ids = None  # the corrected text was never sampled
        record.meta["corrected_response"] = index
        out.comparisons.append(record)
        out.demonstrations.append(Demonstration(item.prompt, text, f"{labeller} correction"))
    if "demonstration" in fb:
        out.demonstrations.append(
            Demonstration(item.prompt, fb["demonstration"], f"{labeller} demonstration")
        )
    if "critique" in fb or fb.get("flags"):
        out.critiques.append(
            {
                "prompt_id": item.prompt_id,
                "prompt": item.prompt,
                "responses": [r["text"] for r in item.responses],
                "labeller": labeller,
                "critique": fb.get("critique", ""),
                "flags": fb.get("flags", []),
            }
        )
    return out


def collect(db: Session, batch: Batch) -> Export:
    out = Export()
    for item, ann, annotator in batch_annotations(db, batch, status="submitted"):
        part = records_of(item, ann, annotator, batch.rating_scale)
        out.comparisons += part.comparisons
        out.demonstrations += part.demonstrations
        out.critiques += part.critiques
    return out


def write_export(data: Export, out_dir: str | Path) -> dict[str, int]:
    """Write the four files (each atomically); returns the number of lines per file."""
    out_dir = Path(out_dir)
    return {
        "comparisons.jsonl": write_jsonl(out_dir / "comparisons.jsonl", data.comparisons),
        "demonstrations.jsonl": write_jsonl(out_dir / "demonstrations.jsonl", data.demonstrations),
        "critiques.jsonl": write_jsonl(out_dir / "critiques.jsonl", data.critiques),
        "trl_pairs.jsonl": export_trl_pairs(data.comparisons, out_dir / "trl_pairs.jsonl"),
    }
