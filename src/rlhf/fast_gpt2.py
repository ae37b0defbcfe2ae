"""The sampler's fast path: a plain-torch GPT-2 decoder over a Hugging Face model's own weights (`FastGPT2`).

`rlhf.sampling.generate` uses it for GPT-2-family models (our presets, any `GPT2LMHeadModel`); the token choice,
the left-pad layout and the position ids are the sampler's own, so both decode paths give the same distribution.
Why it is faster than `model.generate` on CPU: see the `rlhf.sampling` docstring.
"""

from __future__ import annotations

import functools
import math
import threading
import warnings
from typing import Any

import torch
import torch.nn.functional as F

from rlhf.sampling import _choose, _left_pad, position_ids_for


def _linear(weight: torch.Tensor, bias: torch.Tensor | None, act: str, rows: int, packed: bool):
    """(f, f_add) with f(x) = act(x @ weight.T + bias) and f_add(x, r) = r + x @ weight.T + bias, for one call.

    On CPU the weight is reordered once into oneDNN's blocked layout for this batch size: the 16 x 256 x 8192 LM head
    then runs 1.7x faster than through MKL (0.92 vs 1.55 ms fp32, 0.38 vs 0.62 ms bf16, one thread), and the
    activation or the residual add rides along in the same call. Elsewhere it is a plain `F.linear`.
    """
    if packed:
        w = torch.ops.mkldnn._reorder_linear_weight(weight, rows)
        op, binary = torch.ops.mkldnn._linear_pointwise.default, torch.ops.mkldnn._linear_pointwise.binary
        kind, algorithm = FastGPT2.ONEDNN_ACT[act]
        f = lambda x: op(x, w, bias, kind, [], algorithm)  # noqa: E731
        f.packed = (w, bias)  # type: ignore[attr-defined]  # for the scripted decode step
        return f, lambda x, residual: binary(x, residual, w, bias, "add")
    fn = FastGPT2.ACTIVATIONS[act]
    return lambda x: fn(F.linear(x, weight, bias)), lambda x, residual: residual + F.linear(x, weight, bias)


def _packed_step(
    token: torch.Tensor,
    pe: torch.Tensor,
    wte: torch.Tensor,
    cache: torch.Tensor,
    t: int,
    key_bias: torch.Tensor,
    weights: list[torch.Tensor],
    act: str,
    algorithm: str,
    ln_f_weight: torch.Tensor,
    ln_f_bias: torch.Tensor,
    head: torch.Tensor,
    eps: float,
) -> torch.Tensor:
    """Embedding, `FastGPT2._step` and the logits over prepacked weights (12 tensors a layer) as one TorchScript
    call: the same ops on the same tensors (the same results, tested), run by the TorchScript interpreter with the
    GIL released. That saves the Python dispatch of ~50 small ops a step, and two threads decoding parts side by
    side no longer queue for the GIL between ops. Measured (tiny preset, 16 rows, idle machine): the layers of a
    step 27% faster on one thread alone and 29% with two parts side by side; a whole 2-part `generate` call 18%
    faster in fp32 and 40% in bf16 (1 part: 2-5%)."""
    x = F.embedding(token, wte) + pe
    batch, width = x.shape[0], x.shape[1]
    n_head, dim = cache.shape[2], cache.shape[5]
    heads, end = batch * n_head, t + 1
    bias = key_bias[:, :, :end]
    for i in range(cache.shape[0]):
        ln1_w, ln1_b, qkv_w, qkv_b, proj_w, proj_b, ln2_w, ln2_b, fc_w, fc_b, out_w, out_b = weights[
            12 * i : 12 * i + 12
        ]
        layer_cache = cache[i]
        h = F.layer_norm(x, [width], ln1_w, ln1_b, eps)
        qkv = torch.ops.mkldnn._linear_pointwise(h, qkv_w, qkv_b, "none", [], "").view(batch, n_head, 3, dim)
        layer_cache[:, :, :, t].copy_(qkv[:, :, 1:])
        keys = layer_cache[:, :, 0, :end].view(heads, end, dim)
        values = layer_cache[:, :, 1, :end].view(heads, end, dim)
        q = qkv[:, :, 0].view(heads, 1, dim).to(cache.dtype)
        att = torch.bmm(torch.baddbmm(bias, q, keys.transpose(1, 2)).softmax(-1), values)
        x = torch.ops.mkldnn._linear_pointwise(att.view(batch, width).to(x.dtype), x, proj_w, proj_b, "add")
        h = torch.ops.mkldnn._linear_pointwise(
            F.layer_norm(x, [width], ln2_w, ln2_b, eps), fc_w, fc_b, act, [], algorithm
        )
        x = torch.ops.mkldnn._linear_pointwise(h, x, out_w, out_b, "add")
    h = F.layer_norm(x, [width], ln_f_weight, ln_f_bias, eps)
    return torch.ops.mkldnn._linear_pointwise(h, head, None, "none", [], "")


