"""Typed stage configs: dataclasses with a help string per field, YAML presets and `key=value` overrides.

Every stage declares one dataclass that inherits `StageConfig`. Fields are declared with `option(default, help)`;
nested dataclasses give dotted keys (`model.preset=small`). Loading rejects unknown keys, wrong types and values
outside declared ranges or choices, always naming the field.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from rlhf.errors import UserError


def option(
    default: Any,
    help: str,
    *,
    choices: tuple | None = None,
    low: float | None = None,
    high: float | None = None,
) -> Any:
    """A config field: its default, a help string, and optional allowed values or an inclusive range."""
    meta = {"help": help, "choices": choices, "low": low, "high": high}
    if dataclasses.is_dataclass(default) or isinstance(default, (list, dict)):
        return field(default_factory=lambda: _copy(default), metadata=meta)
    return field(default=default, metadata=meta)


def _copy(value: Any) -> Any:
    import copy

    return copy.deepcopy(value)


@dataclass
class ModelConfig:
    """Which model to start from: a preset built from scratch, or a local Hugging Face checkpoint."""

    path: str = option(
        "", "local Hugging Face checkpoint folder to start from; empty = build `preset` from scratch"
    )
    preset: str = option(
        "tiny", "architecture when building from scratch", choices=("tiny", "small", "medium")
    )
    tokenizer: str = option(
        "", "local tokenizer folder; empty = the checkpoint's own, or train one on the corpus"
    )
    vocab_size: int = option(8192, "BPE vocabulary size when a tokenizer is trained", low=260, high=1_000_000)
    context: int = option(0, "context length when building; 0 = the preset's", low=0, high=1_000_000)
    dropout: float = option(0.0, "dropout when building from scratch", low=0.0, high=0.9)


@dataclass
class StageConfig:
    """Fields every stage shares: where its run folder is and how to reproduce it."""

    POSITIONAL: ClassVar[tuple[str, ...]] = ()

    name: str = option("demo", "run name: outputs go to <runs_dir>/<name>/<stage>/")
    runs_dir: str = option("runs", "folder that holds all runs")
    seed: int = option(0, "random seed (torch, numpy, python)")
    resume: bool = option(False, "continue from the newest checkpoint in the run folder")
    device: str = option("cpu", "torch device: cpu, cuda, cuda:1, ...")
    threads: int = option(0, "CPU threads for torch; 0 = torch's default", low=0)

    def validate(self) -> None:
        """Reject impossible combinations. Stages override this and call super().validate()."""
        if getattr(self, "bf16", False) and self.device == "cpu" and not cpu_bf16_is_fast():
            _warn_once(
                "bf16=true on a CPU without AVX512-BF16 or AMX (or RLHF_CPU_BF16=0): bf16 matmuls would be "
                "emulated (30x slower measured on an AVX2 machine), so this runs in fp32. RLHF_CPU_BF16=1 keeps bf16."
            )
            self.bf16 = False  # type: ignore[attr-defined]


def cpu_bf16_is_fast(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether bf16 autocast pays off on this CPU: x86 AVX512-BF16 or AMX-BF16, or Arm BF16, as Linux reports them
    in /proc/cpuinfo; True where the flags cannot be read (other systems: the user's setting stands). The
    environment decides instead when it says RLHF_CPU_BF16=1 (bf16 anyway) or RLHF_CPU_BF16=0 (fp32, as on a CPU
    without them)."""
    if os.environ.get("RLHF_CPU_BF16") in ("0", "1"):
        return os.environ["RLHF_CPU_BF16"] == "1"
    try:
        info = Path(cpuinfo).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return True
    flags: set[str] = set()
    for line in info.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    if not flags:
        return True
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        logging.getLogger("rlhf").warning(message)


# ---------------------------------------------------------------------------------------------------------------
# Loading: dict -> dataclass, with checks that name the field.


