"""Human labels for the loop: import a round's samples into the feedback app, wait (showing progress) until people
have ranked them, export the comparisons. Speaks to the app only through its database and `rlhf.feedback`."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from rlhf.errors import UserError

log = logging.getLogger("rlhf")


def label_with_app(
    db_url: str, samples: list, batch_name: str, out_dir: Path, overlap: int = 1, poll_seconds: float = 5.0
) -> dict:
    """Import the samples as batch `batch_name` (ranking form, `overlap` annotators per item) of the app at `db_url`,
    poll it every `poll_seconds` until every item is submitted or skipped, export to `out_dir`."""
    from rlhf.feedback import service
    from rlhf.feedback.export import collect, write_export
    from rlhf.feedback.progress import batch_status
    from rlhf.feedback.store import open_database
    from rlhf.tracking import progress

    engine, session = open_database(db_url)
    try:
        with session() as db:
            try:
                batch = service.get_batch(db, batch_name)
                log.info("feedback batch '%s' already imported: waiting for its labels", batch_name)
            except service.NotFound:
                batch = service.import_batch(
                    db, batch_name, samples, forms=["ranking"], overlap=overlap, source="rlhf loop"
                )
            status = batch_status(db, batch)
        log.info(
            "feedback batch '%s': %d items to rank (%d labels). Label them in the app: "
            "`rlhf label serve --db %s` (annotator tokens: `rlhf label annotator --db %s NAME`)",
            batch_name,
            status.batch.items,
            status.target,
            db_url,
            db_url,
        )
        bar = progress(status.target, f"labels {batch_name}", unit="label")
        seen = -1
        while True:
            with session() as db:
                status = batch_status(db, service.get_batch(db, batch_name))
            handled = status.submitted + status.skipped
            bar.update(max(0, min(handled, status.target) - bar.n))
            if handled != seen:
                log.info(
                    "labelling %s: %d/%d submitted, %d skipped",
                    batch_name,
                    status.submitted,
                    status.target,
                    status.skipped,
                )
                seen = handled
            if handled >= status.target:
                break
            time.sleep(poll_seconds)
        bar.close()
        with session() as db:
            counts = write_export(collect(db, service.get_batch(db, batch_name)), out_dir)
    finally:
        engine.dispose()
    if not counts.get("comparisons.jsonl"):
        raise UserError(f"feedback batch '{batch_name}' holds no submitted ranking to train on")
    return {
        "comparisons": str(out_dir / "comparisons.jsonl"),
        "count": counts["comparisons.jsonl"],
        "labeller": "human",
        "exported": counts,
    }
