"""Domain functions of the feedback app. Routes and the CLI call these; they call the models in `store`.

Every function that touches annotation data takes the acting `Annotator` and scopes its queries to that user's own
rows; admin-only functions are only reachable through the admin dependency (see app.py). Errors (`checks.py`) are
`FeedbackError`s carrying an HTTP status, so the routes stay thin and the CLI prints them as one line.
"""

from __future__ import annotations

import hashlib
import random
import secrets
import time
import weakref
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import NamedTuple

from pydantic import BaseModel, ValidationError
from sqlalchemy import and_, bindparam, func, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from rlhf.feedback import schemas
from rlhf.feedback.batches import import_batch, pick_pair, samples_from_objects  # noqa: F401 - re-exported
from rlhf.feedback.checks import (  # noqa: F401 - the errors are part of this module's interface
    Conflict,
    FeedbackError,
    Forbidden,
    Invalid,
    NotFound,
    check_submit,
    feedback_dict,
)
from rlhf.feedback.hotsql import runner
from rlhf.feedback.schemas import FeedbackIn, SubmitIn
from rlhf.feedback.store import Annotation, Annotator, Batch, Item, utcnow, writer_lock

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


_batch_ids: weakref.WeakKeyDictionary[Engine, dict[str, int]] = weakref.WeakKeyDictionary()


def batch_id(db: Session, name: str) -> int:
    """A batch's id by name (cached per database: batches are never renamed or deleted)."""
    cache = _batch_ids.setdefault(db.get_bind(), {})
    if name not in cache:
        found = db.connection().scalar(select(_B.c.id).where(_B.c.name == name))
        if found is None:
            raise NotFound(f"no batch named '{name}'")
        cache[name] = found
    return cache[name]


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


# The annotator's loop (next item, submit) runs on every request, so it uses prebuilt SQLAlchemy Core statements
# and plain row tuples: no ORM identity map, unit of work or attribute events; on SQLite they run straight on the
# DB-API connection (hotsql.py).
_I, _A, _B = Item.__table__, Annotation.__table__, Batch.__table__


class ItemRow(NamedTuple):
    id: int
    batch_id: int
    prompt_id: str
    prompt: str
    responses: list
    pair: list


class AnnotationRow(NamedTuple):
    id: int
    item_id: int
    slot: int | None
    status: str
    feedback: dict
    submission_id: str | None
    updated_at: datetime
    submitted_at: datetime | None


_N_ITEM = len(ItemRow._fields)
_ITEM_COLS = [_I.c[name] for name in ItemRow._fields]
_ANN_COLS = [_A.c[name] for name in AnnotationRow._fields]
_OWN = select(*_ANN_COLS).where(_A.c.item_id == bindparam("item_id"), _A.c.annotator_id == bindparam("user"))
_ITEM_AND_OWN = (
    select(*_ITEM_COLS, *_ANN_COLS)
    .select_from(_I.outerjoin(_A, and_(_A.c.item_id == _I.c.id, _A.c.annotator_id == bindparam("user"))))
    .where(_I.c.id == bindparam("item_id"))
)
_DRAFT = (
    select(*_ITEM_COLS, *_ANN_COLS)
    .join_from(_I, _A, _A.c.item_id == _I.c.id)
    .where(
        _A.c.annotator_id == bindparam("user"),
        _A.c.status == "draft",
        _I.c.batch_id.in_(bindparam("batches", expanding=True)),
    )
    .order_by(_A.c.id)
    .limit(1)
)
_ITEM = select(*_ITEM_COLS).where(_I.c.id == bindparam("item_id"))
_BATCH_IDS = select(_B.c.id).order_by(_B.c.id)
_SLOTS = select(_A.c.slot).where(_A.c.item_id == bindparam("item_id"), _A.c.slot.is_not(None))
_INSERT_SQLITE = sqlite_insert(_A).on_conflict_do_nothing().returning(_A.c.id)
_INSERT_PG = pg_insert(_A).on_conflict_do_nothing().returning(_A.c.id)
_FILL = update(_I).where(_I.c.id == bindparam("item_id")).values(filled=_I.c.filled + bindparam("delta"))
_OPEN = (
    select(_I.c.id)
    .where(
        _I.c.batch_id == bindparam("batch"),
        _I.c.filled == bindparam("filled"),
        ~select(_A.c.id).where(_A.c.item_id == _I.c.id, _A.c.annotator_id == bindparam("user")).exists(),
    )
    .order_by(_I.c.position)
    .limit(16)
)
_SUBMIT = update(_A).where(_A.c.id == bindparam("ann_id"), _A.c.status == "draft")
_SKIP = _SUBMIT.values(slot=None)
_BY_SUBMISSION = select(*_ANN_COLS).where(_A.c.submission_id == bindparam("sid"))