def _field_error(path: str, message: str) -> UserError:
    return UserError(f"config field '{path}': {message}")


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(tp))
    if origin is list:
        return f"list[{_type_name(get_args(tp)[0])}]"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Return `value` as type `tp`, or raise naming `path`. Strings from the command line are parsed leniently."""
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        errors = []
        for arg in get_args(tp):
            try:
                return _coerce(value, arg, path)
            except UserError as exc:
                errors.append(str(exc))
        raise _field_error(path, f"expected {_type_name(tp)}, got {value!r}")
    if tp is type(None):
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none", "~")):
            return None
        raise _field_error(path, f"expected null, got {value!r}")
    if origin is Literal:
        if value in get_args(tp):
            return value
        raise _field_error(path, f"expected one of {_type_name(tp)}, got {value!r}")
    if origin is list:
        if isinstance(value, str):
            value = [v for v in (s.strip() for s in value.split(",")) if v]
        if not isinstance(value, (list, tuple)):
            raise _field_error(path, f"expected {_type_name(tp)}, got {value!r}")
        (item_tp,) = get_args(tp)
        return [_coerce(v, item_tp, f"{path}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise _field_error(path, f"expected a mapping of {tp.__name__} fields, got {value!r}")
        return from_dict(tp, value, prefix=path + ".")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        raise _field_error(path, f"expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise _field_error(path, f"expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(float(value)) if float(value).is_integer() else int(value)
            except ValueError:
                pass
        raise _field_error(path, f"expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise _field_error(path, f"expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML reads `1e-4` as a string
            except ValueError:
                pass
        raise _field_error(path, f"expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise _field_error(path, f"expected a string, got {value!r}")
    if tp is dict or origin is dict:
        if isinstance(value, dict):
            return value
        raise _field_error(path, f"expected a mapping, got {value!r}")
    raise _field_error(path, f"unsupported field type {tp!r}")


def _hints(cls: type) -> dict[str, Any]:
    return get_type_hints(cls)


def _check_limits(f: dataclasses.Field, value: Any, path: str) -> None:
    meta = f.metadata
    if meta.get("choices") is not None and value not in meta["choices"]:
        raise _field_error(path, f"must be one of {', '.join(map(str, meta['choices']))}; got {value!r}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if meta.get("low") is not None and value < meta["low"]:
            raise _field_error(path, f"must be >= {meta['low']}; got {value!r}")
        if meta.get("high") is not None and value > meta["high"]:
            raise _field_error(path, f"must be <= {meta['high']}; got {value!r}")


def from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    """Build `cls` from a (possibly partial) mapping; every key and value is checked."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = _hints(cls)
    for key in data:
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            raise UserError(f"config: unknown field '{prefix}{key}'{hint}")
    kwargs = {}
    for name, value in data.items():
        path = prefix + name
        coerced = _coerce(value, hints[name], path)
        _check_limits(fields[name], coerced, path)
        kwargs[name] = coerced
    obj = cls(**kwargs)
    for name, f in fields.items():  # defaults are checked too: a preset may rely on them
        if name not in kwargs:
            _check_limits(f, getattr(obj, name), prefix + name)
    return obj


def to_dict(config: Any) -> dict:
    return dataclasses.asdict(config)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise UserError(f"config: '{dotted}' goes inside '{part}', which is not a section")
        node = child
    node[parts[-1]] = value


def _parse_value(text: str) -> Any:
    try:
        return yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError:
        return text


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise UserError(
            f"config file {path}{where}: not valid YAML ({getattr(exc, 'problem', exc)})"
        ) from None
    if not isinstance(data, dict):
        raise UserError(f"config file {path}: expected a mapping of fields at the top level")
    return data


def load_config(
    cls: type, config_file: str | None = None, overrides: typing.Sequence[str] = (), extra: dict | None = None
) -> Any:
    """Defaults <- YAML file <- `extra` mapping <- `key=value` overrides; then type checks and `validate()`."""
    tree: dict = read_yaml(config_file) if config_file else {}
    for key, value in (extra or {}).items():
        _set_dotted(tree, key, value)
    for item in overrides:
        if "=" not in item:
            raise UserError(f"override '{item}' is not of the form key=value")
        key, _, text = item.partition("=")
        _set_dotted(tree, key.strip(), _parse_value(text))
    config = from_dict(cls, tree)
    config.validate()
    return config


def field_help(cls: type, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(dotted name, type, default, help) for every field, nested sections flattened."""
    rows = []
    hints = _hints(cls)
    defaults = cls()
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            rows.extend(field_help(tp, prefix + f.name + "."))
            continue
        meta = f.metadata
        text = meta.get("help", "")
        if meta.get("choices"):
            text += f" [{' | '.join(map(str, meta['choices']))}]"
        elif meta.get("low") is not None or meta.get("high") is not None:
            lo = meta.get("low") if meta.get("low") is not None else "-inf"
            hi = meta.get("high") if meta.get("high") is not None else "inf"
            text += f" [{lo} .. {hi}]"
        rows.append((prefix + f.name, _type_name(tp), repr(getattr(defaults, f.name)), text))
    return rows


def save_config(config: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False), encoding="utf-8")
