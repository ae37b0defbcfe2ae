"""The store on SQLite and PostgreSQL: migrations, durability settings, races for slots and submission ids."""

from __future__ import annotations

import re
import shutil
import sqlite3
import threading
import time

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import func, select, text

from rlhf.feedback import hotsql, service
from rlhf.feedback.schemas import SubmitIn
from rlhf.feedback.store import Annotation, Base, Item, WalCheckpointer, migrate, open_database, writer_lock

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


def test_a_claimant_outlasts_lost_rounds_and_a_submit_claims_again_after_its_commit(store, monkeypatch):
    """Racers can win every candidate for several rounds in a row (6 threads on 8 slots did on CI); a claimant keeps
    looking while slots are open, and a submit whose in-transaction claim lost looks again once committed."""
    _, sessions = store
    with sessions() as db:
        service.import_batch(db, "b", make_samples(n=2), ["ranking"], overlap=1)
        user, _ = service.create_annotator(db, "alice")
        actor = service.Actor(user.id, user.name, user.is_admin)
    real_claim, lost = service._claim, {"rounds": 0}

    def losing_claim(db, item_id, overlap, who, empty=False, commit=True):
        if lost["rounds"] < 12:  # two items a round: six rounds lost, more than the old bound of five
            lost["rounds"] += 1
            return None
        return real_claim(db, item_id, overlap, who, empty=empty, commit=commit)

    monkeypatch.setattr(service, "_claim", losing_claim)
    monkeypatch.setattr(service, "_CLAIM_BACKOFF_S", 0.0)
    with sessions() as db:
        first = service.next_item(db, actor)
        assert first is not None and lost["rounds"] == 12
        lost["rounds"] = 0
        ann, replayed, second = service.submit_and_next(
            db, actor, first[0].id, SubmitIn(submission_id="submit-0001", ranks=[1, 2, 3, 4])
        )
        assert not replayed and ann.status == "submitted"
        assert second is not None and second[0].id != first[0].id
    with sessions() as db:
        assert {(a.item_id, a.status) for a in db.scalars(select(Annotation))} == {
            (first[0].id, "submitted"),
            (second[0].id, "draft"),
        }


def _annotator_loop_rows(db_path, runner_cls, monkeypatch) -> list[tuple]:
    """Claim, submit, skip and replay through the hot path with `runner_cls`; the annotations as stored."""
    monkeypatch.setattr(service, "runner", runner_cls)
    engine, sessions = open_database(str(db_path))
    with sessions() as db:
        service.import_batch(db, "b", make_samples(n=3), ["ranking", "critique"], overlap=2)
        user, _ = service.create_annotator(db, "alice")
        actor = service.Actor(user.id, user.name, user.is_admin)
        item, ann = service.next_item(db, actor)
        assert ann.feedback == {} and item.responses[0]["text"].startswith("Story 0 about fox")
        body = SubmitIn(submission_id="sub-00001", ranks=[2, 1, 3, 3], ties=[[2, 3]], critique="fine <b>")
        stored, replayed, (nxt, _) = service.submit_and_next(db, actor, item.id, body)
        assert not replayed and stored.feedback["ties"] == [[2, 3]] and stored.submitted_at is not None
        assert service.submit_and_next(db, actor, item.id, body)[1]  # a retry is a replay
        service.submit_and_next(
            db, actor, nxt.id, SubmitIn(submission_id="sub-00002", skip=True, flags=["unsafe"])
        )
    rows = [
        tuple(
            re.sub(r"\d", "0", v) if isinstance(v, str) and v[:2] == "20" else v for v in row
        )  # timestamps: format
        for row in sqlite3.connect(db_path).execute("SELECT * FROM annotations ORDER BY id").fetchall()
    ]
    with sessions() as db:  # the ORM reads what the fast path wrote
        assert all(a.updated_at.year >= 2024 for a in db.scalars(select(Annotation)))
    engine.dispose()
    return rows


def test_sqlite_fast_path_stores_exactly_what_sqlalchemy_stores(template_db, tmp_path, monkeypatch):
    got = {}
    for runner_cls in (hotsql.CoreRunner, hotsql.SqliteRunner):
        path = tmp_path / f"{runner_cls.__name__}.db"
        shutil.copy(template_db, path)
        got[runner_cls] = _annotator_loop_rows(path, runner_cls, monkeypatch)
    assert got[hotsql.CoreRunner] == got[hotsql.SqliteRunner]
    assert len(got[hotsql.SqliteRunner]) == 3  # submitted, skipped, the next claim


def test_background_checkpoints_move_the_wal_into_the_database(db_path):
    engine, sessions = open_database(str(db_path), background_checkpoints=True)
    with engine.connect() as conn:
        assert (
            conn.exec_driver_sql("PRAGMA wal_autocheckpoint").scalar() == 0
        )  # no checkpoint inside a COMMIT
    with sessions() as db:
        service.import_batch(db, "b", make_samples(n=50), ["ranking"])
    wal = db_path.parent / "feedback.db-wal"
    assert wal.stat().st_size > 0
    checkpointer = WalCheckpointer(engine, every=0.01)
    checkpointer.start()
    deadline = time.time() + 10
    while checkpointer.checkpoints == 0 and time.time() < deadline:
        time.sleep(0.01)
    checkpointer.stop()
    assert (
        checkpointer.checkpoints > 0 and (db_path.parent / "feedback.db-wal").stat().st_size == 0
    )  # truncated
    with sessions() as db:
        assert db.scalar(select(func.count(Item.id))) == 50
    engine.dispose()


def test_steady_writes_do_not_grow_the_wal_without_end(db_path):
    """SQLite starts the WAL over only when a write begins with every frame copied; steady writes never allow that
    unless the checkpointer pauses them for its last bit (WalCheckpointer.restart_frames)."""
    engine, _ = open_database(str(db_path), background_checkpoints=True)
    checkpointer = WalCheckpointer(engine, every=0.005, restart_frames=50)
    checkpointer.start()
    with engine.connect() as conn:
        conn.exec_driver_sql("CREATE TABLE filler (x BLOB)")
        conn.commit()
        # at least 0.6 s and 400 rows, so the frames-per-row claim does not hang on the machine's speed (the test failed
        # once inside the whole suite, unreproduced alone or beside two busy cores)
        start, written = time.time(), 0
        while (time.time() < start + 0.6 or written < 400) and time.time() < start + 20:
            with writer_lock(engine):
                conn.exec_driver_sql("INSERT INTO filler VALUES (randomblob(3000))")
                conn.commit()
            written += 1
            time.sleep(0.0002)  # a server does other work between writes (a tight loop would starve the lock)
        written = conn.exec_driver_sql("SELECT COUNT(*) FROM filler").scalar()
    frames = (db_path.parent / "feedback.db-wal").stat().st_size // 4096
    checkpointer.stop()
    assert written >= 400 and frames < written // 2, (written, frames)  # never restarted: a frame per row
    assert 0 < checkpointer.longest_pause < 1.0
    engine.dispose()
