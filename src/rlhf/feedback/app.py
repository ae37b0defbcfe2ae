"""FastAPI routes: thin. Each parses its input, gets the session and the acting user injected, calls one domain
function of `service` and shapes the answer with a Public schema.

Authorization lives in the two dependencies `current_user` (a valid token: header `Authorization: Bearer <token>`
or the `rlhf_token` cookie set by /login) and `admin_user`; annotator endpoints only ever reach the caller's rows.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated

import anyio.to_thread
from fastapi import APIRouter, Depends, FastAPI, Header, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from rlhf import __version__
from rlhf.errors import UserError
from rlhf.feedback import export, progress, schemas, service
from rlhf.feedback.fastlane import (
    COOKIE,
    FastLane,
    json_response,
    next_response,
    replaying,
    run_hot,
    submit_response,
)
from rlhf.feedback.service import Actor
from rlhf.feedback.store import Annotator, open_database

HERE = Path(__file__).parent
BODY_LIMIT = 256 * 1024  # bytes of one request body: a submit with three 20,000-character texts fits
IMPORT_LIMIT = 64 * 1024 * 1024  # bytes of one batch import
SECURITY_HEADERS = [
    (
        b"content-security-policy",
        b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
        b"form-action 'self'; base-uri 'none'; frame-ancestors 'none'",
    ),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
]
templates = Jinja2Templates(directory=HERE / "templates")


# ---------------------------------------------------------------------------------------------------------------
# Dependencies: the session and the acting user


async def get_db(request: Request) -> AsyncIterator[Session]:
    """A session per request. Async only so FastAPI does not hop threads to open it: a Session connects lazily,
    inside the (sync, thread-pooled) route that uses it."""
    db = request.app.state.sessions()
    try:
        yield db
    finally:
        db.close()


DB = Annotated[Session, Depends(get_db)]


def _authenticate(sessions: sessionmaker, token: str) -> Actor | None:
    with sessions() as db:  # its own short session: a request waiting for a worker thread holds no connection
        return service.authenticate(db, token)


async def current_user(request: Request, authorization: Annotated[str | None, Header()] = None) -> Actor:
    """The caller, from a bearer token or the session cookie. Tokens and roles never change once issued, so the
    actor is cached per token: only a token's first request reads the database."""
    token = request.cookies.get(COOKIE)
    if authorization:
        scheme, _, value = authorization.partition(" ")
        token = value.strip() if scheme.lower() == "bearer" else None
    actors = request.app.state.actors
    user = actors.get(token) if token else None
    if user is None and token:
        user = await run_in_threadpool(_authenticate, request.app.state.sessions, token)
        if user is not None and len(actors) < 100_000:
            actors[token] = user
    if user is None:
        raise HTTPException(401, "not logged in: send 'Authorization: Bearer <token>' or log in at /login")
    return user


async def admin_user(user: Annotated[Actor, Depends(current_user)]) -> Actor:
    if not user.is_admin:
        raise HTTPException(403, "admins only")
    return user


_json = json_response


User = Annotated[Actor, Depends(current_user)]
Admin = Annotated[Actor, Depends(admin_user)]

# ---------------------------------------------------------------------------------------------------------------
# Annotator API

api = APIRouter(prefix="/api")


@api.post("/session", response_model=schemas.AnnotatorPublic, tags=["session"])
def login(body: schemas.SessionCreate, db: DB, response: Response):
    """Exchange a token for an HttpOnly, SameSite=Strict session cookie (what the browser pages use)."""
    user = service.authenticate(db, body.token)
    if user is None:
        raise HTTPException(401, "unknown token")
    response.set_cookie(COOKIE, body.token, httponly=True, samesite="strict", max_age=30 * 24 * 3600)
    return service.public_annotator(db.get(Annotator, user.id))


@api.delete("/session", status_code=204, tags=["session"])
def logout(response: Response):
    response.delete_cookie(COOKIE, httponly=True, samesite="strict")


@api.get("/me", response_model=schemas.AnnotatorPublic, tags=["session"])
def me(db: DB, user: User):
    return service.public_annotator(db.get(Annotator, user.id))