@functools.cache
def _scripted_step() -> Any:
    """`_packed_step` compiled by TorchScript once per process; None where that fails (then the eager step runs).

    `torch.jit.script` is deprecated in recent torch (a DeprecationWarning, silenced here); where it is gone or
    fails, decoding falls back to the eager step with the same results."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return torch.jit.script(_packed_step)
    except Exception:  # e.g. no source files to compile from, or a torch without TorchScript
        return None


def _conv1d_weights(module: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """A GPT-2 Conv1D's (weight (in, out), bias); a LoRA-wrapped one (PEFT) with its active adapters folded in,
    weight + (alpha / r) B A in the weight's own layout (what PEFT's merge adds), unless they are off or merged."""
    base = getattr(module, "base_layer", None)
    if base is None:
        return module.weight.detach(), module.bias.detach()
    weight = base.weight.detach()
    if not module.disable_adapters and not module.merged:
        for name in module.active_adapters:
            if name in module.lora_A:
                weight = weight + module.get_delta_weight(name).detach().to(weight.dtype)
    return weight, base.bias.detach()


def _can_pack(dtype: torch.dtype, device: torch.device) -> bool:
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.bfloat16:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return dtype == torch.float32


class FastGPT2:
    """GPT-2 decoding with a static KV cache over the weights of a GPT2LMHeadModel (prepacked or cast once per call).

    Per layer, a decode step is 10 ops: layer norm, QKV linear (output columns ordered head-major so that a head's
    q, k and v sit together), one copy of k and v into the cache, baddbmm (+ key padding bias), softmax, bmm,
    projection + residual, layer norm, FC + GELU, output + residual. The attention scale is folded into the q rows.
    Over prepacked weights a whole step (embedding to logits) runs as one TorchScript call, `_packed_step`.
    """

    ACTIVATIONS = {
        "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
        "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
        "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),
        "gelu": F.gelu,
        "relu": F.relu,
        "none": lambda x: x,
    }
    ONEDNN_ACT = {
        "gelu_new": ("gelu", "tanh"),
        "gelu_pytorch_tanh": ("gelu", "tanh"),
        "gelu_fast": ("gelu", "tanh"),
        "gelu": ("gelu", "none"),
        "relu": ("relu", ""),
        "none": ("none", ""),
    }

    PACK_LAYERS = True
    # decode steps over prepacked weights as one TorchScript call (`_packed_step`)
    SCRIPTED_STEP = True

    # decode steps with batch x n_embd up to this run on one thread (tiny: 16 x 256, small: 16 x 384)
    SINGLE_THREAD_WIDTH = 16 * 1024
    # with more threads allowed, a batch is split into parts of at least this many rows, decoded side by side
    MIN_PART_ROWS = 8

    # layers whose LoRA adapters (PEFT) are folded into the weights when they are cast (`_conv1d_weights`)
    LORA_LAYERS = ("c_attn", "c_proj", "c_fc")

    @classmethod
    def supports(cls, model: Any) -> bool:
        """GPT-2 weights, plain or with plain LoRA adapters on the block linears (a PPO policy under `lora.*`)."""
        config = getattr(model, "config", None)
        if not (
            type(model).__name__ == "GPT2LMHeadModel"
            and getattr(config, "activation_function", "") in cls.ACTIVATIONS
            and not getattr(config, "add_cross_attention", False)
        ):
            return False
        for name, module in model.named_modules():
            if hasattr(module, "base_layer") and (  # PEFT-wrapped: only plain LoRA on the block linears
                name.rsplit(".", 1)[-1] not in cls.LORA_LAYERS
                or any(getattr(module, "use_dora", {}).values())
                or not hasattr(module, "get_delta_weight")
            ):
                return False
        return True

    def __init__(self, model: Any, bf16: bool = False, rows: int = 16, threads: int = 1):
        """`threads` > 1: cast and prepack the weights in that many Python threads, as when the batch is then decoded
        in that many parts side by side (the set-up of every call; tiny preset, warm: 12.5 ms on one thread, 8.2 ms
        on two, of a ~165 ms 2-part call)."""
        config = model.config
        weight_dtype = model.lm_head.weight.dtype
        self.dtype = torch.bfloat16 if bf16 else weight_dtype
        # The KV cache and attention stay in the model's dtype: bf16 pays off in the weight GEMMs, while the
        # batched single-query attention GEMMs run 2x slower in bf16 on CPU (measured: 98 vs 53 us per layer).
        self.cache_dtype = weight_dtype
        self.device = model.lm_head.weight.device
        self.n_head = config.n_head
        self.head_dim = config.n_embd // config.n_head
        self.eps = config.layer_norm_epsilon
        packed = _can_pack(self.dtype, self.device)
        heads, dim, width = self.n_head, self.head_dim, config.n_embd

        def cast(w: torch.Tensor) -> torch.Tensor:
            return w.detach().to(self.dtype)

        def linear(conv1d: Any, act: str = "none", order: torch.Tensor | None = None, scale=None) -> tuple:
            weight, bias = _conv1d_weights(conv1d)  # Conv1D stores (in, out)
            if order is not None:
                weight, bias = weight[:, order] * scale, bias[order] * scale
            return _linear(cast(weight).t(), cast(bias), act, rows, packed and self.PACK_LAYERS)

        tr = model.transformer
        self.wte, self.wpe = cast(tr.wte.weight), cast(tr.wpe.weight)
        self.act = FastGPT2.ONEDNN_ACT[config.activation_function]
        self.ln_f = (cast(tr.ln_f.weight), cast(tr.ln_f.bias))
        # QKV output columns (3, H, D) -> (H, 3, D): one head's q, k, v are adjacent, so q of all heads is a
        # (B*H, 1, D) view and k, v land in the cache with one copy.
        order = torch.arange(3 * width).view(3, heads, dim).transpose(0, 1).reshape(-1)

        def layer(i: int) -> tuple:
            block = tr.h[i]
            scale = dim**-0.5 if config.scale_attn_weights else 1.0
            if config.scale_attn_by_inverse_layer_idx:
                scale /= float(i + 1)
            q_scale = torch.ones(heads, 3, dim, dtype=block.attn.c_attn.weight.dtype, device=self.device)
            q_scale[:, 0] = scale
            return (
                (cast(block.ln_1.weight), cast(block.ln_1.bias)),
                linear(block.attn.c_attn, order=order, scale=q_scale.view(-1)),
                linear(block.attn.c_proj),
                (cast(block.ln_2.weight), cast(block.ln_2.bias)),
                linear(block.mlp.c_fc, config.activation_function),
                linear(block.mlp.c_proj),
            )

        # job 0: the LM head (about one layer's work for the tiny model), job i + 1: layer i; thread k takes jobs
        # k, k + threads, ...
        built: list[Any] = [None] * (len(tr.h) + 1)

        def build(k: int) -> None:
            for job in range(k, len(built), threads):
                if job == 0:
                    built[0] = _linear(cast(model.lm_head.weight).contiguous(), None, "none", rows, packed)[0]
                else:
                    built[job] = layer(job - 1)

        threads = max(1, min(threads, len(built)))
        if threads > 1:
            _side_by_side(build, threads, torch.is_inference_mode_enabled(), pin_caller=False)
        else:
            build(0)
        self.head, self.layers = built[0], built[1:]
        # Every weight prepacked: decode steps run as one TorchScript call (`_packed_step`) where it compiles.
        self.step_weights: list[torch.Tensor] | None = None
        self.scripted = _scripted_step() if packed and self.PACK_LAYERS and self.SCRIPTED_STEP else None
        if self.scripted is not None:
            self.step_weights = [
                w
                for ln1, (qkv, _), (proj, _), ln2, (fc, _), (out, _) in self.layers
                for w in (*ln1, *qkv.packed, *proj.packed, *ln2, *fc.packed, *out.packed)
            ]

    def _prefill(self, x: torch.Tensor, cache: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The prompt (B, P, C) through every block, filling cache[:, :, :, :, :P]; returns the last position (B, C).

        The last block needs its output at the last position only (the other positions' k and v are all later
        steps read), so its attention runs for one query row and its MLP for one position.
        """
        batch, plen, width = x.shape
        last = len(self.layers) - 1
        for i, ((ln1_w, ln1_b), (qkv_fn, _), (_, proj), (ln2_w, ln2_b), (fc, _), (_, out)) in enumerate(
            self.layers
        ):
            qkv = qkv_fn(F.layer_norm(x, (width,), ln1_w, ln1_b, self.eps))
            qkv = qkv.view(batch, plen, self.n_head, 3, self.head_dim)
            layer_cache = cache[i]
            layer_cache[:, :, :, :plen].copy_(qkv[:, :, :, 1:].permute(0, 2, 3, 1, 4))
            q = qkv[:, :, :, 0].transpose(1, 2)  # (B, H, P, D)
            if i == last:
                q, mask, x = q[:, :, -1:], mask[:, :, -1:], x[:, -1:]
            att = F.scaled_dot_product_attention(
                q.to(self.cache_dtype),
                layer_cache[:, :, 0, :plen],
                layer_cache[:, :, 1, :plen],
                attn_mask=mask,
                scale=1.0,
            )
            att = att.transpose(1, 2).reshape(batch, -1, width).to(x.dtype)
            x = proj(att, x)
            x = out(fc(F.layer_norm(x, (width,), ln2_w, ln2_b, self.eps)), x)
        return x[:, -1]

    def _step(self, x: torch.Tensor, cache: torch.Tensor, t: int, key_bias: torch.Tensor) -> torch.Tensor:
        """One decode step: x (B, C) at cache slot t, key_bias (B*H, 1, >t) -> hidden state (B, C)."""
        batch, width = x.shape
        heads, dim, end = batch * self.n_head, self.head_dim, t + 1
        bias = key_bias[:, :, :end]
        for layer, layer_cache in zip(self.layers, cache):
            (ln1_w, ln1_b), (qkv_fn, _), (_, proj), (ln2_w, ln2_b), (fc, _), (_, out) = layer
            qkv = qkv_fn(F.layer_norm(x, (width,), ln1_w, ln1_b, self.eps)).view(batch, self.n_head, 3, dim)
            layer_cache[:, :, :, t].copy_(qkv[:, :, 1:])
            keys = layer_cache[:, :, 0, :end].view(heads, end, dim)
            values = layer_cache[:, :, 1, :end].view(heads, end, dim)
            q = qkv[:, :, 0].view(heads, 1, dim).to(self.cache_dtype)
            att = torch.bmm(torch.baddbmm(bias, q, keys.transpose(1, 2)).softmax(-1), values)
            x = proj(att.view(batch, width).to(x.dtype), x)
            x = out(fc(F.layer_norm(x, (width,), ln2_w, ln2_b, self.eps)), x)
        return x

    def decode_parts(self, prompts: list[list[int]], parts: int, *, max_new: int, **settings: Any):
        """`decode` over `parts` slices of the batch, side by side in Python threads: lists of (tokens, logprobs).

        The uniform draws of the whole rollout come from the generator first (row i's draws are the same however
        the batch is split), so results do not depend on thread timing.
        """
        batch = len(prompts)
        uniforms = None
        if not settings["greedy"]:
            uniforms = torch.rand(max_new, 2, batch, 1, generator=settings["generator"], device=self.device)
        bounds = [batch * i // parts for i in range(parts + 1)]
        slices = [slice(a, b) for a, b in zip(bounds, bounds[1:])]
        results: list[Any] = [None] * parts

        def work(i: int) -> None:
            u = None if uniforms is None else uniforms[:, :, slices[i]]
            results[i] = self.decode(prompts[slices[i]], max_new=max_new, uniforms=u, **settings)

        _side_by_side(work, parts, True, pin_caller=True)
        return [r[0] for r in results], [r[1] for r in results]

    def decode(
        self,
        prompts: list[list[int]],
        *,
        max_new: int,
        eos: int,
        pad: int,
        uniforms: torch.Tensor | None = None,
        **choice: Any,
    ):
        """(tokens (B, t), logprobs (B, t)) with -1 where a row was no longer generating.

        `uniforms` (max_new, 2, B, 1): the random draws of every step (else drawn from the generator per step).
        """
        # logits / T == (ln_f with weight and bias / T) @ head: the temperature costs no (B, V) pass per step.
        ln_f = tuple(w / choice["temperature"] for w in self.ln_f)
        width = self.wte.shape[1]

        def logits_of(h: torch.Tensor) -> torch.Tensor:
            return self.head(F.layer_norm(h, (width,), *ln_f, self.eps))

        # A prompt given several times (K responses per prompt) is prefilled once, its cache rows then copied.
        first: dict[tuple[int, ...], int] = {}
        source = [first.setdefault(tuple(p), len(first)) for p in prompts]
        ids, mask = _left_pad([list(p) for p in first], pad, self.device)
        batch, (n_unique, plen) = len(prompts), ids.shape
        total = plen + max_new
        cache = torch.empty(
            (len(self.layers), n_unique, self.n_head, 2, total, self.head_dim),
            dtype=self.cache_dtype,
            device=self.device,
        )
        # Query rows of padding attend to themselves only (their output is never used, but a fully masked row would
        # give NaN).
        causal = torch.ones((plen, plen), dtype=torch.bool, device=self.device).tril()
        allowed = (causal[None] & (mask[:, None, :] == 1)) | torch.eye(
            plen, dtype=torch.bool, device=self.device
        )
        prefill_mask = torch.zeros((n_unique, 1, plen, plen), dtype=self.cache_dtype, device=self.device)
        prefill_mask.masked_fill_(~allowed[:, None], -math.inf)
        x = F.embedding(ids, self.wte) + F.embedding(position_ids_for(mask), self.wpe)
        logits = logits_of(self._prefill(x, cache, prefill_mask))
        if n_unique < batch:
            src = torch.tensor(source, device=self.device)
            cache, logits, mask = (
                cache.index_select(1, src),
                logits.index_select(0, src),
                mask.index_select(0, src),
            )
        # Additive key mask of the decode steps, built once: -inf on left padding; one row per head, so that a step
        # reads it as a (B*H, 1, S) view.
        key_bias = torch.zeros((batch, 1, 1, total), dtype=self.cache_dtype, device=self.device)
        key_bias[:, :, :, :plen].masked_fill_(mask[:, None, None, :] == 0, -math.inf)
        key_bias = key_bias.expand(batch, self.n_head, 1, total).reshape(batch * self.n_head, 1, total)
        # Positional rows of every step, gathered once: row i's t-th response token sits at position len_i + t.
        step_pos = mask.sum(1)[None, :] + torch.arange(max_new, device=self.device)[:, None]  # (T, B)
        step_pe = F.embedding(step_pos.clamp(max=self.wpe.shape[0] - 1), self.wpe)  # (T, B, C)

        rows = torch.arange(batch, device=self.device)  # original row of each active row
        done = torch.zeros(batch, dtype=torch.bool, device=self.device)
        steps: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        for t in range(max_new):
            token, lp = _choose(logits, **choice, scaled=True, u=None if uniforms is None else uniforms[t])
            steps.append((rows, token, lp))
            done = done | (token == eos)
            n_done = int(done.sum())
            if t == max_new - 1 or n_done == done.shape[0]:
                break
            if (
                n_done and n_done * 4 >= done.shape[0]
            ):  # drop finished rows once they are a quarter of the batch
                keep = (~done).nonzero().squeeze(1)
                rows, token, done = rows[keep], token[keep], done[keep]
                cache = cache.index_select(1, keep)
                key_bias = key_bias.view(-1, self.n_head, 1, total).index_select(0, keep).flatten(0, 1)
                step_pe = step_pe.index_select(1, keep)
                uniforms = None if uniforms is None else uniforms.index_select(2, keep)
            if self.scripted is not None:
                pe, head = step_pe[t], self.head.packed[0]
                weights, act, eps = self.step_weights, self.act, self.eps
                logits = self.scripted(
                    token, pe, self.wte, cache, plen + t, key_bias, weights, *act, *ln_f, head, eps
                )
            else:
                x = F.embedding(token, self.wte) + step_pe[t]
                logits = logits_of(self._step(x, cache, plen + t, key_bias))

        tokens = torch.full((batch, len(steps)), -1, dtype=torch.long, device=self.device)
        logprobs = torch.zeros((batch, len(steps)), dtype=torch.float32, device=self.device)
        for t, (row, token, lp) in enumerate(steps):
            tokens[row, t] = token
            logprobs[row, t] = lp.float()
        return tokens, logprobs


def _side_by_side(work: Any, n: int, inference: bool, pin_caller: bool) -> None:
    """work(0), ..., work(n - 1), each in its own Python thread (work(0) in this one), in inference mode or not, the
    new threads on one intra-op thread each (that thread's own OpenMP setting), this one too if `pin_caller`; an
    error is re-raised here."""
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            if i or pin_caller:
                torch.set_num_threads(1)
            with torch.inference_mode(inference):
                work(i)
        except BaseException as error:  # re-raised in the calling thread
            errors.append(error)

    workers = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(1, n)]
    for w in workers:
        w.start()
    run(0)
    for w in workers:
        w.join()
    if errors:
        raise errors[0]
