"""The store on SQLite and PostgreSQL: migrations, durability settings, races for slots and submission ids."""

from __future__ import annotations

import threading

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import func, select, text

from rlhf.feedback import service
from rlhf.feedback.schemas import SubmitIn
from rlhf.feedback.store import Annotation, Base, Item, migrate, open_database

from .conftest import make_samples


def race(n: int, fn) -> list:
    """Run fn(i) in n threads released together; returns results or exceptions."""
    barrier, out = threading.Barrier(n), [None] * n

    def run(i):
        barrier.wait()
        try:
            out[i] = fn(i)
        except Exception as exc:  # noqa: BLE001 - collected and asserted on by the test
            out[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    return out


def test_migrations_build_exactly_the_models(store):
    engine, _ = store
    with engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
    migrate(engine)  # applied on every start: a second run is a no-op
    with engine.connect() as conn:
        assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar() == "0001"


def test_sqlite_runs_in_wal_mode(db_path):
    for synchronous, code in (("normal", 1), ("full", 2)):
        engine, _ = open_database(str(db_path), synchronous)
        with engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == code
        engine.dispose()


def test_racing_claims_never_exceed_the_overlap(store):
    _, sessions = store
    with sessions() as db:
        service.import_batch(db, "race", make_samples(n=3), ["ranking"], overlap=2)
        users = [service.create_annotator(db, f"u{i}")[0] for i in range(8)]
        actors = [service.Actor(u.id, u.name, u.is_admin) for u in users]

    def claim(i):
        with sessions() as db:
            found = service.next_item(db, actors[i])
            return None if found is None else found[0].id

    got = race(8, claim)
    assert not [g for g in got if isinstance(g, Exception)], got
    claimed = [g for g in got if g is not None]
    assert len(claimed) == 6 and all(claimed.count(i) == 2 for i in set(claimed))  # 3 items x overlap 2
    with sessions() as db:
        for item in db.scalars(select(Item)):
            slots = db.scalar(
                select(func.count()).where(Annotation.item_id == item.id, Annotation.slot.is_not(None))
            )
            assert item.filled == slots == 2


def test_racing_retries_store_one_row(store):
    _, sessions = store
    with sessions() as db:
        service.import_batch(db, "retry", make_samples(n=1), ["ranking"])
        user, _ = service.create_annotator(db, "alice")
        actor = service.Actor(user.id, user.name, user.is_admin)
        item, _ = service.next_item(db, actor)
        item_id = item.id

    def submit(i):
        with sessions() as db:
            body = SubmitIn(submission_id="same-id-0001", ranks=[1, 2, 3, 4])
            return service.submit(db, actor, item_id, body)[1]

    replayed = race(6, submit)
    assert sorted(replayed) == [False] + [True] * 5, replayed
    with sessions() as db:
        rows = db.scalars(select(Annotation)).all()
        assert [(r.status, r.submission_id, r.feedback["ranks"]) for r in rows] == [
            ("submitted", "same-id-0001", [1, 2, 3, 4])
        ]


def test_a_batch_import_is_all_or_nothing(store):
    _, sessions = store
    samples = make_samples(n=3)
    samples[2].prompt_id = samples[0].prompt_id
    with sessions() as db, pytest.raises(service.Invalid, match="appears twice"):
        service.import_batch(db, "dup", samples, ["ranking"])
    with sessions() as db:
        assert db.scalar(select(func.count(Item.id))) == 0
        service.import_batch(db, "ok", make_samples(n=3), ["ranking"])
        with pytest.raises(service.Conflict):
            service.import_batch(db, "ok", make_samples(n=1), ["ranking"])
        assert db.scalar(select(func.count(Item.id))) == 3


def test_racing_submits_that_claim_the_next_item_keep_every_submit_and_the_overlap(store):
    """A submit claims the annotator's next item in its own transaction: 6 annotators race through 4 items with
    overlap 2 (8 slots); every acknowledged submit is stored, no item gets more than 2, nobody sees an item twice."""
    _, sessions = store
    with sessions() as db:
        service.import_batch(db, "loop", make_samples(n=4), ["ranking"], overlap=2)
        users = [service.create_annotator(db, f"u{i}")[0] for i in range(6)]
        actors = [service.Actor(u.id, u.name, u.is_admin) for u in users]

    def work(i):
        done = []
        with sessions() as db:
            found = service.next_item(db, actors[i])
            while found is not None:
                sid = f"loop-{i}-{len(done):04d}"
                ann, replayed, found = service.submit_and_next(
                    db, actors[i], found[0].id, SubmitIn(submission_id=sid, ranks=[2, 1, 4, 3])
                )
                assert not replayed and ann.status == "submitted" and ann.submission_id == sid
                done.append((ann.item_id, sid))
        return done

    got = race(6, work)
    assert not [g for g in got if isinstance(g, Exception)], got
    acked = [pair for done in got for pair in done]
    assert len(acked) == 8  # 4 items x overlap 2, all handed out
    for done in got:
        assert len({item for item, _ in done}) == len(done)  # never the same item twice
    with sessions() as db:
        rows = db.execute(select(Annotation.item_id, Annotation.submission_id, Annotation.status)).all()
        assert sorted((r.item_id, r.submission_id) for r in rows) == sorted(acked)
        assert {r.status for r in rows} == {"submitted"}
        assert all(item.filled == 2 for item in db.scalars(select(Item)))
