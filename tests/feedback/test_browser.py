"""A real browser (Playwright driving Debian's Chromium) on a real server on loopback.

An annotator logs in, ranks 4 responses with the keyboard and by dragging, declares a tie with the T key, waits for
the autosaved draft, submits,
and the database holds exactly that ranking. Responses carrying <script> and <img onerror> show as text and run
nothing. The test saves its screenshot of the page as docs/img/annotator.png.
"""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest
import uvicorn
from sqlalchemy import select

from rlhf.data.records import Response, SampleRecord
from rlhf.feedback import service
from rlhf.feedback.app import create_app
from rlhf.feedback.schemas import FORMS
from rlhf.feedback.store import Annotation, open_database

SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "img" / "annotator.png"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
RESPONSES = [
    "Once upon a time a little fox found a lost hen and walked her home. They became friends.",
    "<script>window.__pwned = 'script'</script>The fox was kind to everyone in the wood.",
    "<img src=x onerror=\"window.__pwned = 'img'\">A sad fox sat alone in the dark.",
    "The fox smiled & laughed <b>loudly</b>, and the sun came out over the hill.",
]


def chromium() -> str:
    path = shutil.which("chromium") or "/usr/bin/chromium"
    if not os.path.exists(path):
        if os.environ.get("CI"):
            pytest.fail("CI must install Debian's chromium (.ci/run)")
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    return path


@pytest.fixture
def live(db_path):
    engine, sessions = open_database(str(db_path))
    with sessions() as db:
        first = SampleRecord(
            "fox-1", "Tell me a short story about a kind fox.", [Response(t) for t in RESPONSES]
        )
        second = SampleRecord(
            "fox-2", "Tell me another one.", [Response(f"Another story {j}.") for j in range(4)]
        )
        service.import_batch(db, "stories", [first], ["ranking", "critique"])
        service.import_batch(db, "more-stories", [second], list(FORMS), rating_scale=5)
        _, token = service.create_annotator(db, "alice")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(create_app(sessions=sessions), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", sessions, token
    server.should_exit = True
    thread.join(timeout=10)
    engine.dispose()


def _feedback(sessions, n: int = 0) -> tuple[str, dict]:
    with sessions() as db:
        ann = db.scalars(select(Annotation).order_by(Annotation.id)).all()[n]
        return ann.status, ann.feedback


def test_rank_by_keyboard_and_drag_then_submit(live):
    from playwright.sync_api import expect, sync_playwright

    url, sessions, token = live
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium(), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1000, "height": 900})
        errors = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(url + "/")
        expect(page).to_have_url(url + "/login")
        page.fill("#token", token)
        page.click("#login-button")
        cards = page.locator("#responses > li")
        expect(cards).to_have_count(4)
        expect(page.locator("#prompt-id")).to_have_text("fox-1")

        # untrusted text is shown as text, and nothing in it ran
        for i, text in enumerate(RESPONSES):
            expect(page.locator(f'#responses > li[data-index="{i}"] .text')).to_have_text(text)
        assert page.locator("#responses img, #responses script, #responses b").count() == 0
        assert page.evaluate("window.__pwned") is None

        # keyboard: response 4 to the top, then response 2 up one -> order 3, 1, 0, 2 (0-based)
        card = page.locator('#responses > li[data-index="3"]')
        card.focus()
        for _ in range(3):
            page.keyboard.press("ArrowUp")
        page.locator('#responses > li[data-index="1"]').focus()
        page.keyboard.press("ArrowUp")
        # drag: response 3 (index 2) above response 1 (index 0) -> order 3, 1, 2, 0
        page.locator('#responses > li[data-index="2"] .handle').drag_to(
            page.locator('#responses > li[data-index="0"]'), target_position={"x": 40, "y": 4}
        )
        order = page.eval_on_selector_all(
            "#responses > li", "cards => cards.map(c => Number(c.dataset.index))"
        )
        assert order == [3, 1, 2, 0]
        expect(page.locator('#responses > li[data-index="3"] .rank')).to_have_text("#1")
        page.locator('#responses > li[data-index="0"]').focus()
        page.keyboard.press("t")  # the last two are equally good: a declared tie
        expect(page.locator('#responses > li[data-index="0"] .rank')).to_have_text("#3")
        page.fill("#critique", "Response 4 is the most cheerful; response 3 is gloomy.")
        expect(page.locator("#save-state")).to_have_text("draft saved", timeout=10_000)
        status, draft = _feedback(sessions)
        assert status == "draft" and draft["ranks"] == [3, 2, 3, 1]  # autosaved before any submit
        page.screenshot(path=str(SCREENSHOT), full_page=True)

        page.click("#submit")
        expect(page.locator("#prompt-id")).to_have_text("fox-2")  # the next item replaced it
        status, stored = _feedback(sessions)
        assert status == "submitted"
        assert stored["ranks"] == [3, 2, 3, 1] and stored["ties"] == [[2, 0]]
        assert stored["critique"].startswith("Response 4 is the most cheerful")
        assert page.evaluate("window.__pwned") is None and errors == []

        # every other form on the next item: rate (1..5), edit a response, pick A/B, write an ideal response
        for i, rating in enumerate([2, 5, 1, 4]):
            page.select_option(f'#responses > li[data-index="{i}"] .rating select', str(rating))
        page.click('#responses > li[data-index="1"] button.edit')
        page.fill('#responses > li[data-index="1"] textarea', "Another story 1, with a happy ending.")
        page.check('input[name="pairwise"][value="b"]')
        page.fill("#demonstration", "The ideal story.")
        page.check('#flags input[value="off_topic"]')
        page.click("#submit")
        expect(page.locator("#done")).to_be_visible()  # nothing left
        status, stored = _feedback(sessions, 1)
        assert status == "submitted"
        assert (
            stored["ratings"] == [2, 5, 1, 4]
            and stored["ranks"] == [1, 2, 3, 4]
            and stored["pairwise"] == "b"
        )
        assert stored["correction"] == {"index": 1, "text": "Another story 1, with a happy ending."}
        assert stored["demonstration"] == "The ideal story." and stored["flags"] == ["off_topic"]
        assert errors == []
        browser.close()
