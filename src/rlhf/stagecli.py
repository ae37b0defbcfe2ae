"""Argument handling shared by every stage's `main(argv)`.

    rlhf <stage> [--config FILE] [key=value ...] [--key value ...] [--flag] [POSITIONAL ...] [--help] [--print-config]

`--key value` and `key=value` are the same override; a bare `--flag` sets a boolean field to true. Fields listed in
the config's `POSITIONAL` may be given as plain arguments, in that order.
"""

from __future__ import annotations

import dataclasses
import sys
import textwrap
from typing import Any, get_type_hints

import yaml

from rlhf.config import field_help, load_config, to_dict
from rlhf.errors import UserError


def _is_bool_field(cls: type, dotted: str) -> bool:
    tp: Any = cls
    for part in dotted.split("."):
        if not dataclasses.is_dataclass(tp):
            return False
        hints = get_type_hints(tp)
        if part not in hints:
            return False
        tp = hints[part]
    return tp is bool


def format_help(cls: type, prog: str, description: str) -> str:
    rows = field_help(cls)
    width = max(len(r[0]) for r in rows) + 2
    out = [
        f"usage: {prog} [--config FILE] [key=value ...] [--key value ...]"
        + "".join(f" [{p}]" for p in cls.POSITIONAL),
        "",
        description,
        "",
        "options:",
        "  --config FILE     YAML preset (see configs/); later overrides win",
        "  --print-config    print the resolved config as YAML and exit",
        "",
        "config fields:",
    ]
    for name, tp, default, text in rows:
        body = textwrap.fill(
            f"{text} ({tp}, default {default})", width=110 - width, subsequent_indent=" " * (width + 2)
        )
        out.append(f"  {name:<{width}}{body}")
    return "\n".join(out)


def parse_stage_args(cls: type, argv: list[str], prog: str, description: str) -> Any | None:
    """Return the validated config, or None when --help / --print-config already answered."""
    if any(a in ("-h", "--help") for a in argv):
        print(format_help(cls, prog, description))  # noqa: T201
        return None
    config_file, overrides, positionals, print_only = None, [], [], False
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--config":
            if i + 1 >= len(argv):
                raise UserError("--config needs a file path")
            config_file, i = argv[i + 1], i + 2
            continue
        if arg.startswith("--config="):
            config_file, i = arg.split("=", 1)[1], i + 1
            continue
        if arg == "--print-config":
            print_only, i = True, i + 1
            continue
        if arg.startswith("--"):
            key = arg[2:].replace("-", "_")
            if "=" in key:
                overrides.append(key)
                i += 1
            elif _is_bool_field(cls, key) and (
                i + 1 >= len(argv)
                or argv[i + 1].startswith("--")
                or argv[i + 1].lower() not in ("true", "false")
            ):
                overrides.append(f"{key}=true")
                i += 1
            elif i + 1 < len(argv):
                overrides.append(f"{key}={argv[i + 1]}")
                i += 2
            else:
                raise UserError(f"option {arg} needs a value")
            continue
        if "=" in arg and not arg.startswith("/"):
            overrides.append(arg)
        else:
            positionals.append(arg)
        i += 1
    if len(positionals) > len(cls.POSITIONAL):
        extra = positionals[len(cls.POSITIONAL) :]
        raise UserError(f"unexpected argument(s): {' '.join(extra)} (see {prog} --help)")
    extra_fields = dict(zip(cls.POSITIONAL, positionals))
    config = load_config(cls, config_file, overrides, extra=extra_fields)
    if print_only:
        sys.stdout.write(yaml.safe_dump(to_dict(config), sort_keys=False))
        return None
    return config
