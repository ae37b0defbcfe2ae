"""The database: SQLAlchemy 2 models, engines and sessions; Alembic migrations are applied on open.

SQLite (the embedded default) runs in WAL mode. Durability, precisely:
- `synchronous=NORMAL` (default): COMMIT returns after the transaction's WAL frames are written to the file (the
  kernel's page cache); only checkpoints fsync. A killed server (SIGKILL, OOM, crash) loses nothing acknowledged:
  the frames are the kernel's, and the next open replays the WAL. An OS crash or power cut may roll back the last
  few transactions (never corrupt the file). `benchmarks/label_load.py` SIGKILLs the server mid-load to check this.
- `synchronous=FULL` (`rlhf label serve --synchronous full`): COMMIT also fsyncs the WAL, so an acknowledged submit
  survives a power cut too; it costs one fsync per write (0.2 ms on an idle SSD, 6+ ms on a busy shared disk).
PostgreSQL works through a `postgresql+psycopg://` URL (its default synchronous_commit=on is power-safe).

The server (`rlhf label serve`) turns SQLite's automatic WAL checkpoint off on its own connections and runs PASSIVE
checkpoints in a background thread instead (`WalCheckpointer`): an automatic checkpoint runs inside the COMMIT of
whichever request crosses 1000 WAL pages, copying ~4 MB into the database file while every other writer waits.
Checkpoints only move committed pages from the WAL into the database file, so durability is the same either way.
"""

from __future__ import annotations

import sqlite3
import threading
import time
import weakref
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
)
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship, sessionmaker

from rlhf.errors import UserError

DEFAULT_DB = "runs/feedback.db"
MIGRATIONS = Path(__file__).with_name("migrations")


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    pass


class Annotator(Base):
    """A person who labels (or an admin). Only the SHA-256 of the token is stored."""

    __tablename__ = "annotators"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    is_admin: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Batch(Base):
    """One imported `rlhf sample` file: which feedback forms it asks for and how many annotators see each item."""

    __tablename__ = "batches"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    forms: Mapped[list] = mapped_column(JSON)  # e.g. ["ranking", "critique"]
    overlap: Mapped[int] = mapped_column(Integer, default=1)
    rating_scale: Mapped[int] = mapped_column(Integer, default=7)  # ratings are 1..rating_scale
    source: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    items: Mapped[list[Item]] = relationship(back_populates="batch", order_by="Item.position")


