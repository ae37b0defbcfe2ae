"""The annotator loop's two requests without FastAPI's per-request machinery.

Every annotator sends `POST /api/items/{id}/submit` (which answers with the next item) over and over, plus a
`GET /api/next` to start. For those two, FastAPI's routing, dependency solving (an exit stack per request for the
session, header/cookie/query/body parameters) and exception middleware cost more CPU than the database work.
`FastLane` is a pure ASGI middleware that answers them directly when the request is the ordinary case: a JSON
body that validates, a token the app has already authenticated, known query parameters. It runs the same domain
functions and builds the same responses as the routes (`submit_response`, `next_response`); anything else
(an unknown token, a malformed body, an odd query) goes on to the FastAPI routes, which answer errors exactly as
before and stay the documented API (OpenAPI).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from urllib.parse import parse_qsl

from pydantic import BaseModel, ValidationError
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool
from starlette.requests import cookie_parser
from starlette.responses import JSONResponse, Response

from rlhf.errors import UserError
from rlhf.feedback import schemas, service
from rlhf.feedback.service import Actor

COOKIE = "rlhf_token"
_SUBMIT_PATH = re.compile(r"/api/items/([0-9]{1,18})/submit")


def json_response(model: BaseModel) -> Response:
    """A Public schema built (and so validated) by the route, serialized once: FastAPI would validate it again."""
    return Response(model.model_dump_json(), media_type="application/json")


def next_response(db: Session, user: Actor, batch: str | None) -> Response:
    found = service.next_item(db, user, batch)
    return json_response(
        schemas.NextOut(item=None if found is None else service.public_item(db, *found, user))
    )


def submit_response(
    db: Session, user: Actor, item_id: int, body: schemas.SubmitIn, batch: str | None
) -> Response:
    ann, replayed, found = service.submit_and_next(db, user, item_id, body, batch)
    out = schemas.SubmitOut(
        annotation=service.public_annotation(ann, user.name),
        replayed=replayed,
        next=None if found is None else service.public_item(db, *found, user),
    )
    return json_response(out)


async def run_hot(state, work: Callable[[], Response]) -> Response:
    """Run an annotator-loop request's database work. On SQLite it runs on the event loop itself: SQLite answers in
    well under a millisecond, writes go one at a time anyway, and a hop to a worker thread and back (a queue, two
    wake-ups and the GIL passed between threads) cost more CPU than the query and put GIL switch waits in the tail.
    On PostgreSQL (network round trips) it runs in the thread pool."""
    if state.inline:
        return work()
    return await run_in_threadpool(work)


def replaying(body: bytes, receive: Callable) -> Callable:
    """An ASGI `receive` that hands an app the body a middleware already read, then defers to the real one."""
    replayed = False

    async def replay():
        nonlocal replayed
        if replayed:
            return await receive()
        replayed = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay


class FastLane:
    """Pure ASGI middleware answering the ordinary submit and next-item requests (see the module docstring)."""

    def __init__(self, app, state):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        method, path = scope["method"], scope["path"]
        if method == "POST" and path.startswith("/api/items/"):
            match = _SUBMIT_PATH.fullmatch(path)
            if match:
                return await self._submit(scope, receive, send, int(match.group(1)))
        elif method == "GET" and path == "/api/next":
            user, batch = self._caller(scope)
            if user is not None and (batch is None or len(batch) <= 64):
                return await self._answer(scope, receive, send, lambda db: next_response(db, user, batch))
        return await self.app(scope, receive, send)

    def _caller(self, scope) -> tuple[Actor | None, str | None]:
        """The cached actor of the request's token and its `batch` query parameter; (None, None) when the request
        is anything but ordinary (then the routes decide)."""
        headers = dict(scope["headers"])
        authorization = headers.get(b"authorization")
        if authorization is not None:
            scheme, _, value = authorization.decode("latin-1").partition(" ")
            token = value.strip() if scheme.lower() == "bearer" else None
        else:
            token = cookie_parser(headers.get(b"cookie", b"").decode("latin-1")).get(COOKIE)
        user = self.state.actors.get(token) if token else None
        query = parse_qsl(scope["query_string"].decode("latin-1"), keep_blank_values=True)
        if user is None or any(key != "batch" for key, _ in query) or len(query) > 1:
            return None, None
        return user, query[0][1] if query else None

    async def _submit(self, scope, receive, send, item_id: int):
        chunks, more = [], True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        raw = b"".join(chunks)
        replay = replaying(raw, receive)

        user, batch = self._caller(scope)
        content_type = dict(scope["headers"]).get(b"content-type", b"")
        body = None
        if user is not None and content_type.split(b";")[0].strip() == b"application/json":
            try:
                body = schemas.SubmitIn.model_validate(json.loads(raw))  # as FastAPI parses a JSON body
            except (ValueError, ValidationError):
                body = None
        if body is None:
            return await self.app(scope, replay, send)
        return await self._answer(
            scope, replay, send, lambda db: submit_response(db, user, item_id, body, batch)
        )

    async def _answer(self, scope, receive, send, work: Callable[[Session], Response]):
        db = self.state.sessions()
        try:
            response = await run_hot(self.state, lambda: work(db))
        except UserError as exc:  # as the app's UserError handler answers
            response = JSONResponse({"error": str(exc)}, status_code=getattr(exc, "status", 400))
        finally:
            db.close()
        await response(scope, receive, send)
