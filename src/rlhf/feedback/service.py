"""Domain functions of the feedback app. Routes and the CLI call these; they call the models in `store`.

Every function that touches annotation data takes the acting `Annotator` and scopes its queries to that user's own
rows; admin-only functions are only reachable through the admin dependency (see app.py). Errors are `FeedbackError`s
carrying an HTTP status, so the routes stay thin and the CLI prints them as one line.
"""

from __future__ import annotations

import hashlib
import json
import random
import secrets
import tempfile
import weakref
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from pydantic import BaseModel, ValidationError
from sqlalchemy import func, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import set_committed_value

from rlhf.data.records import SampleRecord, ranking_error, read_samples
from rlhf.errors import UserError
from rlhf.feedback import schemas
from rlhf.feedback.schemas import MAX_K, FeedbackIn, SubmitIn
from rlhf.feedback.store import Annotation, Annotator, Batch, Item, utcnow


class FeedbackError(UserError):
    status = 400


class NotFound(FeedbackError):
    status = 404


class Forbidden(FeedbackError):
    status = 403


class Conflict(FeedbackError):
    status = 409


class Invalid(FeedbackError):
    status = 422


# ---------------------------------------------------------------------------------------------------------------
# Annotators and tokens


@dataclass(frozen=True)
class Actor:
    """Who is acting: what the app keeps of an authenticated annotator between requests."""

    id: int
    name: str
    is_admin: bool


@dataclass(frozen=True)
class BatchInfo:
    """A batch's settings; batches never change after import, so they are cached per database."""

    id: int
    name: str
    forms: list[str]
    overlap: int
    rating_scale: int


_batch_cache: weakref.WeakKeyDictionary[Engine, dict[int, BatchInfo]] = weakref.WeakKeyDictionary()


def batch_info(db: Session, batch_id: int) -> BatchInfo:
    cache = _batch_cache.setdefault(db.get_bind(), {})
    if batch_id not in cache:
        b = db.get(Batch, batch_id)
        cache[batch_id] = BatchInfo(b.id, b.name, list(b.forms), b.overlap, b.rating_scale)
    return cache[batch_id]


def _validated(model: type[BaseModel], **values) -> BaseModel:
    """A schema built from CLI arguments, with the HTTP endpoint's rules and a one-line error."""
    try:
        return model(**values)
    except ValidationError as exc:
        err = exc.errors()[0]
        raise Invalid(f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}") from None


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create_annotator(db: Session, name: str, admin: bool = False) -> tuple[Annotator, str]:
    _validated(schemas.AnnotatorCreate, name=name, admin=admin)  # the same rules as the HTTP endpoint
    if db.scalar(select(Annotator.id).where(Annotator.name == name)) is not None:
        raise Conflict(f"annotator '{name}' already exists")
    token = secrets.token_urlsafe(24)
    annotator = Annotator(name=name, token_hash=hash_token(token), is_admin=admin)
    db.add(annotator)
    try:
        db.commit()
    except IntegrityError:
        db.rollback()
        raise Conflict(f"annotator '{name}' already exists") from None
    return annotator, token


def ensure_admin(db: Session) -> str | None:
    """Create the first admin ('admin') when there is none and return its token; None when one exists."""
    if db.scalar(select(Annotator.id).where(Annotator.is_admin.is_(True)).limit(1)) is not None:
        return None
    name = "admin" if db.scalar(select(Annotator.id).where(Annotator.name == "admin")) is None else "admin-1"
    return create_annotator(db, name, admin=True)[1]


def authenticate(db: Session, token: str | None) -> Actor | None:
    if not token:
        return None
    row = db.execute(
        select(Annotator.id, Annotator.name, Annotator.is_admin).where(
            Annotator.token_hash == hash_token(token)
        )
    ).first()
    return None if row is None else Actor(*row)


def list_annotators(db: Session) -> list[Annotator]:
    return list(db.scalars(select(Annotator).order_by(Annotator.id)))


def public_annotator(a: Annotator) -> schemas.AnnotatorPublic:
    return schemas.AnnotatorPublic(id=a.id, name=a.name, admin=a.is_admin, created_at=_utc(a.created_at))


