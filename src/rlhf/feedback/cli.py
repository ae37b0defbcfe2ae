"""`rlhf label serve | import | export | annotator | status`: the feedback app's commands.

    rlhf label serve [--db URL] [--port 8000]
    rlhf label import samples.jsonl --batch NAME [--forms ranking,critique] [--overlap 2] [--rating-scale 7]
    rlhf label annotator add NAME [--admin]   |   rlhf label annotator list
    rlhf label status [--batch NAME]
    rlhf label export --batch NAME --out DIR

`--db` is a SQLite file (default runs/feedback.db) or a postgresql:// URL; every command migrates it first.
"""

from __future__ import annotations

import argparse
import sys

from rlhf.errors import UserError
from rlhf.feedback.schemas import FORMS
from rlhf.feedback.store import DEFAULT_DB, MAX_REQUESTS, open_database


def say(text: str) -> None:
    """CLI output (this is the face of the command, not library logging)."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlhf label", description="The human feedback app.")
    verbs = parser.add_subparsers(dest="verb", required=True)

    def verb(name: str, help: str) -> argparse.ArgumentParser:
        sub = verbs.add_parser(name, help=help, description=help)
        sub.add_argument(
            "--db", default=DEFAULT_DB, help=f"SQLite path or postgresql:// URL (default {DEFAULT_DB})"
        )
        return sub

    serve = verb("serve", "start the web app on 127.0.0.1")
    serve.add_argument("--port", type=int, default=8000, help="port on 127.0.0.1 (0: any free port)")
    serve.add_argument(
        "--synchronous",
        choices=["normal", "full"],
        default="normal",
        help="SQLite: normal survives a killed server; full (an fsync per commit) also a power cut",
    )
    imp = verb("import", "import a `rlhf sample` JSONL as a labelling batch")
    imp.add_argument("samples", help="JSONL written by `rlhf sample` (docs/formats.md)")
    imp.add_argument("--batch", required=True, help="name of the new batch")
    imp.add_argument("--forms", default="ranking", help=f"comma-separated feedback forms: {','.join(FORMS)}")
    imp.add_argument("--overlap", type=int, default=1, help="annotators per item (>1 measures agreement)")
    imp.add_argument("--rating-scale", type=int, default=7, help="ratings run 1..N (e.g. 3 or 7)")
    exp = verb("export", "write comparisons, demonstrations, critiques and TRL pairs of a batch")
    exp.add_argument("--batch", required=True)
    exp.add_argument("--out", required=True, help="output folder")
    ann = verb("annotator", "create or list annotators")
    ann.add_argument("action", choices=["add", "list"])
    ann.add_argument("name", nargs="?", help="annotator name (for add)")
    ann.add_argument("--admin", action="store_true", help="may import, export and see everyone's work")
    status = verb("status", "progress and inter-annotator agreement")
    status.add_argument("--batch", help="one batch (default: all)")
    status.add_argument("--json", action="store_true", help="print the status as JSON")
    return parser


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    return {"serve": serve, "import": import_, "export": export, "annotator": annotator, "status": status}[
        args.verb
    ](args)


def serve(args: argparse.Namespace) -> int:
    import gc
    import socket

    import uvicorn

    from rlhf.feedback import service
    from rlhf.feedback.app import create_app
    from rlhf.feedback.store import WalCheckpointer

    engine, sessions = open_database(args.db, args.synchronous, background_checkpoints=True)
    with sessions() as db:
        token = service.ensure_admin(db)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(("127.0.0.1", args.port))
    except OSError as exc:
        raise UserError(f"--port {args.port}: cannot listen on 127.0.0.1 ({exc.strerror})") from None
    port = sock.getsockname()[1]
    say(f"rlhf feedback app on http://127.0.0.1:{port}/  (database {engine.url.render_as_string()})")
    if token:
        say(f"admin token (shown once; log in at http://127.0.0.1:{port}/login): {token}")
    config = uvicorn.Config(
        create_app(sessions=sessions), log_level="warning", access_log=False, limit_concurrency=MAX_REQUESTS
    )
    checkpointer = WalCheckpointer(engine, args.synchronous) if engine.dialect.name == "sqlite" else None
    if checkpointer:
        checkpointer.start()
    # The start-up objects (modules, the app, SQLAlchemy's caches) live as long as the server: move them out of
    # the collector's view, and collect young objects less often, so no request pays for a full collection.
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 20, 20)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        if checkpointer:
            checkpointer.stop()
    return 0


def import_(args: argparse.Namespace) -> int:
    from rlhf.data.records import read_samples
    from rlhf.feedback import service

    forms = [f.strip() for f in args.forms.split(",") if f.strip()]
    unknown = [f for f in forms if f not in FORMS]
    if unknown or not forms:
        raise UserError(
            f"--forms: unknown form '{unknown[0] if unknown else ''}'; choose from {', '.join(FORMS)}"
        )
    if args.overlap < 1:
        raise UserError("--overlap must be at least 1")
    if not 2 <= args.rating_scale <= 10:
        raise UserError("--rating-scale must be between 2 and 10")
    samples = read_samples(args.samples)
    with open_database(args.db)[1]() as db:
        batch = service.import_batch(
            db, args.batch, samples, forms, args.overlap, args.rating_scale, source=str(args.samples)
        )
        say(
            f"batch '{batch.name}': {len(samples)} items, forms {','.join(batch.forms)}, overlap {batch.overlap}"
        )
    return 0


def export(args: argparse.Namespace) -> int:
    from rlhf.feedback import service
    from rlhf.feedback.export import collect, write_export

    with open_database(args.db)[1]() as db:
        counts = write_export(collect(db, service.get_batch(db, args.batch)), args.out)
    for name, count in counts.items():
        say(f"{args.out}/{name}: {count} lines")
    return 0


def annotator(args: argparse.Namespace) -> int:
    from rlhf.feedback import service

    with open_database(args.db)[1]() as db:
        if args.action == "list":
            for a in service.list_annotators(db):
                say(f"{a.name}\t{'admin' if a.is_admin else 'annotator'}\t{a.created_at:%Y-%m-%d}")
            return 0
        if not args.name:
            raise UserError("annotator add: give a NAME")
        _, token = service.create_annotator(db, args.name, args.admin)
        say(f"{'admin' if args.admin else 'annotator'} '{args.name}' token: {token}")
    return 0


def status(args: argparse.Namespace) -> int:
    from rlhf.feedback import progress, service

    with open_database(args.db)[1]() as db:
        batches = [service.get_batch(db, args.batch)] if args.batch else service.list_batches(db)
        for batch in batches:
            s = progress.batch_status(db, batch)
            if args.json:
                say(s.model_dump_json())
                continue
            agreement = s.agreement
            tau = "-" if agreement.kendall_tau is None else f"{agreement.kendall_tau:.3f}"
            pairs = "-" if agreement.pairwise_agreement is None else f"{agreement.pairwise_agreement:.1%}"
            say(
                f"{batch.name}: {s.submitted}/{s.target} submits, {s.complete_items}/{s.batch.items} items complete, "
                f"{s.skipped} skipped, {s.drafts} drafts; agreement on {agreement.items} items: "
                f"tau {tau}, pairwise {pairs}"
            )
            for a in s.annotators:
                say(f"  {a.annotator}: {a.submitted} submitted, {a.skipped} skipped, {a.drafts} drafts")
        if not batches:
            say("no batches")
    return 0