@api.get("/next", response_model=schemas.NextOut, tags=["annotate"])
async def next_item(
    request: Request, db: DB, user: User, batch: Annotated[str | None, Query(max_length=64)] = None
):
    """Your open draft, else a new item claimed for you (never one you saw; never beyond the batch's overlap)."""
    return await run_hot(request.app.state, lambda: next_response(db, user, batch))


@api.get("/items/{item_id}", response_model=schemas.ItemPublic, tags=["annotate"])
async def get_item(item_id: int, request: Request, db: DB, user: User):
    return await run_hot(
        request.app.state, lambda: _json(service.public_item(db, *service.own_item(db, user, item_id), user))
    )


@api.put("/items/{item_id}/draft", response_model=schemas.AnnotationPublic, tags=["annotate"])
async def save_draft(item_id: int, body: schemas.FeedbackIn, request: Request, db: DB, user: User):
    """Save unfinished work; partial answers are fine."""

    def work() -> Response:
        return _json(service.public_annotation(service.save_draft(db, user, item_id, body), user.name))

    return await run_hot(request.app.state, work)


@api.post("/items/{item_id}/submit", response_model=schemas.SubmitOut, tags=["annotate"])
async def submit(
    item_id: int, body: schemas.SubmitIn, request: Request, db: DB, user: User, batch: str | None = None
):
    """Submit (or skip) and claim your next item in one transaction. Retrying with the same submission_id returns
    the stored result."""
    return await run_hot(request.app.state, lambda: submit_response(db, user, item_id, body, batch))


# ---------------------------------------------------------------------------------------------------------------
# Admin API


@api.get("/admin/annotators", response_model=list[schemas.AnnotatorPublic], tags=["admin"])
def list_annotators(db: DB, _: Admin):
    return [service.public_annotator(a) for a in service.list_annotators(db)]


@api.post("/admin/annotators", response_model=schemas.AnnotatorCreated, status_code=201, tags=["admin"])
def create_annotator(body: schemas.AnnotatorCreate, db: DB, _: Admin):
    annotator, token = service.create_annotator(db, body.name, body.admin)
    return schemas.AnnotatorCreated(**service.public_annotator(annotator).model_dump(), token=token)


@api.get("/admin/batches", response_model=list[schemas.BatchPublic], tags=["admin"])
def list_batches(db: DB, _: Admin):
    return [service.public_batch(db, b) for b in service.list_batches(db)]


@api.post("/admin/batches", response_model=schemas.BatchPublic, status_code=201, tags=["admin"])
def import_batch(body: schemas.BatchCreate, db: DB, _: Admin):
    """Import `rlhf sample` records (one object per JSONL line) as a labelling batch."""
    samples = service.samples_from_objects([s.model_dump() for s in body.samples])
    batch = service.import_batch(
        db, body.name, samples, body.forms, body.overlap, body.rating_scale, "upload"
    )
    return service.public_batch(db, batch)


@api.get("/admin/batches/{name}", response_model=schemas.BatchStatus, tags=["admin"])
def batch_status(name: str, db: DB, _: Admin):
    """Progress per annotator and inter-annotator agreement on overlapping items."""
    return progress.batch_status(db, service.get_batch(db, name))


@api.get("/admin/batches/{name}/annotations", response_model=list[schemas.AnnotationPublic], tags=["admin"])
def batch_annotations(name: str, db: DB, _: Admin, status: str | None = None):
    rows = progress.batch_annotations(db, service.get_batch(db, name), status)
    return [service.public_annotation(ann, annotator) for _, ann, annotator in rows]


@api.get("/admin/batches/{name}/export", tags=["admin"])
def export_batch(name: str, db: DB, _: Admin) -> dict:
    """Comparisons, demonstrations, critiques and TRL pairs as JSON (the CLI writes the same as JSONL files)."""
    data = export.collect(db, service.get_batch(db, name))
    return {
        "comparisons": data.comparisons,
        "demonstrations": data.demonstrations,
        "critiques": data.critiques,
        "trl_pairs": data.trl_pairs(),
    }


# ---------------------------------------------------------------------------------------------------------------
# Pages (server-rendered; the annotator page's script is static/annotate.js)

pages = APIRouter(include_in_schema=False)


def _page_user(request: Request, db: Session) -> Actor | None:
    return service.authenticate(db, request.cookies.get(COOKIE))


