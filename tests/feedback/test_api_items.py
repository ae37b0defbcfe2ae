"""GET /api/items/{id} and PUT /api/items/{id}/draft: own work only, lenient drafts, size limits."""

from __future__ import annotations

from rlhf.feedback.app import BODY_LIMIT


def test_draft_is_saved_leniently_and_restored(env):
    env.batch(n=1, forms=("ranking", "rating", "critique", "correction"))
    item = env.next("alice")
    url = f"/api/items/{item['id']}/draft"
    draft = {
        "ranks": [2, None, 1],
        "ratings": [5],
        "critique": "half done",
        "correction": {"index": 1, "text": "B!"},
    }
    r = env.client.put(url, json=draft, headers=env.headers("alice"))
    assert r.status_code == 200 and r.json()["status"] == "draft"
    got = env.client.get(f"/api/items/{item['id']}", headers=env.headers("alice")).json()
    assert got["annotation"]["feedback"]["ranks"] == [2, None, 1]
    assert got["annotation"]["feedback"]["correction"] == {"index": 1, "text": "B!"}
    assert env.next("alice")["annotation"]["feedback"]["critique"] == "half done"  # next serves the draft


def test_draft_validation_and_state(env):
    env.batch(n=1)
    item = env.next("alice")
    url = f"/api/items/{item['id']}/draft"
    too_many = env.client.put(url, json={"ranks": [1, 2, 3, 4, 5]}, headers=env.headers("alice"))
    assert too_many.status_code == 422 and "5 entries for 4 responses" in too_many.json()["error"]
    wrong_type = env.client.put(url, json={"ranks": "first"}, headers=env.headers("alice"))
    assert wrong_type.status_code == 422 and wrong_type.json()["error"].startswith("field 'ranks'")
    env.submit("alice", item["id"], {"ranks": [1, 2, 3, 4]})
    late = env.client.put(url, json={"ranks": [1]}, headers=env.headers("alice"))
    assert late.status_code == 409 and "already submitted" in late.json()["error"]


def test_others_work_is_invisible(env):
    env.batch(n=1)
    item = env.next("alice")
    env.client.put(f"/api/items/{item['id']}/draft", json={"critique": "mine"}, headers=env.headers("alice"))
    for method, body in (("GET", None), ("PUT", {"ranks": [1, 2, 3, 4]})):
        url = f"/api/items/{item['id']}" + ("/draft" if method == "PUT" else "")
        r = env.client.request(method, url, json=body, headers=env.headers("bob"))
        assert r.status_code == 404 and "not one of yours" in r.json()["error"]
    # an admin's own annotator view is scoped the same way; others' work is only under /api/admin
    assert env.client.get(f"/api/items/{item['id']}", headers=env.headers("admin")).status_code == 404


def test_body_size_limits(env):
    env.batch(n=1)
    item = env.next("alice")
    url = f"/api/items/{item['id']}/draft"
    big = {"critique": "x" * (BODY_LIMIT + 10)}
    r = env.client.put(url, json=big, headers=env.headers("alice"))
    assert r.status_code == 413 and "larger than" in r.json()["error"]

    def chunks():  # no Content-Length: the limit still holds
        yield b'{"critique": "'
        for _ in range(BODY_LIMIT // 1000 + 2):
            yield b"y" * 1000
        yield b'"}'

    r = env.client.put(
        url, content=chunks(), headers={**env.headers("alice"), "Content-Type": "application/json"}
    )
    assert r.status_code == 413
    text_limit = env.client.put(url, json={"critique": "z" * 20_001}, headers=env.headers("alice"))
    assert text_limit.status_code == 422 and "critique" in text_limit.json()["error"]
