"""The fast lane (fastlane.FastLane) answers the annotator loop exactly as the FastAPI routes do."""

from __future__ import annotations

import re
import shutil

from fastapi.testclient import TestClient

from rlhf.feedback import service
from rlhf.feedback.app import create_app
from rlhf.feedback.fastlane import FastLane
from rlhf.feedback.store import open_database

from .conftest import make_samples

STAMP = re.compile(r"\d{4}-\d\d-\d\dT[0-9:.]+(Z|[+-]\d\d:\d\d)?")


def _conversation(db_path, fast: bool, monkeypatch) -> tuple[list, int]:
    """A scripted annotator session: every answer (status, body with timestamps blanked), and how many requests
    the fast lane answered itself."""
    answered = []
    original = FastLane._answer

    async def counting(self, *args):
        answered.append(1)
        return await original(self, *args)

    monkeypatch.setattr(FastLane, "_answer", counting)
    if not fast:
        monkeypatch.setattr(
            FastLane, "__call__", lambda self, scope, receive, send: self.app(scope, receive, send)
        )
    engine, sessions = open_database(str(db_path))
    with sessions() as db:
        service.import_batch(db, "b", make_samples(n=3), ["ranking"], overlap=1)
        service.import_batch(db, "c", make_samples(n=1, prefix="q"), ["ranking"], overlap=1)
        alice = {"Authorization": f"Bearer {service.create_annotator(db, 'alice')[1]}"}
        bob = {"Authorization": f"Bearer {service.create_annotator(db, 'bob')[1]}"}
    out = []
    with TestClient(create_app(sessions=sessions)) as client:

        def record(r):
            out.append((r.status_code, r.headers.get("content-type"), STAMP.sub("T", r.text)))
            return r.json() if r.headers.get("content-type") == "application/json" else None

        item = record(client.get("/api/next", headers=alice))["item"]  # the first request authenticates
        record(client.get("/api/next", headers=alice))  # the open draft again
        record(client.get("/api/next?batch=c", headers=alice))
        record(client.get("/api/next?batch=nope", headers=alice))  # 404
        record(client.get("/api/next?batch=" + "x" * 65, headers=alice))  # 422 (query length)
        record(client.get("/api/next?other=1", headers=alice))
        record(client.get("/api/next", headers={"Authorization": "Bearer not-a-token-at-all"}))  # 401
        url = f"/api/items/{item['id']}/submit"
        record(
            client.post(url, json={"submission_id": "s-000001", "ranks": [1, 1, 2, 3]}, headers=alice)
        )  # 422
        record(client.post(url, json={"submission_id": "s-000001", "ranks": [1, 2]}, headers=alice))  # 422
        record(
            client.post(url, json={"submission_id": "bad", "ranks": [1, 2, 3, 4]}, headers=alice)
        )  # schema
        record(client.post(url, content=b"{not json", headers={**alice, "Content-Type": "application/json"}))
        record(
            client.post(url, json={"submission_id": "s-000001", "ranks": [2, 1, 4, 3]}, headers=bob)
        )  # 409
        first = record(
            client.post(url, json={"submission_id": "s-000001", "ranks": [2, 1, 4, 3]}, headers=alice)
        )
        record(
            client.post(url, json={"submission_id": "s-000001", "ranks": [2, 1, 4, 3]}, headers=alice)
        )  # replay
        record(
            client.post(url, json={"submission_id": "s-000002", "ranks": [2, 1, 4, 3]}, headers=alice)
        )  # 409
        nxt = f"/api/items/{first['next']['id']}/submit?batch=b"
        record(
            client.post(
                nxt, json={"submission_id": "s-000003", "skip": True, "flags": ["unsafe"]}, headers=alice
            )
        )
        record(
            client.post("/api/items/99999/submit", json={"submission_id": "s-000004"}, headers=alice)
        )  # 404
        client.cookies.set("rlhf_token", bob["Authorization"][7:])
        record(client.get("/api/next"))  # bob by cookie
    engine.dispose()
    return out, len(answered)


def test_the_fast_lane_answers_exactly_as_the_routes(template_db, tmp_path, monkeypatch):
    answers = {}
    for fast in (False, True):
        path = tmp_path / f"{fast}.db"
        shutil.copy(template_db, path)
        with monkeypatch.context() as patch:
            answers[fast] = _conversation(path, fast, patch)
    (routes, none), (lane, answered) = answers[False], answers[True]
    assert none == 0 and answered == 11  # all but the 7 a route must answer: first tokens, odd requests
    assert lane == routes
    statuses = " ".join(str(status) for status, _, _ in lane)
    assert statuses == "200 200 200 404 422 200 401 422 422 422 422 409 200 200 409 200 404 200"
