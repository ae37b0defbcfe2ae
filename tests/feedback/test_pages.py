"""Server-rendered pages, static files, security headers and the OpenAPI schema."""

from __future__ import annotations


def test_pages_need_a_login(env):
    r = env.client.get("/", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/login"
    login = env.client.get("/login")
    assert login.status_code == 200 and 'id="token"' in login.text and "/static/login.js" in login.text


def test_annotator_page_and_admin_page(env):
    env.batch("evening-stories", n=2, overlap=2)
    env.client.post("/api/session", json={"token": env.tokens["alice"]})
    page = env.client.get("/")
    assert page.status_code == 200 and 'id="responses"' in page.text and "/static/annotate.js" in page.text
    assert "<script>" not in page.text.replace('<script src="/static/common.js"></script>', "").replace(
        '<script src="/static/annotate.js"></script>', ""
    )  # no inline script at all: the CSP forbids it
    assert env.client.get("/admin").status_code == 403
    env.client.post("/api/session", json={"token": env.tokens["admin"]})
    admin = env.client.get("/admin")
    assert (
        admin.status_code == 200
        and "evening-stories" in admin.text
        and "0</strong> of 4 submits" in admin.text
    )


def test_security_headers_on_every_answer(env):
    for path in ("/login", "/api/me", "/openapi.json", "/static/annotate.js"):
        r = env.client.get(path)
        csp = r.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "default-src 'none'" in csp and "unsafe-inline" not in csp
        assert r.headers["x-content-type-options"] == "nosniff"


def test_openapi_schema(env):
    schema = env.client.get("/openapi.json").json()
    assert schema["info"]["title"] == "rlhf feedback"
    for path in (
        "/api/next",
        "/api/items/{item_id}/submit",
        "/api/items/{item_id}/draft",
        "/api/admin/batches",
    ):
        assert path in schema["paths"]
    submit = schema["components"]["schemas"]["SubmitIn"]
    assert "submission_id" in submit["required"]
    assert env.client.get("/docs").status_code == 404  # no CDN-loaded Swagger UI


def test_static_script_renders_model_text_as_text():
    """The page script never turns model text into HTML: no innerHTML, insertAdjacentHTML or document.write."""
    from rlhf.feedback.app import HERE

    for script in (HERE / "static").glob("*.js"):
        code = script.read_text()
        for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
            assert sink not in code, f"{script.name} uses {sink}"