class Item(Base):
    """One prompt and its K responses, as sampled."""

    __tablename__ = "items"
    __table_args__ = (
        UniqueConstraint("batch_id", "prompt_id", name="uq_items_batch_prompt"),
        Index("ix_items_open", "batch_id", "filled", "position"),
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    batch_id: Mapped[int] = mapped_column(ForeignKey("batches.id", ondelete="CASCADE"))
    position: Mapped[int] = mapped_column(Integer)
    prompt_id: Mapped[str] = mapped_column(String(200))
    prompt: Mapped[str] = mapped_column(Text)
    responses: Mapped[list] = mapped_column(JSON)  # [{"text", "policy", "token_ids"}]
    pair: Mapped[list] = mapped_column(JSON)  # the two response indices the pairwise form asks about
    meta: Mapped[dict] = mapped_column(JSON, default=dict)
    # slots taken (annotations with a slot); changed in the same transaction as the slot, so the next-item query
    # finds open items through an index instead of counting annotations for every item
    filled: Mapped[int] = mapped_column(Integer, default=0)
    batch: Mapped[Batch] = relationship(back_populates="items")


class Annotation(Base):
    """One annotator's work on one item: a draft, then exactly one submit (or skip).

    `slot` (0..overlap-1, unique per item) is what caps how many annotators an item gets: two annotators racing for
    the last slot cannot both win, on SQLite and PostgreSQL alike. A skip frees its slot (slot = NULL).
    """

    __tablename__ = "annotations"
    __table_args__ = (
        UniqueConstraint("item_id", "annotator_id", name="uq_annotations_item_annotator"),
        UniqueConstraint("item_id", "slot", name="uq_annotations_item_slot"),
        Index("ix_annotations_annotator_status", "annotator_id", "status"),
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    item_id: Mapped[int] = mapped_column(ForeignKey("items.id", ondelete="CASCADE"))
    annotator_id: Mapped[int] = mapped_column(ForeignKey("annotators.id", ondelete="CASCADE"))
    slot: Mapped[int | None] = mapped_column(Integer, nullable=True)
    status: Mapped[str] = mapped_column(String(16), default="draft")  # draft | submitted | skipped
    feedback: Mapped[dict] = mapped_column(JSON, default=dict)
    submission_id: Mapped[str | None] = mapped_column(String(64), unique=True, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    submitted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    item: Mapped[Item] = relationship()
    annotator: Mapped[Annotator] = relationship()


def database_url(db: str | None) -> str:
    """A SQLAlchemy URL from `--db`: a URL as is, anything else a SQLite file path (default runs/feedback.db)."""
    db = db or DEFAULT_DB
    if "://" in db:
        if db.startswith("postgresql://"):
            db = "postgresql+psycopg://" + db[len("postgresql://") :]
        return db
    return f"sqlite:///{Path(db)}"


SYNCHRONOUS = ("normal", "full")
MAX_REQUESTS = 64  # requests the server handles at once (more get 503): bounds PostgreSQL connections


def make_engine(db: str | None, synchronous: str = "normal", background_checkpoints: bool = False) -> Engine:
    """`background_checkpoints`: SQLite only; this engine's connections never checkpoint the WAL themselves (the
    caller runs a `WalCheckpointer`)."""
    url = make_url(database_url(db))
    if url.get_backend_name() == "sqlite":
        if url.database and url.database != ":memory:":
            Path(url.database).parent.mkdir(parents=True, exist_ok=True)
        if synchronous not in SYNCHRONOUS:
            raise UserError(f"synchronous must be one of {', '.join(SYNCHRONOUS)}, got '{synchronous}'")
        # never wait for a pooled connection: a request holds its session until its answer is serialized, and
        # waiting here while others wait for a worker thread could deadlock; sqlite connections are cheap
        engine = create_engine(
            url, connect_args={"check_same_thread": False, "timeout": 30}, pool_size=8, max_overflow=-1
        )

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute(f"PRAGMA synchronous={synchronous.upper()}")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA busy_timeout=30000")
            if background_checkpoints:
                cursor.execute("PRAGMA wal_autocheckpoint=0")
                cursor.execute(f"PRAGMA journal_size_limit={32 << 20}")  # a WAL started over shrinks to 32 MB
            cursor.close()

        return engine
    if url.get_backend_name() != "postgresql":
        raise UserError(
            f"--db: unsupported database '{url.get_backend_name()}' (use a SQLite path or postgresql://)"
        )
    # `rlhf label serve` caps concurrent requests at MAX_REQUESTS, so the pool never has to make one wait
    return create_engine(url, pool_size=8, max_overflow=MAX_REQUESTS, pool_pre_ping=True)


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest Alembic revision (idempotent; run on every start)."""
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "head")


_write_locks: weakref.WeakKeyDictionary[Engine, threading.Lock] = weakref.WeakKeyDictionary()


def writer_lock(engine: Engine) -> threading.Lock:
    """This process's lock around write transactions on a SQLite database. SQLite admits one writer at a time, and
    a writer that finds the database locked sleeps in SQLite's busy handler (1, 2, 5, 10 ... ms) and polls again;
    queueing this process's writers on a lock instead wakes each one as soon as the previous commits. Other
    processes (the CLI) still meet the busy handler."""
    lock = _write_locks.get(engine)
    if lock is None:
        lock = _write_locks.setdefault(engine, threading.Lock())
    return lock


class WalCheckpointer(threading.Thread):
    """Checkpoints of a SQLite WAL every `every` seconds, on its own connection, off the request path.

    A PASSIVE checkpoint never waits for readers or writers: it copies what it can while requests keep committing
    (SQLite releases the GIL while it works). But SQLite only starts the WAL file over when a write begins with
    every frame copied, which steady writes never allow (they commit while the copy runs): the WAL would grow
    without end. So once the WAL holds more than `restart_frames`, the few frames committed during the PASSIVE copy
    are copied with this process's writers paused on `writer_lock` (`longest_pause` records how long), and the
    next write starts the WAL over. `stop()` runs a last checkpoint and truncates the WAL."""

    def __init__(
        self, engine: Engine, synchronous: str = "normal", every: float = 0.25, restart_frames: int = 8192
    ):
        super().__init__(name="wal-checkpointer", daemon=True)
        self.engine, self.path = engine, engine.url.database
        self.synchronous, self.every, self.restart_frames = synchronous, every, restart_frames
        self.checkpoints = 0  # checkpoints run
        self.longest_pause = 0.0  # seconds the writers waited for a checkpoint
        self._stop_event = threading.Event()

    def run(self) -> None:
        conn = sqlite3.connect(self.path, timeout=30, check_same_thread=False)
        try:
            conn.execute(f"PRAGMA synchronous={self.synchronous.upper()}")
            while not self._stop_event.wait(self.every):
                _busy, frames, _copied = self._checkpoint(conn, "PASSIVE")
                if frames > self.restart_frames:  # copy what came in meanwhile, with the writers paused
                    with writer_lock(self.engine):
                        start = time.perf_counter()
                        self._checkpoint(conn, "PASSIVE")
                        self.longest_pause = max(self.longest_pause, time.perf_counter() - start)
            self._checkpoint(conn, "TRUNCATE")
        finally:
            conn.close()

    def _checkpoint(self, conn: sqlite3.Connection, mode: str) -> tuple[int, int, int]:
        try:
            result = conn.execute(f"PRAGMA wal_checkpoint({mode})").fetchone()
        except sqlite3.Error:  # the database is busy or gone: try again next time
            return (1, 0, 0)
        self.checkpoints += 1
        return result

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=30)


def open_database(
    db: str | None, synchronous: str = "normal", background_checkpoints: bool = False
) -> tuple[Engine, sessionmaker]:
    """Engine + session factory of a migrated database."""
    engine = make_engine(db, synchronous, background_checkpoints)
    try:
        migrate(engine)
    except (DBAPIError, OSError) as exc:  # a server that is down, a file we cannot write
        raise UserError(
            f"cannot open database {engine.url.render_as_string(hide_password=True)}: {exc}"
        ) from exc
    return engine, sessionmaker(engine, expire_on_commit=False)
