"""POST /api/items/{id}/submit: strict validation, idempotency, ownership, overlap, skips."""

from __future__ import annotations

import threading

from sqlalchemy import func, select

from rlhf.feedback.store import Annotation, Item


def test_submit_stores_ranking_and_serves_next(env):
    env.batch(n=2)
    item = env.next("alice")
    r = env.submit("alice", item["id"], {"ranks": [2, 1, 4, 3]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["annotation"]["status"] == "submitted"
    assert body["annotation"]["feedback"]["ranks"] == [2, 1, 4, 3]
    assert body["replayed"] is False
    assert body["next"]["id"] != item["id"] and body["next"]["annotation"]["status"] == "draft"
    done = env.submit("alice", body["next"]["id"], {"ranks": [1, 2, 3, 4]}, sid="second-submit-1")
    assert done.status_code == 200 and done.json()["next"] is None  # nothing left, nothing repeated


def test_retry_with_same_submission_id_returns_same_result_without_duplicates(env):
    env.batch(n=3)
    item = env.next("alice")
    first = env.submit("alice", item["id"], {"ranks": [1, 2, 3, 4]}, sid="retry-me-123")
    again = env.submit("alice", item["id"], {"ranks": [4, 3, 2, 1]}, sid="retry-me-123")
    assert again.status_code == 200 and again.json()["replayed"] is True
    assert again.json()["annotation"] == first.json()["annotation"]
    other = env.submit("alice", item["id"], {"ranks": [1, 2, 3, 4]}, sid="a-different-id")
    assert other.status_code == 409 and "already submitted" in other.json()["error"]
    with env.db() as db:
        assert db.scalar(select(func.count(Annotation.id)).where(Annotation.status == "submitted")) == 1


def test_concurrent_retries_store_once(env):
    env.batch(n=1)
    item = env.next("alice")
    answers = []

    def send():
        answers.append(env.submit("alice", item["id"], {"ranks": [1, 2, 3, 4]}, sid="concurrent-0001"))

    threads = [threading.Thread(target=send) for _ in range(6)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert sorted(r.status_code for r in answers) == [200] * 6
    assert sum(not r.json()["replayed"] for r in answers) == 1
    with env.db() as db:
        assert db.scalar(select(func.count(Annotation.id))) == 1


def test_strict_validation(env):
    env.batch(n=1, forms=("ranking", "rating"), rating_scale=3)
    item = env.next("alice")
    cases = [
        ({"ratings": [1, 2, 3, 1]}, "every response must be ranked"),
        ({"ranks": [1, 2, 3], "ratings": [1, 1, 1, 1]}, "has 3 ranks for 4 responses"),
        ({"ranks": [1, 1, 2, 3], "ratings": [1, 1, 1, 1]}, "share rank 1 but are not declared a tie"),
        ({"ranks": [1, 1, 3, 4], "ties": [[0, 1]], "ratings": [1, 1, 1, 1]}, "skip rank 2"),
        ({"ranks": [1, 2, 3, 4], "ties": [[0, 1]], "ratings": [1, 1, 1, 1]}, "declared tied but have ranks"),
        ({"ranks": [1, 2, 3, 4], "ratings": [1, 2, 3, None]}, "rate all 4 responses"),
        ({"ranks": [1, 2, 3, 4], "ratings": [1, 2, 3, 4]}, "4 is outside 1..3"),
        ({"ranks": [1, 2, 3, 4], "ratings": [1, 1, 1, 1], "pairwise": "a"}, "does not ask for pairwise"),
        ({"ranks": [1, 2, 3, 4], "ratings": [1, 1, 1, 1], "critique": "x"}, "does not ask for critique"),
        ({"ranks": [1, 2, 3, 0], "ratings": [1, 1, 1, 1]}, "out of range"),
    ]
    for body, message in cases:
        r = env.submit("alice", item["id"], body, sid="strict-check-1")
        assert r.status_code == 422, (body, r.text)
        assert message in r.json()["error"], (body, r.json())
    ok = env.submit(
        "alice", item["id"], {"ranks": [1, 1, 2, 2], "ties": [[0, 1], [2, 3]], "ratings": [3, 3, 1, 2]}
    )
    assert ok.status_code == 200, ok.text
    assert ok.json()["annotation"]["feedback"]["ties"] == [[0, 1], [2, 3]]


def test_schema_errors_are_clear_json(env):
    env.batch(n=1)
    item = env.next("alice")
    bad_id = env.client.post(
        f"/api/items/{item['id']}/submit",
        json={"submission_id": "x", "ranks": [1, 2, 3, 4]},
        headers=env.headers("alice"),
    )
    assert bad_id.status_code == 422 and "submission_id" in bad_id.json()["error"]
    extra = env.submit("alice", item["id"], {"ranks": [1, 2, 3, 4], "sneaky": 1})
    assert extra.status_code == 422 and "sneaky" in extra.json()["error"]
    flag = env.submit("alice", item["id"], {"ranks": [1, 2, 3, 4], "flags": ["<b>"]})
    assert flag.status_code == 422 and flag.json()["problems"][0]["field"].startswith("flags")


def test_others_items_and_overlap(env):
    env.batch(n=1, overlap=2)
    item = env.next("alice")
    assert env.next("bob")["id"] == item["id"]  # overlap 2: the same item for a second annotator
    assert env.next("carol") is None  # ... but not a third
    r = env.submit("carol", item["id"], {"ranks": [1, 2, 3, 4]})
    assert r.status_code == 409 and "already has its 2 annotator(s)" in r.json()["error"]
    missing = env.submit("alice", 999, {"ranks": [1, 2, 3, 4]})
    assert missing.status_code == 404
    anonymous = env.client.post(f"/api/items/{item['id']}/submit", json={"submission_id": "abcdefgh"})
    assert anonymous.status_code == 401
    # a submission id is the submitter's: bob cannot replay alice's
    env.submit("alice", item["id"], {"ranks": [1, 2, 3, 4]}, sid="alice-owns-this")
    stolen = env.submit("bob", item["id"], {"ranks": [1, 2, 3, 4]}, sid="alice-owns-this")
    assert stolen.status_code == 409


def test_skip_frees_the_slot_and_keeps_flags(env):
    env.batch(n=1, overlap=1)
    item = env.next("alice")
    r = env.submit("alice", item["id"], {"skip": True, "flags": ["unsafe"]})
    assert r.status_code == 200 and r.json()["annotation"]["status"] == "skipped"
    assert r.json()["annotation"]["feedback"] == {"flags": ["unsafe"]}
    assert r.json()["next"] is None  # alice never sees it again
    assert env.next("bob")["id"] == item["id"]  # the skip handed it on
    with env.db() as db:
        assert db.get(Item, item["id"]).filled == 1


def test_submit_claims_a_free_item_directly(env):
    env.batch(n=2)
    with env.db() as db:
        second = db.scalar(select(Item.id).where(Item.position == 1))
    r = env.submit("bob", second, {"ranks": [4, 3, 2, 1]})
    assert r.status_code == 200 and r.json()["annotation"]["item_id"] == second


def test_a_text_only_batch_needs_some_text(env):
    env.batch(n=1, forms=("demonstration", "critique"))
    item = env.next("alice")
    empty = env.submit("alice", item["id"], {"demonstration": "   "})
    assert empty.status_code == 422 and "nothing to submit" in empty.json()["error"]
    ok = env.submit("alice", item["id"], {"demonstration": "A kind story."})
    assert ok.status_code == 200
    assert ok.json()["annotation"]["feedback"] == {"demonstration": "A kind story.", "flags": []}
