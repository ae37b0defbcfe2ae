"""`rlhf <stage> ...`: a thin face that parses, validates and hands over to a stage.

Each sub-command lives in its own module with a `main(argv)` function, imported only when asked for, so
`rlhf label serve` starts without importing torch.
"""

from __future__ import annotations

import importlib
import sys

from rlhf.errors import UserError

# sub-command -> (module, one-line description)
COMMANDS: dict[str, tuple[str, str]] = {
    "pretrain": ("rlhf.stages.pretrain", "pre-train a base causal LM on plain-text files"),
    "sft": ("rlhf.stages.sft", "supervised fine-tuning on human demonstrations (prompt -> response)"),
    "sample": ("rlhf.stages.sample", "sample K responses per prompt from a policy into a JSONL"),
    "label": (
        "rlhf.labelling",
        "feedback: `serve` the app, `import`/`export` batches, `synthetic` labellers",
    ),
    "reward": ("rlhf.stages.reward", "train a Bradley-Terry reward model on comparisons"),
    "ppo": (
        "rlhf.stages.ppo",
        "PPO fine-tuning against the reward model with a KL penalty to the SFT policy",
    ),
    "dpo": ("rlhf.stages.dpo", "Direct Preference Optimization on the same comparisons"),
    "eval": ("rlhf.evaluate", "evaluate policy checkpoints: reward, gold, KL, win rate, diversity"),
    "loop": ("rlhf.loop", "run the whole RLHF loop from a config, resumable"),
    "report": ("rlhf.report", "rebuild a run's self-contained report.html"),
}


def usage() -> str:
    lines = ["usage: rlhf <command> [--config FILE] [key=value ...] [--help]", "", "commands:"]
    lines += [f"  {name:<10} {desc}" for name, (_, desc) in COMMANDS.items()]
    lines += ["", "`rlhf <command> --help` lists every config field of that command."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())  # noqa: T201
        return 0
    if argv[0] in ("-V", "--version"):
        from rlhf import __version__

        print(__version__)  # noqa: T201
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"rlhf: unknown command '{command}'\n\n{usage()}", file=sys.stderr)  # noqa: T201
        return 2
    try:
        module = importlib.import_module(COMMANDS[command][0])
        return int(module.main(rest) or 0)
    except UserError as exc:
        print(f"rlhf {command}: error: {exc}", file=sys.stderr)  # noqa: T201
        return 2
    except KeyboardInterrupt:
        print(f"rlhf {command}: interrupted", file=sys.stderr)  # noqa: T201
        return 130


if __name__ == "__main__":
    sys.exit(main())
