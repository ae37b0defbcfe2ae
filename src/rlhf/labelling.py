"""`rlhf label <verb>`: the feedback app's commands and the synthetic labellers, under one name.

rlhf label serve | import | export | annotator ...   the human feedback app (rlhf.feedback)
rlhf label synthetic ...                             a programmatic or gold-model labeller (rlhf.labellers)
"""

from __future__ import annotations

import importlib

from rlhf.errors import UserError

VERBS = {
    "synthetic": (
        "rlhf.labellers",
        "rank sampled responses with a synthetic labeller (gold model or rubric)",
    ),
    "serve": ("rlhf.feedback.cli", "start the feedback web app on 127.0.0.1"),
    "import": ("rlhf.feedback.cli", "import a `rlhf sample` JSONL as a labelling batch"),
    "export": ("rlhf.feedback.cli", "export feedback as comparisons, SFT data and TRL pairs"),
    "annotator": ("rlhf.feedback.cli", "create annotators and print their tokens"),
    "status": ("rlhf.feedback.cli", "progress and agreement of a labelling batch"),
}


def usage() -> str:
    return "usage: rlhf label <verb> ...\n\nverbs:\n" + "\n".join(
        f"  {verb:<10} {desc}" for verb, (_, desc) in VERBS.items()
    )


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())  # noqa: T201
        return 0
    verb, rest = argv[0], argv[1:]
    if verb not in VERBS:
        raise UserError(f"unknown verb '{verb}'\n{usage()}")
    module = importlib.import_module(VERBS[verb][0])
    return int(module.main([verb, *rest]) or 0)