@pages.get("/login", response_class=HTMLResponse)
def login_page(request: Request):
    return templates.TemplateResponse(request, "login.html", {"title": "Log in"})


@pages.get("/", response_class=HTMLResponse)
def annotate_page(request: Request, db: DB):
    user = _page_user(request, db)
    if user is None:
        return RedirectResponse("/login", status_code=303)
    return templates.TemplateResponse(request, "annotate.html", {"title": "Annotate", "user": user})


@pages.get("/admin", response_class=HTMLResponse)
def admin_page(request: Request, db: DB):
    user = _page_user(request, db)
    if user is None:
        return RedirectResponse("/login", status_code=303)
    if not user.is_admin:
        raise HTTPException(403, "admins only")
    statuses = [progress.batch_status(db, b) for b in service.list_batches(db)]
    annotators = service.list_annotators(db)
    return templates.TemplateResponse(
        request,
        "admin.html",
        {"title": "Admin", "user": user, "statuses": statuses, "annotators": annotators},
    )


@pages.get("/healthz")
async def healthz():
    return {"ok": True}


# ---------------------------------------------------------------------------------------------------------------
# Errors as JSON, body limits, security headers


def _error(status: int, message: str, **extra) -> JSONResponse:
    return JSONResponse({"error": message, **extra}, status_code=status)


async def _user_error(_request: Request, exc: UserError) -> JSONResponse:
    return _error(getattr(exc, "status", 400), str(exc))


async def _http_error(_request: Request, exc: HTTPException) -> JSONResponse:
    return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)


async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
    problems = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        problems.append({"field": where, "message": err.get("msg", "invalid")})
    first = problems[0] if problems else {"field": "", "message": "invalid request"}
    return _error(422, f"field '{first['field']}': {first['message']}", problems=problems)


class Guard:
    """Pure ASGI middleware: rejects oversized bodies with 413 JSON and adds security headers to every answer."""

    def __init__(self, app, limit: int = BODY_LIMIT, large: dict[str, int] | None = None):
        self.app, self.limit, self.large = app, limit, large or {}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_secure(message):
            if message["type"] == "http.response.start":
                message["headers"] = list(message.get("headers", [])) + SECURITY_HEADERS
            await send(message)

        limit = self.large.get(scope["path"], self.limit) if scope["method"] == "POST" else self.limit
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:
            if not length.isdigit() or int(length) > limit:
                return await self._too_large(send_secure, limit)
            return await self.app(scope, receive, send_secure)
        # no Content-Length (chunked): read the body up to the limit, then replay it
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > limit:
                return await self._too_large(send_secure, limit)
        return await self.app(scope, replaying(b"".join(chunks), receive), send_secure)

    @staticmethod
    async def _too_large(send, limit: int) -> None:
        body = json.dumps({"error": f"request body larger than {limit} bytes"}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


# Routes run in a thread pool; SQLite writes one at a time, so more threads than this only add switching.
WORKER_THREADS = 8


@asynccontextmanager
async def _lifespan(_app: FastAPI) -> AsyncIterator[None]:
    anyio.to_thread.current_default_thread_limiter().total_tokens = WORKER_THREADS
    yield


def create_app(db: str | None = None, sessions: sessionmaker | None = None) -> FastAPI:
    """The app on a database URL or path (migrated on open), or on an existing session factory."""
    if sessions is None:
        sessions = open_database(db)[1]
    app = FastAPI(
        title="rlhf feedback",
        version=__version__,
        description="Human feedback for RLHF: rank, rate, compare, correct, demonstrate, critique.",
        docs_url=None,  # Swagger UI would load scripts from a CDN; the schema is at /openapi.json
        redoc_url=None,
        lifespan=_lifespan,
    )
    app.state.sessions = sessions
    app.state.inline = sessions.kw["bind"].dialect.name == "sqlite"  # see fastlane.run_hot
    app.state.actors = {}
    app.include_router(api)
    app.include_router(pages)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    app.add_exception_handler(UserError, _user_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_middleware(FastLane, state=app.state)  # inside Guard: body limits and security headers apply
    app.add_middleware(Guard, limit=BODY_LIMIT, large={"/api/admin/batches": IMPORT_LIMIT})
    return app
