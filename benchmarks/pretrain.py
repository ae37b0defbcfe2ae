"""Pre-training throughput: tokens/s and model-FLOPs utilisation (MFU) of our training step, fp32 and bf16.

The model is the tiny preset (GPT-2 4 layers, d=256, 4 heads, vocab 8192: the PERF-NOTES peer set-up) trained on
batches of 8 x 128 tokens of the shipped corpus with the exact step `rlhf pretrain` runs (forward, fp32 loss,
backward, clipping, AdamW). There is no peer pre-trainer, so each RESULT line compares against this machine's own
ceiling, measured in this same run:

- `pretrain_mfu_<dtype>`: ours = achieved model GFLOP/s, peer = measured 1024^3 GEMM GFLOP/s in that dtype;
  ratio = MFU (1.0 would be a training step as fast as one big matmul, which small layers never reach).
- `pretrain_bf16_speedup`: ours = bf16 tokens/s, peer = fp32 tokens/s; ratio > 1 means bf16 autocast pays.

Model FLOPs per token = 6 N (N = matmul weights: attention/MLP projections and the tied LM head; embedding
look-ups are free) + 12 L T d for attention scores and values (not halved for the causal mask).

    .venv/bin/python benchmarks/pretrain.py [--quick] [--threads 2]
"""

from __future__ import annotations

import time

import numpy as np
import torch

from common import CORPUS, matmul_peak_gflops, parse_args, peer_tokenizer, result, table
from rlhf.data.corpus import documents
from rlhf.modeling import build_model
from rlhf.stages.pretrain import PretrainConfig, WindowSampler, encode_documents, lm_loss, make_optimizer

BATCH, BLOCK = 8, 128


def model_flops_per_token(model, block: int) -> float:
    cfg = model.config
    matmul = sum(m.weight.numel() for name, m in model.named_modules() if type(m).__name__ == "Conv1D")
    matmul += model.lm_head.weight.numel()
    return 6 * matmul + 12 * cfg.n_layer * block * cfg.n_embd


def train_speed(tokenizer, tokens: np.ndarray, bf16: bool, steps: int) -> tuple[float, float]:
    """(seconds per step median, final loss) of our training step on real text."""
    torch.manual_seed(0)
    model = build_model("tiny", tokenizer).train()
    optimizer = make_optimizer(model, PretrainConfig(lr=1e-3))
    sampler = WindowSampler(tokens, BLOCK, seed=0)
    times, loss = [], float("nan")
    for i in range(steps + 2):  # two warm-up steps
        start = time.perf_counter()
        loss_t = lm_loss(model, sampler.next_batch(BATCH), bf16, "cpu")
        loss_t.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss = loss_t.item()
        if i >= 2:
            times.append(time.perf_counter() - start)
    return float(np.median(times)), loss


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    steps = 5 if args.quick else 20
    tokenizer = peer_tokenizer()
    text = CORPUS.read_text(encoding="utf-8")[: 400_000 if args.quick else 1_000_000]
    tokens = encode_documents(tokenizer, documents(text))
    model = build_model("tiny", tokenizer)
    flops_token = model_flops_per_token(model, BLOCK)
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"tiny preset: {n_params / 1e6:.2f} M parameters, {flops_token / 1e6:.1f} MFLOP per trained token, "
        f"batch {BATCH} x {BLOCK}, {args.threads} threads, {steps} timed steps"
    )
    peaks = {"fp32": matmul_peak_gflops(torch.float32), "bf16": matmul_peak_gflops(torch.bfloat16)}
    rows, speed = [], {}
    for name in ("fp32", "bf16"):
        seconds, loss = train_speed(tokenizer, tokens, name == "bf16", steps)
        tok_s = BATCH * BLOCK / seconds
        gflops = tok_s * flops_token / 1e9
        speed[name] = (tok_s, gflops)
        rows.append([name, seconds, tok_s, gflops, peaks[name], gflops / peaks[name], loss])
    print()
    print("MFU = achieved model GFLOP/s / measured GEMM peak of the same dtype (higher is better)")
    print(table(rows, ["dtype", "s/step", "tokens/s", "model GFLOP/s", "GEMM peak", "MFU", "loss"]))
    print()
    result("pretrain_mfu_fp32", speed["fp32"][1], peaks["fp32"], "GFLOP/s")
    result("pretrain_mfu_bf16", speed["bf16"][1], peaks["bf16"], "GFLOP/s")
    result("pretrain_bf16_speedup", speed["bf16"][0], speed["fp32"][0], "tok/s")


if __name__ == "__main__":
    main()
