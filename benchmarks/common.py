"""Shared pieces of the benchmarks: the peer model set-up of PERF-NOTES, timing, and the RESULT line."""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
CORPUS = ROOT / "data" / "corpus" / "children_stories_5books.txt"

sys.path.insert(0, str(ROOT / "src"))


def parse_args(description: str, extra=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="about a minute: fewer repeats and steps")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the peer figures used 2)")
    if extra:
        extra(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return args


def peer_tokenizer(vocab_size: int = 8192, chars: int = 400_000):
    """A byte-level BPE trained locally on the shipped corpus (the PERF-NOTES set-up uses vocab 8192)."""
    from rlhf.modeling import train_tokenizer

    text = CORPUS.read_text(encoding="utf-8")[:chars]
    return train_tokenizer(text.splitlines(), vocab_size=vocab_size)


def peer_gpt2_config(tokenizer, n_layer: int = 4, n_head: int = 4, n_embd: int = 256, n_positions: int = 256):
    """GPT-2 4 layers, d=256, 4 heads, 256 positions, tied head: the peer set-up (5.3 M parameters at vocab 8192)."""
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=len(tokenizer),
        n_layer=n_layer,
        n_head=n_head,
        n_embd=n_embd,
        n_positions=n_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        num_labels=1,
    )


def timed(fn, repeats: int, warmup: int = 1) -> tuple[float, list[float]]:
    """Median wall seconds of `fn()` over `repeats` runs after `warmup` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def matmul_peak_gflops(dtype: torch.dtype = torch.float32, n: int = 1024, repeats: int = 10) -> float:
    """This machine's measured GEMM throughput, for model-FLOPs utilisation."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    seconds, _ = timed(lambda: a @ b, repeats, warmup=3)
    return 2 * n**3 / seconds / 1e9


def table(rows: list[list], header: list[str]) -> str:
    cells = [header] + [[f"{c:.4g}" if isinstance(c, float) else str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def result(name: str, ours: float, peer: float, unit: str, higher_is_better: bool = True) -> str:
    """The closing line of a benchmark: ratio = ours/peer with 'higher is better' (inverted for times)."""
    ratio = ours / peer if higher_is_better else peer / ours
    line = f"RESULT {name} ours={ours:.4g} peer={peer:.4g} unit={unit} ratio={ratio:.3f}"
    print(line, flush=True)
    return line
