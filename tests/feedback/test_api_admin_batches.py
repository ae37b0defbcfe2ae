"""/api/admin/batches: import, list, status with agreement, everyone's annotations, export; admins only."""

from __future__ import annotations

import pytest


def _import(env, who="admin", **body):
    samples = [
        {"prompt_id": f"p{i}", "prompt": f"Prompt {i}", "responses": [{"text": f"R{j}"} for j in range(4)]}
        for i in range(2)
    ]
    body = {"name": "b1", "forms": ["ranking"], "overlap": 2, "samples": samples, **body}
    return env.client.post("/api/admin/batches", json=body, headers=env.headers(who))


def test_import_and_list(env):
    r = _import(env, forms=["ranking", "critique"], rating_scale=3)
    assert r.status_code == 201, r.text
    assert r.json() | {"id": 0, "created_at": 0} == {
        "id": 0,
        "name": "b1",
        "forms": ["ranking", "critique"],
        "overlap": 2,
        "rating_scale": 3,
        "items": 2,
        "created_at": 0,
    }
    assert [b["name"] for b in env.client.get("/api/admin/batches", headers=env.headers("admin")).json()] == [
        "b1"
    ]
    assert env.next("alice")["forms"] == ["ranking", "critique"]


@pytest.mark.parametrize(
    "body, status, message",
    [
        (
            {"samples": [{"prompt": "p", "responses": ["only one"]}]},
            422,
            "has 1 responses; the app shows 2..9",
        ),
        ({"samples": [{"prompt": "p"}]}, 422, "samples line:1: missing field 'responses'"),
        (
            {"samples": [{"prompt": "p", "responses": [{"txt": 1}, "b"]}]},
            422,
            "responses[0] needs a string field",
        ),
        ({"samples": []}, 422, "field 'samples'"),
        ({"forms": ["vibes"]}, 422, "field 'forms.0'"),
        ({"overlap": 0}, 422, "field 'overlap'"),
        ({"rating_scale": 11}, 422, "field 'rating_scale'"),
        ({"name": "no spaces please"}, 422, "field 'name'"),
    ],
)
def test_import_validation(env, body, status, message):
    r = _import(env, **body)
    assert r.status_code == status and message in r.json()["error"], r.json()


def test_import_conflicts_and_permissions(env):
    assert _import(env).status_code == 201
    assert _import(env).status_code == 409
    assert _import(env, who="alice", name="b2").status_code == 403
    for path in ("/api/admin/batches", "/api/admin/batches/b1", "/api/admin/batches/b1/annotations"):
        assert env.client.get(path, headers=env.headers("alice")).status_code == 403
    assert env.client.get("/api/admin/batches/nope", headers=env.headers("admin")).status_code == 404


def test_status_progress_and_agreement(env):
    _import(env)
    first = env.next("alice")
    assert env.next("bob")["id"] == first["id"]  # a started item is served first, to complete its overlap
    for who, ranks in (("alice", [1, 2, 3, 4]), ("bob", [2, 1, 3, 4])):
        assert env.submit(who, first["id"], {"ranks": ranks}).status_code == 200
    assert env.next("carol") is None  # the submits' answers claimed the other item for alice and bob
    status = env.client.get("/api/admin/batches/b1", headers=env.headers("admin")).json()
    assert status["target"] == 4 and status["submitted"] == 2 and status["complete_items"] == 1
    assert status["drafts"] == 2
    assert status["agreement"]["items"] == 1
    assert status["agreement"]["kendall_tau"] == pytest.approx(4 / 6)
    assert status["agreement"]["pairwise_agreement"] == pytest.approx(5 / 6)
    names = {a["annotator"]: a for a in status["annotators"]}
    assert names["alice"] == {"annotator": "alice", "submitted": 1, "skipped": 0, "drafts": 1}
    work = env.client.get(
        "/api/admin/batches/b1/annotations", params={"status": "submitted"}, headers=env.headers("admin")
    ).json()
    assert sorted((w["annotator"], tuple(w["feedback"]["ranks"])) for w in work) == [
        ("alice", (1, 2, 3, 4)),
        ("bob", (2, 1, 3, 4)),
    ]


def test_export_endpoint(env):
    _import(env, overlap=1)
    item = env.next("alice")
    env.submit("alice", item["id"], {"ranks": [2, 1, 3, 3], "ties": [[2, 3]]})
    out = env.client.get("/api/admin/batches/b1/export", headers=env.headers("admin")).json()
    [comparison] = out["comparisons"]
    assert comparison["ranks"] == [2, 1, 3, 3] and comparison["labeller"] == "annotator:alice"
    assert len(out["trl_pairs"]) == 5  # 6 pairs minus the tie
    r = comparison["responses"]
    assert {(p["chosen"], p["rejected"]) for p in out["trl_pairs"]} == {
        (r[1], r[0]),
        (r[1], r[2]),
        (r[1], r[3]),
        (r[0], r[2]),
        (r[0], r[3]),
    }
    assert env.client.get("/api/admin/batches/b1/export", headers=env.headers("alice")).status_code == 403
