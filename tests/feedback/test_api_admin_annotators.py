"""/api/admin/annotators: admins create annotators (each gets a token once) and list them."""

from __future__ import annotations


def test_admin_creates_an_annotator_whose_token_works(env):
    r = env.client.post("/api/admin/annotators", json={"name": "dave"}, headers=env.headers("admin"))
    assert r.status_code == 201 and r.json()["name"] == "dave" and r.json()["admin"] is False
    token = r.json()["token"]
    assert env.client.get("/api/me", headers={"Authorization": f"Bearer {token}"}).json()["name"] == "dave"
    listed = env.client.get("/api/admin/annotators", headers=env.headers("admin")).json()
    assert [a["name"] for a in listed] == ["admin", "alice", "bob", "carol", "dave"]
    assert all("token" not in a for a in listed)


def test_errors(env):
    dup = env.client.post("/api/admin/annotators", json={"name": "alice"}, headers=env.headers("admin"))
    assert dup.status_code == 409 and "already exists" in dup.json()["error"]
    bad = env.client.post("/api/admin/annotators", json={"name": "<script>"}, headers=env.headers("admin"))
    assert bad.status_code == 422 and bad.json()["error"].startswith("field 'name'")
    for method in ("GET", "POST"):
        r = env.client.request(
            method, "/api/admin/annotators", json={"name": "eve"}, headers=env.headers("alice")
        )
        assert r.status_code == 403 and r.json() == {"error": "admins only"}
    assert env.client.get("/api/admin/annotators").status_code == 401
