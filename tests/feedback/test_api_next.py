"""GET /api/next: drafts first, never a repeat, overlap respected, per-batch selection."""

from __future__ import annotations


def test_next_returns_the_open_draft_until_it_is_submitted(env):
    env.batch(n=3)
    first = env.next("alice")
    n = first["prompt_id"][1:]
    assert first["annotation"]["status"] == "draft" and first["responses"] == [
        f"Story {j} about fox {n}." for j in range(4)
    ]
    assert env.next("alice")["id"] == first["id"]  # asking again does not claim a second item
    env.submit("alice", first["id"], {"ranks": [1, 2, 3, 4]})
    seen = {first["id"]}
    while (item := env.next("alice")) is not None:
        assert item["id"] not in seen
        seen.add(item["id"])
        assert (
            env.submit("alice", item["id"], {"ranks": [4, 3, 2, 1]}, sid=f"loop-{item['id']}-x").status_code
            == 200
        )
    assert len(seen) == 3


def test_overlap_gives_each_item_to_that_many_annotators(env):
    env.batch(n=2, overlap=2)
    got = {who: [] for who in ("alice", "bob", "carol")}
    for _ in range(3):
        for who in got:
            item = env.next(who)
            if item is not None:
                got[who].append(item["id"])
                env.submit(who, item["id"], {"ranks": [1, 2, 3, 4]}, sid=f"{who}-{item['id']}-overlap")
    counts = {}
    for items in got.values():
        assert len(items) == len(set(items))  # nobody sees an item twice
        for i in items:
            counts[i] = counts.get(i, 0) + 1
    assert sorted(counts.values()) == [2, 2]  # each item exactly `overlap` times


def test_batch_parameter(env):
    env.batch("first", n=1)
    env.batch("second", n=1)
    assert env.next("alice", batch="second")["batch"] == "second"
    assert env.next("bob")["batch"] == "first"  # default: batches in import order
    r = env.client.get("/api/next", params={"batch": "nope"}, headers=env.headers("alice"))
    assert r.status_code == 404 and "no batch named 'nope'" in r.json()["error"]


def test_next_needs_a_login_and_ends_with_null(env):
    assert env.client.get("/api/next").status_code == 401
    assert env.next("alice") is None  # no batches at all
