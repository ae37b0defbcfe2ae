"""Plain-text corpora for pre-training: read UTF-8 files, cut them into documents, hold out a validation split.

Standard library only. A *document* is a run of text between two or more blank lines (a story, a chapter or a
section in the shipped books); the pre-training stage wraps each one in BOS ... EOS.

The held-out split is deterministic and spread over the whole corpus: the text is cut (at line ends) into
`cycles x period` contiguous pieces of about equal length, `period = round(1 / val_fraction)`, and the last piece
of every cycle goes to validation. With the shipped 1.9 MB corpus and `val_fraction=0.05` that is 10 pieces of about
9.5 kB, one every 190 kB, so every book contributes to the validation loss and no validation line is seen in training.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from rlhf.errors import UserError

_DOC_BREAK = re.compile(r"\n[ \t]*\n(?:[ \t]*\n)+")  # two or more blank lines
MIN_PIECE_CHARS = 2000  # validation pieces shorter than this would cut most documents mid-sentence


@dataclass
class CorpusSplit:
    """Documents of the training and validation splits, in corpus order."""

    train: list[str]
    val: list[str]

    @property
    def train_chars(self) -> int:
        return sum(len(d) for d in self.train)

    @property
    def val_chars(self) -> int:
        return sum(len(d) for d in self.val)


def read_text(path: str | Path) -> str:
    """One corpus file as text; a missing, empty or non-UTF-8 file is a UserError naming the file."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"corpus file not found: {path}")
    if not path.is_file():
        raise UserError(f"corpus path is not a file: {path}")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(
            f"corpus file {path} is not UTF-8: invalid byte 0x{raw[exc.start]:02x} at byte offset {exc.start}"
            " (convert it, e.g. `iconv -f latin1 -t utf-8`)"
        ) from None
    text = text.lstrip("\ufeff").replace("\r\n", "\n").replace("\r", "\n")
    if not text.strip():
        raise UserError(f"corpus file {path} is empty")
    return text


def read_corpus(paths: list[str]) -> list[str]:
    """The text of every file, in order."""
    if not paths:
        raise UserError("config field 'data': give at least one corpus file")
    return [read_text(p) for p in paths]


def documents(text: str) -> list[str]:
    """Cut a text at runs of two or more blank lines; surrounding whitespace is dropped."""
    return [d.strip("\n") for d in _DOC_BREAK.split(text) if d.strip()]


def _cut_points(text: str, pieces: int) -> list[int]:
    """`pieces + 1` offsets cutting `text` into pieces of about equal length, each cut just after a newline."""
    cuts = [0]
    for i in range(1, pieces):
        target = max(len(text) * i // pieces, cuts[-1])
        newline = text.find("\n", target)
        cuts.append(len(text) if newline < 0 else newline + 1)
    cuts.append(len(text))
    return cuts


def split_corpus(texts: list[str], val_fraction: float, max_cycles: int = 10) -> CorpusSplit:
    """Deterministic train/validation split by contiguous pieces (see the module docstring)."""
    text = "\n\n\n".join(t.strip("\n") for t in texts)  # files never run into each other
    if val_fraction <= 0:
        return CorpusSplit(train=documents(text), val=[])
    period = max(2, round(1 / val_fraction))
    cycles = max(1, min(max_cycles, len(text) // (period * MIN_PIECE_CHARS)))
    cuts = _cut_points(text, cycles * period)
    train, val = [], []
    for i in range(cycles * period):
        piece = documents(text[cuts[i] : cuts[i + 1]])
        (val if i % period == period - 1 else train).extend(piece)
    return CorpusSplit(train=train, val=val)
