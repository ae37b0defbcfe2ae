"""Importing a labelling batch from `rlhf sample` records (the CLI's `rlhf label import` and the admin API)."""

from __future__ import annotations

import hashlib
import json
import random
import tempfile
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from rlhf.data.records import SampleRecord, read_samples
from rlhf.errors import UserError
from rlhf.feedback import schemas
from rlhf.feedback.checks import Conflict, Invalid
from rlhf.feedback.schemas import MAX_K
from rlhf.feedback.store import Batch, Item


def pick_pair(prompt_id: str, k: int) -> list[int]:
    """The two responses the pairwise form asks about: fixed per item, so overlapping annotators see the same pair."""
    rng = random.Random(hashlib.sha256(prompt_id.encode()).digest())
    return sorted(rng.sample(range(k), 2))


def import_batch(
    db: Session,
    name: str,
    samples: list[SampleRecord],
    forms: list[str],
    overlap: int = 1,
    rating_scale: int = 7,
    source: str = "",
) -> Batch:
    """One batch from sampled records; all or nothing."""
    spec = schemas.BatchCreate(
        name=name, forms=forms, overlap=overlap, rating_scale=rating_scale, samples=[{}]
    )
    if db.scalar(select(Batch.id).where(Batch.name == name)) is not None:
        raise Conflict(f"batch '{name}' already exists")
    seen: set[str] = set()
    for n, record in enumerate(samples, 1):
        k = len(record.responses)
        if not 2 <= k <= MAX_K:
            raise Invalid(
                f"sample {n} (prompt_id {record.prompt_id}): has {k} responses; the app shows 2..{MAX_K}"
            )
        if record.prompt_id in seen:
            raise Invalid(f"sample {n}: prompt_id '{record.prompt_id}' appears twice")
        seen.add(record.prompt_id)
    batch = Batch(
        name=name,
        forms=list(dict.fromkeys(spec.forms)),
        overlap=overlap,
        rating_scale=rating_scale,
        source=source,
    )
    db.add(batch)
    db.flush()
    db.add_all(
        Item(
            batch_id=batch.id,
            position=n,
            prompt_id=record.prompt_id,
            prompt=record.prompt,
            responses=[
                {"text": r.text, "policy": r.policy, "token_ids": r.token_ids} for r in record.responses
            ],
            pair=pick_pair(record.prompt_id, len(record.responses)),
            meta=record.meta,
            filled=0,
        )
        for n, record in enumerate(samples)
    )
    try:
        db.commit()
    except IntegrityError:
        db.rollback()
        raise Conflict(f"batch '{name}' already exists") from None
    return batch


def samples_from_objects(objects: list[dict]) -> list[SampleRecord]:
    """Parse uploaded sample lines with the same reader (and the same errors) as a samples file."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "samples.jsonl"
        path.write_text("".join(json.dumps(o, ensure_ascii=False) + "\n" for o in objects), encoding="utf-8")
        try:
            return read_samples(path)
        except UserError as exc:
            raise Invalid(str(exc).replace(str(path), "samples line")) from None