def _writer(db: Session) -> AbstractContextManager:
    """Held around the server's hot write transactions on SQLite (see `store.writer_lock`); PostgreSQL locks rows
    itself and needs nothing here."""
    bind = db.get_bind()
    return writer_lock(bind) if bind.dialect.name == "sqlite" else nullcontext()


def _split(row) -> tuple[ItemRow, AnnotationRow]:
    return ItemRow(*row[:_N_ITEM]), AnnotationRow(*row[_N_ITEM:])


def _first(db: Session, stmt, params: dict) -> tuple | None:
    rows = runner(db).rows(stmt, params)
    return rows[0] if rows else None


def _own(db: Session, user: Actor, item_id: int) -> AnnotationRow | None:
    row = _first(db, _OWN, {"item_id": item_id, "user": user.id})
    return None if row is None else AnnotationRow(*row)


def _claim(
    db: Session, item_id: int, overlap: int, user: Actor, empty: bool = False, commit: bool = True
) -> AnnotationRow | None:
    """Take a free slot of the item for `user`; None when it is full or a racer won it.

    The insert is `ON CONFLICT DO NOTHING` (SQLite and PostgreSQL): a slot (or this annotator's row for the item)
    taken meanwhile by a racer inserts nothing and raises nothing, so a claim can share the transaction of a submit
    (`commit=False`) without ever aborting it. `empty`: the item was just seen with no slot taken (`filled` == 0), so
    slot 0 is tried without reading the slots (the unique index still decides).
    """
    run = runner(db)
    taken = set() if empty else {row[0] for row in run.rows(_SLOTS, {"item_id": item_id})}
    slot = next((s for s in range(overlap) if s not in taken), None)
    if slot is None:
        return None
    now = utcnow()
    values = {"item_id": item_id, "annotator_id": user.id, "slot": slot, "status": "draft", "feedback": {}}
    insert = _INSERT_PG if db.get_bind().dialect.name == "postgresql" else _INSERT_SQLITE
    with _writer(db) if commit else nullcontext():
        inserted = run.rows(insert, {**values, "created_at": now, "updated_at": now})
        if not inserted:
            if commit:
                db.rollback()  # nothing was written
            return None
        ann_id = inserted[0][0]
        run.rowcount(_FILL, {"item_id": item_id, "delta": 1})
        if commit:
            db.commit()
    return AnnotationRow(ann_id, item_id, slot, "draft", {}, None, now, None)


# A lost claim round means another annotator's claim committed, so rounds only run out in a storm of claimants
# far larger than the free slots. Inside a submit's transaction (holding its row) give up quickly instead: the
# caller looks again, with all rounds, once the submit is committed.
_CLAIM_ROUNDS, _CLAIM_ROUNDS_IN_TRANSACTION, _CLAIM_BACKOFF_S = 32, 2, 0.002


def next_item(
    db: Session, user: Actor, batch_name: str | None = None, commit: bool = True
) -> tuple[ItemRow, AnnotationRow] | None:
    """The user's open draft if any, else a newly claimed item they have not seen whose overlap is not reached.

    Items already started by others come first (so overlapping items complete), then in file order; among the first
    few open items each annotator starts at a different one, so simultaneous claims rarely collide. `commit=False`
    claims inside the caller's transaction (a submit's: one commit for the submit and the next claim).
    """
    if batch_name is not None:
        batches = [batch_info(db, batch_id(db, batch_name))]
    else:
        batches = [batch_info(db, row[0]) for row in runner(db).rows(_BATCH_IDS, {})]
    draft = _first(db, _DRAFT, {"user": user.id, "batches": tuple(b.id for b in batches)})
    if draft is not None:
        return _split(draft)
    for attempt in range(_CLAIM_ROUNDS if commit else _CLAIM_ROUNDS_IN_TRANSACTION):
        if attempt and commit:  # a lost round means racers' claims committed meanwhile: back off, look again
            db.rollback()  # end the read; a committing claim holds nothing uncommitted here
            time.sleep(random.uniform(0, _CLAIM_BACKOFF_S * min(attempt, 8)))
        candidates = _open_items(db, batches, user)
        if not candidates:
            return None
        start = user.id % len(candidates)  # annotators arriving together try different items first
        for item_id, overlap, filled in candidates[start:] + candidates[:start]:
            ann = _claim(db, item_id, overlap, user, empty=filled == 0, commit=commit)
            if ann is not None:
                return ItemRow(*_first(db, _ITEM, {"item_id": item_id})), ann
    raise Conflict("too many annotators are claiming items at once; try again")