# ---------------------------------------------------------------------------------------------------------------
# Batches


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


def get_batch(db: Session, name: str) -> Batch:
    batch = db.scalar(select(Batch).where(Batch.name == name))
    if batch is None:
        raise NotFound(f"no batch named '{name}'")
    return batch


def list_batches(db: Session) -> list[Batch]:
    return list(db.scalars(select(Batch).order_by(Batch.id)))


def public_batch(db: Session, batch: Batch) -> schemas.BatchPublic:
    items = db.scalar(select(func.count(Item.id)).where(Item.batch_id == batch.id)) or 0
    return schemas.BatchPublic(
        id=batch.id,
        name=batch.name,
        forms=batch.forms,
        overlap=batch.overlap,
        rating_scale=batch.rating_scale,
        items=items,
        created_at=batch.created_at,
    )


# ---------------------------------------------------------------------------------------------------------------
# Serving items: every query below is scoped to the acting annotator's own rows


def _utc(moment: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes; every time we store is UTC."""
    return moment.replace(tzinfo=timezone.utc) if moment is not None and moment.tzinfo is None else moment


def public_annotation(ann: Annotation, annotator_name: str) -> schemas.AnnotationPublic:
    return schemas.AnnotationPublic(
        id=ann.id,
        item_id=ann.item_id,
        annotator=annotator_name,
        status=ann.status,
        feedback=ann.feedback or {},
        submission_id=ann.submission_id,
        updated_at=_utc(ann.updated_at),
        submitted_at=_utc(ann.submitted_at),
    )


def public_item(db: Session, item: Item, ann: Annotation, user: Actor) -> schemas.ItemPublic:
    batch = batch_info(db, item.batch_id)
    return schemas.ItemPublic(
        id=item.id,
        batch=batch.name,
        prompt_id=item.prompt_id,
        prompt=item.prompt,
        responses=[r["text"] for r in item.responses],
        pair=item.pair,
        forms=batch.forms,
        rating_scale=batch.rating_scale,
        annotation=public_annotation(ann, user.name),
    )


def _own(db: Session, user: Actor, item_id: int) -> Annotation | None:
    return db.scalar(
        select(Annotation).where(Annotation.item_id == item_id, Annotation.annotator_id == user.id)
    )


def _claim(db: Session, item_id: int, overlap: int, user: Actor) -> Annotation | None:
    """Take a free slot of the item for `user`; None when it is full (or another claim won the race)."""
    taken = set(
        db.scalars(select(Annotation.slot).where(Annotation.item_id == item_id, Annotation.slot.is_not(None)))
    )
    slot = next((s for s in range(overlap) if s not in taken), None)
    if slot is None:
        return None
    ann = Annotation(item_id=item_id, annotator_id=user.id, slot=slot, status="draft", feedback={})
    try:
        db.add(ann)
        db.flush()
        db.execute(update(Item).where(Item.id == item_id).values(filled=Item.filled + 1))
        db.commit()
    except IntegrityError:
        db.rollback()
        return None
    return ann


def next_item(db: Session, user: Actor, batch_name: str | None = None) -> tuple[Item, Annotation] | None:
    """The user's open draft if any, else a newly claimed item they have not seen whose overlap is not reached.

    Items already started by others come first (so overlapping items complete), then in file order; among the first
    few open items each annotator starts at a different one, so simultaneous claims rarely collide.
    """
    if batch_name is not None:
        batches = [batch_info(db, get_batch(db, batch_name).id)]
    else:
        batches = [batch_info(db, batch_id) for batch_id in db.scalars(select(Batch.id).order_by(Batch.id))]
    draft = db.execute(
        select(Item, Annotation)
        .join(Annotation, Annotation.item_id == Item.id)
        .where(
            Annotation.annotator_id == user.id,
            Annotation.status == "draft",
            Item.batch_id.in_([b.id for b in batches]),
        )
        .order_by(Annotation.id)
        .limit(1)
    ).first()
    if draft is not None:
        return draft[0], draft[1]
    for _attempt in range(5):
        candidates = _open_items(db, batches, user)
        if not candidates:
            return None
        start = user.id % len(candidates)  # annotators arriving together try different items first
        for item_id, overlap in candidates[start:] + candidates[:start]:
            ann = _claim(db, item_id, overlap, user)
            if ann is not None:
                return db.get(Item, item_id), ann
    raise Conflict("too many annotators are claiming items at once; try again")


def _open_items(db: Session, batches: list[BatchInfo], user: Actor) -> list[tuple[int, int]]:
    """Up to 16 open items of the first batch that has any: one index range scan per fill level, fullest first."""
    mine = (
        select(Annotation.id)
        .where(Annotation.item_id == Item.id, Annotation.annotator_id == user.id)
        .exists()
    )
    for batch in batches:
        for filled in range(batch.overlap - 1, -1, -1):
            found = db.scalars(
                select(Item.id)
                .where(Item.batch_id == batch.id, Item.filled == filled, ~mine)
                .order_by(Item.position)
                .limit(16)
            ).all()
            if found:
                return [(item_id, batch.overlap) for item_id in found]
    return []


def own_item(db: Session, user: Actor, item_id: int) -> tuple[Item, Annotation]:
    """An item the user holds (claimed, drafted or submitted). Others' items read as not found."""
    ann = _own(db, user, item_id)
    if ann is None:
        raise NotFound(f"item {item_id} is not one of yours (ask /api/next for an item)")
    return db.get(Item, item_id), ann


def _feedback_dict(fb: FeedbackIn) -> dict:
    return fb.model_dump(include=set(FeedbackIn.model_fields), exclude_none=True, mode="json")


def save_draft(db: Session, user: Actor, item_id: int, fb: FeedbackIn) -> Annotation:
    """Lenient: partial feedback is fine; sizes must fit the item."""
    item, ann = own_item(db, user, item_id)
    if ann.status != "draft":
        raise Conflict(f"item {item_id} is already {ann.status}; drafts can no longer change")
    k = len(item.responses)
    for field in ("ranks", "ratings"):
        values = getattr(fb, field)
        if values is not None and len(values) > k:
            raise Invalid(f"field '{field}' has {len(values)} entries for {k} responses")
    if fb.correction is not None and fb.correction.index >= k:
        raise Invalid(f"field 'correction.index' is {fb.correction.index}; the item has {k} responses")
    ann.feedback = _feedback_dict(fb)
    ann.updated_at = utcnow()
    db.commit()
    return ann


FIELD_FORM = {
    "ranks": "ranking",
    "ties": "ranking",
    "ratings": "rating",
    "pairwise": "pairwise",
    "correction": "correction",
    "demonstration": "demonstration",
    "critique": "critique",
}


def check_submit(item: Item, batch: BatchInfo, body: SubmitIn) -> dict:
    """Strict validation of a submit; returns the feedback to store."""
    fb = _feedback_dict(body)
    for field in ("demonstration", "critique", "note"):
        if field in fb and not fb[field].strip():
            del fb[field]  # an empty text box means "not given"
    if fb.get("ties") == []:
        del fb["ties"]
    for field, form in FIELD_FORM.items():
        if field in fb and form not in batch.forms:
            raise Invalid(f"field '{field}': batch '{batch.name}' does not ask for {form} feedback")
    if body.skip:
        return {key: fb[key] for key in ("flags", "note", "critique") if key in fb}
    k = len(item.responses)
    if "ranking" in batch.forms:
        ranks = fb.get("ranks")
        if ranks is None:
            raise Invalid("field 'ranks': every response must be ranked")
        problem = ranking_error(ranks, k)
        if problem:
            raise Invalid(f"field 'ranks' {problem}")
        _check_ties(ranks, fb.get("ties", []))
    if "rating" in batch.forms:
        ratings = fb.get("ratings")
        if ratings is None or len(ratings) != k or any(r is None for r in ratings):
            raise Invalid(f"field 'ratings': rate all {k} responses")
        bad = [r for r in ratings if not 1 <= r <= batch.rating_scale]
        if bad:
            raise Invalid(f"field 'ratings': {bad[0]} is outside 1..{batch.rating_scale}")
    if "pairwise" in batch.forms and "pairwise" not in fb:
        raise Invalid("field 'pairwise': choose a, b or tie")
    if not {"ranking", "rating", "pairwise"} & set(batch.forms) and not {
        "correction",
        "demonstration",
        "critique",
    } & set(fb):
        raise Invalid(f"nothing to submit: give at least one of {', '.join(batch.forms)} (or skip)")
    if "correction" in fb:
        index, text = fb["correction"]["index"], fb["correction"]["text"]
        if index >= k:
            raise Invalid(f"field 'correction.index' is {index}; the item has {k} responses")
        if not text.strip() or text == item.responses[index]["text"]:
            raise Invalid("field 'correction.text' is empty or unchanged")
    return fb


def _check_ties(ranks: list[int], ties: list[list[int]]) -> None:
    """Equal ranks are allowed only as declared tie groups: each group shares one rank and holds all of it."""
    k, declared = len(ranks), set()
    for group in ties:
        if len(group) < 2 or len(set(group)) != len(group) or any(i >= k for i in group):
            raise Invalid(f"field 'ties': group {group} must list 2+ distinct response indices below {k}")
        if declared & set(group):
            raise Invalid(f"field 'ties': response {sorted(declared & set(group))[0]} is in two tie groups")
        declared |= set(group)
        if len({ranks[i] for i in group}) != 1:
            raise Invalid(
                f"field 'ties': responses {group} are declared tied but have ranks {[ranks[i] for i in group]}"
            )
    groups = {frozenset(g) for g in ties}
    for rank in sorted(set(ranks)):
        holders = frozenset(i for i, r in enumerate(ranks) if r == rank)
        if len(holders) > 1 and holders not in groups:
            raise Invalid(
                f"field 'ranks': responses {sorted(holders)} share rank {rank} but are not declared a tie"
            )


def submit(db: Session, user: Actor, item_id: int, body: SubmitIn) -> tuple[Annotation, bool]:
    """Store a final answer in one transaction; (annotation, replayed). Retrying a submission id is a no-op."""
    ann = _own(db, user, item_id)
    if ann is not None and ann.submission_id == body.submission_id:
        return ann, True  # a retry of a stored submit
    if ann is None:  # submitting straight to an item: claim it first, if a slot is free
        item = db.get(Item, item_id)
        if item is None:
            raise NotFound(f"item {item_id} does not exist")
        ann = _claim(db, item_id, batch_info(db, item.batch_id).overlap, user) or _own(db, user, item_id)
        if ann is None:
            raise Conflict(
                f"item {item_id} already has its {batch_info(db, item.batch_id).overlap} annotator(s)"
            )
    if ann.status != "draft":
        raise Conflict(f"item {item_id} is already {ann.status} (submission id '{ann.submission_id}')")
    item = db.get(Item, item_id)
    feedback = check_submit(item, batch_info(db, item.batch_id), body)
    now = utcnow()
    values = {
        "status": "skipped" if body.skip else "submitted",
        "feedback": feedback,
        "submission_id": body.submission_id,
        "submitted_at": now,
        "updated_at": now,
    }
    if body.skip:
        values["slot"] = None  # a skip hands the item to someone else
    try:
        # conditional on still being a draft: of two concurrent submits exactly one changes the row
        changed = db.execute(
            update(Annotation)
            .where(Annotation.id == ann.id, Annotation.status == "draft")
            .values(**values)
            .execution_options(synchronize_session=False)
        ).rowcount
        if changed == 1 and body.skip:
            db.execute(update(Item).where(Item.id == item_id).values(filled=Item.filled - 1))
        db.commit()
    except IntegrityError:  # the submission id is taken: a concurrent retry of this submit, or another item's
        db.rollback()
        changed = 0
    if changed == 1:
        for key, value in values.items():
            set_committed_value(ann, key, value)
        return ann, False
    db.expire(ann)
    stored = db.scalar(select(Annotation).where(Annotation.submission_id == body.submission_id))
    if stored is not None and stored.id == ann.id:
        return stored, True
    if stored is not None:
        raise Conflict(f"submission id '{body.submission_id}' was already used for another item")
    raise Conflict(f"item {item_id} was submitted concurrently with another submission id")
