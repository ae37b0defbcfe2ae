"""Fixtures of the feedback-app tests: a migrated SQLite database per test, an app client, annotators, samples."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine

from rlhf.data.records import Response, SampleRecord
from rlhf.feedback import service
from rlhf.feedback.app import create_app
from rlhf.feedback.store import make_engine, migrate, open_database


def make_samples(n: int = 4, k: int = 4, prefix: str = "p") -> list[SampleRecord]:
    return [
        SampleRecord(
            prompt_id=f"{prefix}{i}",
            prompt=f"Tell me a story about fox number {i}.",
            responses=[
                Response(text=f"Story {j} about fox {i}.", token_ids=[10 + j, 20 + i, 2], policy="sft")
                for j in range(k)
            ],
        )
        for i in range(n)
    ]


@pytest.fixture(scope="session")
def template_db(tmp_path_factory):
    """Migrate once; each test copies the file (Alembic on every test would cost ~0.3 s each)."""
    path = tmp_path_factory.mktemp("template") / "feedback.db"
    engine = make_engine(str(path))
    migrate(engine)
    engine.dispose()
    return path


@pytest.fixture
def db_path(template_db, tmp_path):
    path = tmp_path / "feedback.db"
    shutil.copy(template_db, path)
    return path


@dataclass
class Env:
    client: TestClient
    sessions: object
    tokens: dict[str, str] = field(default_factory=dict)

    def headers(self, who: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[who]}"}

    def db(self):
        return self.sessions()

    def batch(self, name="b1", n=4, k=4, forms=("ranking",), overlap=1, rating_scale=7, samples=None):
        with self.sessions() as db:
            service.import_batch(db, name, samples or make_samples(n, k), list(forms), overlap, rating_scale)

    def next(self, who: str, batch: str | None = None) -> dict | None:
        r = self.client.get(
            "/api/next", params={"batch": batch} if batch else None, headers=self.headers(who)
        )
        assert r.status_code == 200, r.text
        return r.json()["item"]

    def submit(self, who: str, item_id: int, body: dict, sid: str | None = None, batch: str | None = None):
        body = {"submission_id": sid or f"sub-{who}-{item_id}-0001", **body}
        params = {"batch": batch} if batch else None  # which batch the answer's next item comes from
        return self.client.post(
            f"/api/items/{item_id}/submit", json=body, params=params, headers=self.headers(who)
        )


@pytest.fixture
def env(db_path):
    engine, sessions = open_database(str(db_path))
    with sessions() as db:
        tokens = {"admin": service.create_annotator(db, "admin", admin=True)[1]}
        for name in ("alice", "bob", "carol"):
            tokens[name] = service.create_annotator(db, name)[1]
    with TestClient(create_app(sessions=sessions)) as client:
        yield Env(client, sessions, tokens)
    engine.dispose()


# ---------------------------------------------------------------------------------------------------------------
# PostgreSQL: .ci/run starts one and exports RLHF_TEST_POSTGRES_URL. Locally the tests use that URL, else the
# server `source .ci/postgres.sh && start_test_postgres` starts; they skip only when neither exists, never on CI.

LOCAL_POSTGRES = "postgresql+psycopg://rlhf@127.0.0.1:55432/rlhf_test"


def postgres_url() -> str:
    url = os.environ.get("RLHF_TEST_POSTGRES_URL")
    if url:
        return url
    if os.environ.get("CI"):
        pytest.fail(
            "CI is set but RLHF_TEST_POSTGRES_URL is not: .ci/run must start PostgreSQL (.ci/postgres.sh)"
        )
    try:
        import psycopg

        psycopg.connect(LOCAL_POSTGRES.replace("+psycopg", ""), connect_timeout=2).close()
    except Exception as exc:  # noqa: BLE001 - any failure to connect means: no local server
        pytest.skip(f"no PostgreSQL server (set RLHF_TEST_POSTGRES_URL or start .ci/postgres.sh): {exc}")
    return LOCAL_POSTGRES


@pytest.fixture
def pg_url() -> str:
    """An empty PostgreSQL database (the public schema dropped and re-created)."""
    url = postgres_url()
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.exec_driver_sql("DROP SCHEMA public CASCADE")
        conn.exec_driver_sql("CREATE SCHEMA public")
    engine.dispose()
    return url


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, db_path):
    """(engine, session factory) of a migrated database on each backend."""
    url = str(db_path) if request.param == "sqlite" else request.getfixturevalue("pg_url")
    engine, sessions = open_database(url)
    yield engine, sessions
    engine.dispose()