def _open_items(db: Session, batches: list[BatchInfo], user: Actor) -> list[tuple[int, int, int]]:
    """Up to 16 open items of the first batch that has any: one index range scan per fill level, fullest first."""
    run = runner(db)
    for batch in batches:
        for filled in range(batch.overlap - 1, -1, -1):
            found = run.rows(_OPEN, {"batch": batch.id, "filled": filled, "user": user.id})
            if found:
                return [(row[0], batch.overlap, filled) for row in found]
    return []


def own_item(db: Session, user: Actor, item_id: int) -> tuple[Item, Annotation]:
    """An item the user holds (claimed, drafted or submitted), as ORM objects. Others' items read as not found."""
    ann = db.scalar(
        select(Annotation).where(Annotation.item_id == item_id, Annotation.annotator_id == user.id)
    )
    if ann is None:
        raise NotFound(f"item {item_id} is not one of yours (ask /api/next for an item)")
    return db.get(Item, item_id), ann


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
    ann.feedback = feedback_dict(fb)
    ann.updated_at = utcnow()
    with _writer(db):
        db.commit()
    return ann


def submit(db: Session, user: Actor, item_id: int, body: SubmitIn) -> tuple[AnnotationRow, bool]:
    """Store a final answer in one transaction; (annotation, replayed). Retrying a submission id is a no-op."""
    ann, replayed, _ = submit_and_next(db, user, item_id, body, next_item_too=False)
    return ann, replayed


def submit_and_next(
    db: Session,
    user: Actor,
    item_id: int,
    body: SubmitIn,
    batch_name: str | None = None,
    next_item_too: bool = True,
) -> tuple[AnnotationRow, bool, tuple[ItemRow, AnnotationRow] | None]:
    """Store a final answer and claim the user's next item in ONE transaction (one commit); (annotation, replayed,
    next item or None). Retrying a submission id stores nothing and answers the stored result with the user's
    next item. A claim never aborts the submit (see `_claim`); if racers took every candidate, the next item is
    looked for again after the submit is committed."""
    if next_item_too and batch_name is not None:
        batch_id(db, batch_name)  # an unknown batch is a 404 before anything is written
    row = _first(db, _ITEM_AND_OWN, {"item_id": item_id, "user": user.id})
    if row is None:
        raise NotFound(f"item {item_id} does not exist")
    item, ann = _split(row)
    if ann.id is not None and ann.submission_id == body.submission_id:  # a retry of a stored submit
        return ann, True, next_item(db, user, batch_name) if next_item_too else None
    batch = batch_info(db, item.batch_id)
    if ann.id is None:  # submitting straight to an item: claim it first, if a slot is free
        ann = _claim(db, item_id, batch.overlap, user) or _own(db, user, item_id)
        if ann is None:
            raise Conflict(f"item {item_id} already has its {batch.overlap} annotator(s)")
    if ann.status != "draft":
        raise Conflict(f"item {item_id} is already {ann.status} (submission id '{ann.submission_id}')")
    feedback = check_submit(item.responses, batch, body)
    now = utcnow()
    values = {
        "status": "skipped" if body.skip else "submitted",
        "feedback": feedback,
        "submission_id": body.submission_id,
        "submitted_at": now,
        "updated_at": now,
    }
    found = None
    with _writer(db):
        try:
            # conditional on still being a draft: of two concurrent submits exactly one changes the row
            run = runner(db)
            changed = run.rowcount(_SKIP if body.skip else _SUBMIT, {**values, "ann_id": ann.id})
            if changed == 1 and body.skip:  # a skip hands the item to someone else: it gives its slot back
                run.rowcount(_FILL, {"item_id": item_id, "delta": -1})
            if changed == 1 and next_item_too:
                try:
                    found = next_item(db, user, batch_name, commit=False)
                except Conflict:  # racers took every candidate: look again once the submit is committed
                    found = False
            db.commit()
        except IntegrityError:  # the submission id is taken: a concurrent retry of this submit, or another's
            db.rollback()
            changed = 0
    if changed == 1:
        if found is False:
            found = next_item(db, user, batch_name)
        return ann._replace(**values, slot=None if body.skip else ann.slot), False, found
    stored = _first(db, _BY_SUBMISSION, {"sid": body.submission_id})
    db.rollback()  # end the read
    if stored is not None and stored[0] == ann.id:
        return AnnotationRow(*stored), True, next_item(db, user, batch_name) if next_item_too else None
    if stored is not None:
        raise Conflict(f"submission id '{body.submission_id}' was already used for another item")
    raise Conflict(f"item {item_id} was submitted concurrently with another submission id")
