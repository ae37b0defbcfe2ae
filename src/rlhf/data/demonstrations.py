"""Demonstration readers: prompt -> ideal response, from the formats people actually have.

`read_demonstrations(path)` accepts, record by record (a file may mix them):
- `{"prompt": str, "response": str}`: our own format (docs/formats.md);
- chat `{"messages": [{"role": "user"|"assistant"|"system", "content": str}, ...]}`: the last assistant message is
  the response; the turns before it are the prompt (earlier turns folded into an HH-style transcript);
- Self-Instruct seed tasks `{"instruction", "instances": [{"input", "output"}]}`: one demonstration per instance,
  prompt = instruction (+ a blank line + the instance input when there is one), response = output;
- LIMA `{"instruction", "input", "output", "history": [[user, assistant], ...]}` (a JSON array file or JSONL):
  prompt = instruction (+ input); a non-empty history is folded into the prompt as a transcript.

Folding a multi-turn conversation: the template wraps a prompt as "Human: {prompt}\\n\\nAssistant:", so earlier
turns become "u1\\n\\nAssistant: a1\\n\\nHuman: u2" and the model sees the HH-RLHF transcript
"Human: u1 / Assistant: a1 / Human: u2 / Assistant:" with only the last reply as the target.

`read_prompts(path)` reads prompts for sampling: any of the above (responses optional) or a plain text file with
one prompt per line.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rlhf.data.records import Demonstration, read_jsonl
from rlhf.data.template import ASSISTANT, HUMAN
from rlhf.errors import UserError


def fold_turns(turns: list[tuple[str, str]], last_user: str) -> str:
    """Earlier (user, assistant) turns and the final user message as one prompt for the template."""
    text = ""
    for user, assistant in turns:
        text += f"{user.strip()}\n\n{ASSISTANT} {assistant.strip()}\n\n{HUMAN} "
    return text + last_user.strip()


def _text(obj: dict, key: str, where: str, required: bool = True) -> str:
    value = obj.get(key, "")
    if value is None:
        value = ""
    if not isinstance(value, str):
        raise UserError(f"{where}: field '{key}' must be a string, got {type(value).__name__}")
    if required and not value.strip():
        raise UserError(f"{where}: field '{key}' is missing or empty")
    return value


def _with_input(instruction: str, extra: str) -> str:
    return f"{instruction.strip()}\n\n{extra.strip()}" if extra.strip() else instruction.strip()


def _from_messages(obj: dict, where: str, need_response: bool) -> tuple[str, str]:
    messages = obj["messages"]
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{where}: field 'messages' must be a non-empty list")
    system, turns, pending = "", [], None
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or "role" not in m:
            raise UserError(f"{where}: messages[{i}] needs string fields 'role' and 'content'")
        role, content = m["role"], m["content"]
        if role == "system":
            system = content.strip()
        elif role in ("user", "human"):
            pending = content if pending is None else pending + "\n\n" + content
        elif role in ("assistant", "gpt", "bot"):
            if pending is None:
                raise UserError(f"{where}: messages[{i}] is an assistant turn with no user turn before it")
            turns.append((pending, content))
            pending = None
        else:
            raise UserError(f"{where}: messages[{i}] has unknown role '{role}'")
    if pending is not None:  # ends with a user turn: a prompt without a response
        last_user, response = pending, ""
    elif turns:
        (last_user, response), turns = turns[-1], turns[:-1]
    else:
        raise UserError(f"{where}: 'messages' holds no user turn")
    if need_response and not response.strip():
        raise UserError(f"{where}: demonstration has no response (no assistant message after the last user)")
    prompt = fold_turns(turns, last_user)
    return (f"{system}\n\n{prompt}" if system else prompt), response


def parse_record(obj: Any, where: str, need_response: bool = True) -> list[tuple[str, str]]:
    """(prompt, response) pairs of one record in any accepted format; response is "" when not needed."""
    if not isinstance(obj, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if "messages" in obj:
        return [_from_messages(obj, where, need_response)]
    if "prompt" in obj:
        prompt = _text(obj, "prompt", where)
        response = _text(obj, "response", where, required=False)
        if need_response and not response.strip():
            raise UserError(f"{where}: demonstration has no response (field 'response' is missing or empty)")
        return [(prompt, response)]
    if "instruction" in obj and "instances" in obj:  # Self-Instruct
        instruction = _text(obj, "instruction", where)
        instances = obj["instances"]
        if not isinstance(instances, list) or not instances:
            raise UserError(f"{where}: field 'instances' must be a non-empty list")
        pairs = []
        for i, inst in enumerate(instances):
            if not isinstance(inst, dict):
                raise UserError(f"{where}: instances[{i}] must be an object")
            output = _text(inst, "output", f"{where}: instances[{i}]", required=False)
            if need_response and not output.strip():
                raise UserError(
                    f"{where}: instances[{i}] has no response (field 'output' is missing or empty)"
                )
            pairs.append((_with_input(instruction, _text(inst, "input", where, required=False)), output))
        return pairs
    if "instruction" in obj:  # LIMA / Alpaca style
        instruction = _text(obj, "instruction", where)
        output = _text(obj, "output", where, required=False)
        if need_response and not output.strip():
            raise UserError(f"{where}: demonstration has no response (field 'output' is missing or empty)")
        history = obj.get("history") or []
        if not isinstance(history, list) or not all(
            isinstance(t, (list, tuple)) and len(t) == 2 and all(isinstance(s, str) for s in t)
            for t in history
        ):
            raise UserError(f"{where}: field 'history' must be a list of [user, assistant] string pairs")
        prompt = fold_turns(
            [tuple(t) for t in history], _with_input(instruction, _text(obj, "input", where, False))
        )
        return [(prompt, output)]
    raise UserError(
        f"{where}: unknown record format: expected 'prompt'/'response', 'messages', "
        f"or 'instruction' (Self-Instruct / LIMA) fields; got {sorted(obj)[:6]}"
    )


def _records(path: Path) -> list[tuple[str, Any]]:
    """(where, object) per record of a JSONL file or a JSON array file."""
    if not path.is_file():
        raise UserError(f"demonstration file not found: {path}")
    with open(path, "rb") as handle:
        head = handle.read(4096).decode("utf-8", errors="ignore").lstrip("\ufeff \t\r\n")
    if head.startswith("["):
        try:
            data = json.loads(path.read_text(encoding="utf-8-sig"))
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
        except UnicodeDecodeError as exc:
            raise UserError(f"{path}: not UTF-8 text ({exc.reason})") from None
        return [(f"{path}: record {i}", obj) for i, obj in enumerate(data, 1)]
    return [(f"{path}:{lineno}", obj) for lineno, obj in read_jsonl(path, "demonstration")]


def read_demonstrations(path: str | Path) -> list[Demonstration]:
    """Every demonstration in `path`; a malformed or response-free record raises naming the file and line."""
    path = Path(path)
    demos = [
        Demonstration(prompt=p, response=r, source=str(path))
        for where, obj in _records(path)
        for p, r in parse_record(obj, where, need_response=True)
    ]
    if not demos:
        raise UserError(f"demonstration file {path} holds no records")
    return demos


def read_prompts(path: str | Path) -> list[tuple[str, str]]:
    """(prompt_id, prompt) pairs from JSONL/JSON records (responses optional) or a text file (one per line)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"prompts file not found: {path}")
    if path.suffix.lower() not in (".jsonl", ".json"):
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as exc:
            raise UserError(f"{path}: not UTF-8 text ({exc.reason})") from None
        return [(str(i), line.strip()) for i, line in enumerate(lines, 1) if line.strip()]
    prompts = []
    for where, obj in _records(path):
        pairs = parse_record(obj, where, need_response=False)
        base = str(obj.get("prompt_id", obj.get("id", where.rsplit(":", 1)[-1].replace(" record ", ""))))
        for j, (prompt, _) in enumerate(pairs):
            prompts.append((base if len(pairs) == 1 else f"{base}.{j}", prompt))
    return prompts
