"""POST/DELETE /api/session and GET /api/me: tokens, cookies, and what a cross-site form cannot do."""

from __future__ import annotations


def test_login_sets_a_strict_httponly_cookie(env):
    r = env.client.post("/api/session", json={"token": env.tokens["alice"]})
    assert r.status_code == 200 and r.json()["name"] == "alice" and r.json()["admin"] is False
    cookie = r.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie
    assert env.client.get("/api/me").json()["name"] == "alice"  # the cookie authenticates
    assert env.client.delete("/api/session").status_code == 204
    env.client.cookies.clear()
    assert env.client.get("/api/me").status_code == 401


def test_bad_tokens(env):
    assert env.client.post("/api/session", json={"token": "not-a-real-token"}).status_code == 401
    short = env.client.post("/api/session", json={"token": "x"})
    assert short.status_code == 422 and short.json()["error"].startswith("field 'token'")
    r = env.client.get("/api/me", headers={"Authorization": "Bearer nope-nope-nope"})
    assert r.status_code == 401 and "not logged in" in r.json()["error"]
    basic = env.client.get("/api/me", headers={"Authorization": f"Basic {env.tokens['alice']}"})
    assert basic.status_code == 401


def test_me_with_bearer_token(env):
    r = env.client.get("/api/me", headers=env.headers("admin"))
    assert r.status_code == 200 and r.json()["admin"] is True and "token" not in r.json()


def test_a_cross_site_form_post_cannot_submit(env):
    """A form from another site can send text/plain but not JSON: the body is rejected (and the cookie is Strict)."""
    env.batch(n=1)
    item = env.next("alice")
    env.client.post("/api/session", json={"token": env.tokens["alice"]})
    r = env.client.post(
        f"/api/items/{item['id']}/submit",
        content=b'{"submission_id": "csrf-attempt-1", "ranks": [1, 2, 3, 4]}',
        headers={"Content-Type": "text/plain"},
    )
    assert r.status_code == 422
