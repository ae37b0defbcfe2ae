"""Admin views of a batch: everyone's annotations, progress per annotator, inter-annotator agreement.

Reached only through the admin dependency of app.py and the admin CLI.
"""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from rlhf.data.records import ranks_from_scores
from rlhf.feedback import schemas
from rlhf.feedback.agreement import batch_agreement
from rlhf.feedback.service import public_batch
from rlhf.feedback.store import Annotation, Annotator, Batch, Item


def batch_annotations(
    db: Session, batch: Batch, status: str | None = None
) -> list[tuple[Item, Annotation, str]]:
    query = (
        select(Item, Annotation, Annotator.name)
        .join(Annotation, Annotation.item_id == Item.id)
        .join(Annotator, Annotator.id == Annotation.annotator_id)
        .where(Item.batch_id == batch.id)
        .order_by(Item.position, Annotation.id)
    )
    if status is not None:
        query = query.where(Annotation.status == status)
    return [(i, a, n) for i, a, n in db.execute(query).all()]


def ranking_of(feedback: dict, item: Item) -> list[int] | None:
    """The ranking one annotation implies: its ranks, else its ratings, else its pairwise choice (on the pair)."""
    if "ranks" in feedback:
        return feedback["ranks"]
    if "ratings" in feedback:
        return ranks_from_scores([float(r) for r in feedback["ratings"]])
    if "pairwise" in feedback:
        return {"a": [1, 2], "b": [2, 1], "tie": [1, 1]}[feedback["pairwise"]]
    return None


def batch_status(db: Session, batch: Batch) -> schemas.BatchStatus:
    rows = batch_annotations(db, batch)
    per_annotator: dict[str, dict[str, int]] = {}
    per_item: dict[int, list[list[int]]] = {}
    for item, ann, name in rows:
        counts = per_annotator.setdefault(name, {"submitted": 0, "skipped": 0, "draft": 0})
        counts[ann.status] += 1
        if ann.status == "submitted":
            ranking = ranking_of(ann.feedback, item)
            if ranking is not None:
                per_item.setdefault(item.id, []).append(ranking)
    public = public_batch(db, batch)
    submitted = sum(c["submitted"] for c in per_annotator.values())
    complete = db.scalar(
        select(func.count()).select_from(
            select(Annotation.item_id)
            .join(Item, Item.id == Annotation.item_id)
            .where(Item.batch_id == batch.id, Annotation.status == "submitted")
            .group_by(Annotation.item_id)
            .having(func.count() >= batch.overlap)
            .subquery()
        )
    )
    return schemas.BatchStatus(
        batch=public,
        target=public.items * batch.overlap,
        submitted=submitted,
        skipped=sum(c["skipped"] for c in per_annotator.values()),
        drafts=sum(c["draft"] for c in per_annotator.values()),
        complete_items=complete or 0,
        annotators=[
            schemas.AnnotatorProgress(
                annotator=n, submitted=c["submitted"], skipped=c["skipped"], drafts=c["draft"]
            )
            for n, c in sorted(per_annotator.items())
        ],
        agreement=schemas.AgreementOut(**batch_agreement(list(per_item.values()))),
    )
