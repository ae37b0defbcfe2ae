"""Run several `rlhf` commands, one after another, in ONE group of data-parallel processes.

    python -m accelerate.commands.launch --num_processes 2 ... tests/two_ranks.py plan.json

`plan.json` is a list of [command, [arg, ...]]. Starting 2 Python processes that import torch, transformers and
accelerate costs more than the tiny runs themselves, so the multi-process tests share one launch
(tests/test_distributed.py). Each command goes through `rlhf.cli.main`, exactly as `rlhf <stage> ...` would on a
launched rank. Not a test module (no `test_` prefix).
"""

from __future__ import annotations

import json
import sys

from rlhf.cli import main

if __name__ == "__main__":
    with open(sys.argv[1], encoding="utf-8") as handle:
        plan = json.load(handle)
    for command, args in plan:
        code = main([command, *args])
        if code:
            sys.exit(f"two_ranks: `rlhf {command}` exited with {code}")
