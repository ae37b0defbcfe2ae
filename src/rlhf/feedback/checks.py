"""Errors of the feedback app and the strict validation of a submit (pure functions: no database).

Errors are `FeedbackError`s carrying an HTTP status, so the routes stay thin and the CLI prints them as one line.
"""

from __future__ import annotations

from typing import Protocol

from rlhf.data.records import ranking_error
from rlhf.errors import UserError
from rlhf.feedback.schemas import FeedbackIn, SubmitIn


class FeedbackError(UserError):
    status = 400


class NotFound(FeedbackError):
    status = 404


class Forbidden(FeedbackError):
    status = 403


class Conflict(FeedbackError):
    status = 409


class Invalid(FeedbackError):
    status = 422


class BatchForms(Protocol):
    name: str
    forms: list[str]
    rating_scale: int


def feedback_dict(fb: FeedbackIn) -> dict:
    """The feedback fields a client sent (not the submit's id or skip), as JSON-ready values."""
    return fb.model_dump(include=set(FeedbackIn.model_fields), exclude_none=True, mode="json")


FIELD_FORM = {
    "ranks": "ranking",
    "ties": "ranking",
    "ratings": "rating",
    "pairwise": "pairwise",
    "correction": "correction",
    "demonstration": "demonstration",
    "critique": "critique",
}


def check_submit(responses: list[dict], batch: BatchForms, body: SubmitIn) -> dict:
    """Strict validation of a submit against the item's responses and its batch; returns the feedback to store."""
    fb = feedback_dict(body)
    for field in ("demonstration", "critique", "note"):
        if field in fb and not fb[field].strip():
            del fb[field]  # an empty text box means "not given"
    if fb.get("ties") == []:
        del fb["ties"]
    for field, form in FIELD_FORM.items():
        if field in fb and form not in batch.forms:
            raise Invalid(f"field '{field}': batch '{batch.name}' does not ask for {form} feedback")
    if body.skip:
        return {key: fb[key] for key in ("flags", "note", "critique") if key in fb}
    k = len(responses)
    if "ranking" in batch.forms:
        ranks = fb.get("ranks")
        if ranks is None:
            raise Invalid("field 'ranks': every response must be ranked")
        problem = ranking_error(ranks, k)
        if problem:
            raise Invalid(f"field 'ranks' {problem}")
        _check_ties(ranks, fb.get("ties", []))
    if "rating" in batch.forms:
        ratings = fb.get("ratings")
        if ratings is None or len(ratings) != k or any(r is None for r in ratings):
            raise Invalid(f"field 'ratings': rate all {k} responses")
        bad = [r for r in ratings if not 1 <= r <= batch.rating_scale]
        if bad:
            raise Invalid(f"field 'ratings': {bad[0]} is outside 1..{batch.rating_scale}")
    if "pairwise" in batch.forms and "pairwise" not in fb:
        raise Invalid("field 'pairwise': choose a, b or tie")
    if not {"ranking", "rating", "pairwise"} & set(batch.forms) and not {
        "correction",
        "demonstration",
        "critique",
    } & set(fb):
        raise Invalid(f"nothing to submit: give at least one of {', '.join(batch.forms)} (or skip)")
    if "correction" in fb:
        index, text = fb["correction"]["index"], fb["correction"]["text"]
        if index >= k:
            raise Invalid(f"field 'correction.index' is {index}; the item has {k} responses")
        if not text.strip() or text == responses[index]["text"]:
            raise Invalid("field 'correction.text' is empty or unchanged")
    return fb


def _check_ties(ranks: list[int], ties: list[list[int]]) -> None:
    """Equal ranks are allowed only as declared tie groups: each group shares one rank and holds all of it."""
    k, declared = len(ranks), set()
    for group in ties:
        if len(group) < 2 or len(set(group)) != len(group) or any(i >= k for i in group):
            raise Invalid(f"field 'ties': group {group} must list 2+ distinct response indices below {k}")
        if declared & set(group):
            raise Invalid(f"field 'ties': response {sorted(declared & set(group))[0]} is in two tie groups")
        declared |= set(group)
        if len({ranks[i] for i in group}) != 1:
            raise Invalid(
                f"field 'ties': responses {group} are declared tied but have ranks {[ranks[i] for i in group]}"
            )
    groups = {frozenset(g) for g in ties}
    for rank in sorted(set(ranks)):
        holders = frozenset(i for i, r in enumerate(ranks) if r == rank)
        if len(holders) > 1 and holders not in groups:
            raise Invalid(
                f"field 'ranks': responses {sorted(holders)} share rank {rank} but are not declared a tie"
            )
