"""The whole app on PostgreSQL: the HTTP flow, export, and the rule that CI never skips these tests."""

from __future__ import annotations

import os

from fastapi.testclient import TestClient

from rlhf.data.records import read_comparisons
from rlhf.feedback import service
from rlhf.feedback.app import create_app
from rlhf.feedback.cli import main as label
from rlhf.feedback.store import open_database

from .conftest import make_samples


def test_ci_provides_postgres():
    if os.environ.get("CI"):
        assert os.environ.get("RLHF_TEST_POSTGRES_URL"), (
            "CI must export RLHF_TEST_POSTGRES_URL (.ci/postgres.sh)"
        )


def test_http_flow_and_export_on_postgres(pg_url, tmp_path, capsys):
    engine, sessions = open_database(pg_url)
    with sessions() as db:
        service.import_batch(db, "pg", make_samples(n=2), ["ranking", "critique"], overlap=2)
        tokens = {name: service.create_annotator(db, name)[1] for name in ("alice", "bob")}
    with TestClient(create_app(sessions=sessions)) as client:
        headers = {who: {"Authorization": f"Bearer {token}"} for who, token in tokens.items()}
        items = {who: client.get("/api/next", headers=h).json()["item"]["id"] for who, h in headers.items()}
        assert items["alice"] == items["bob"]  # overlap 2: the same item for both
        for who, ranks in (("alice", [1, 2, 3, 4]), ("bob", [1, 3, 2, 4])):
            body = {"submission_id": f"pg-{who}-0001", "ranks": ranks, "critique": f"{who} says hi"}
            url = f"/api/items/{items[who]}/submit"
            first = client.post(url, json=body, headers=headers[who])
            again = client.post(url, json=body, headers=headers[who])
            assert first.status_code == again.status_code == 200 and again.json()["replayed"] is True
    engine.dispose()
    assert label(["export", "--db", pg_url, "--batch", "pg", "--out", str(tmp_path)]) == 0
    records = read_comparisons(tmp_path / "comparisons.jsonl")
    assert sorted(r.ranks for r in records) == [[1, 2, 3, 4], [1, 3, 2, 4]]
    assert {r.meta["critique"] for r in records} == {"alice says hi", "bob says hi"}
    assert label(["status", "--db", pg_url, "--batch", "pg"]) == 0
    assert "tau 0.667" in capsys.readouterr().out  # one swapped pair of six
