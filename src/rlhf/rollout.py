"""One PPO rollout batch in one dataclass, and the plumbing from scores to advantages.

Layout (B prompts, prompt columns P, response columns T, L = P + T):

    input_ids   [pad pad BOS Human: ... Assistant:][ r0 r1 ... EOS pad pad ]
                 <------------- P ------------------><--------- T --------->
                                                     ^ response_start = P

Prompts are left-padded and responses right-padded, so response token t of every row sits at column P + t and the
state before it (the logits that predict it) at column P + t - 1. Every per-token tensor is (B, T) over response
positions; `response_mask` is True on real response tokens, the first EOS included, False on padding.

Rewards (Ziegler et al. 2019; Stiennon et al. 2020): each response token gets the per-token KL penalty
`-beta * (logp - logp_ref)`, and the last real token also gets the reward model's score. Padding gets nothing.
With `kl_in_loss` the rewards hold the score only and the policy loss carries beta times the exact KL over the
vocabulary at every response position instead (`losses.kl_exact`; the rollout then keeps the reference's full
log-probabilities).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields, replace
from typing import Any

import torch

from rlhf.losses import gae, kl_k1, masked_var, masked_whiten, rloo_advantages
from rlhf.unpadded import trunk_forward


@dataclass
class Rollout:
    """Everything one PPO iteration needs about its sampled batch. Shapes in comments; None until computed."""

    input_ids: torch.Tensor  # (B, L) long: left-padded prompt ids, then right-padded response ids
    attention_mask: torch.Tensor  # (B, L) long: 1 on real prompt and response tokens
    response_start: int  # P: column of the first response token in every row
    response_ids: torch.Tensor  # (B, T) long: sampled tokens, cut after the first EOS, pad id after it
    response_mask: torch.Tensor  # (B, T) bool: True on real response tokens (EOS included)
    logprobs: torch.Tensor  # (B, T) float: log pi_old(token) at the sampling temperature, 0 on padding
    finished: torch.Tensor  # (B,) bool: the response ended with EOS
    ref_logprobs: torch.Tensor | None = None  # (B, T) float: log pi_ref(token) at the sampling temperature
    values: torch.Tensor | None = (
        None  # (B, T) float: V(state before token t) from the value model at sampling
    )
    raw_scores: torch.Tensor | None = None  # (B,) float: the reward model's (normalised) score as read
    scores: torch.Tensor | None = None  # (B,) float: score after the missing-EOS rule, scaling and clipping
    kl: torch.Tensor | None = None  # (B, T) float: per-token k1 = logp - logp_ref, 0 on padding
    rewards: torch.Tensor | None = (
        None  # (B, T) float: -beta * kl on every token + score on the last real one
    )
    advantages: torch.Tensor | None = (
        None  # (B, T) float: GAE (or RLOO) advantages, whitened over real tokens
    )
    returns: torch.Tensor | None = (
        None  # (B, T) float: GAE: advantages + values (value targets); RLOO: returns
    )
    ref_log_softmax: torch.Tensor | None = None  # (B, T, V) float: log pi_ref(. | state); KL in the loss only
    loss_kl_coef: float = 0.0  # beta / advantage scale, for the exact KL in the loss; 0 = KL in rewards

    @property
    def batch_size(self) -> int:
        return self.response_ids.shape[0]

    @property
    def lengths(self) -> torch.Tensor:  # (B,) long: real response tokens per row
        return self.response_mask.sum(1)

    def select(self, index: torch.Tensor) -> Rollout:
        """The rows `index` (a minibatch), every tensor field sliced alike."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = value[index] if isinstance(value, torch.Tensor) else value
        return replace(self, **out)

    def trimmed(self) -> Rollout:
        """The same rows without the columns that are padding in every row: leading prompt columns (left padding)
        and trailing response columns past the longest response. Positions count real tokens only and every loss
        sums over the response mask, so forward passes and losses over the trimmed layout are the same; a
        minibatch of short prompts or short responses then costs only its own length."""
        real = self.attention_mask[:, : self.response_start].any(0)  # (P,) prompt columns some row uses
        left = int(real.long().argmax()) if bool(real.any()) else 0
        width = max(int(self.lengths.max()), 1)  # response columns some row uses
        if left == 0 and width == self.response_mask.shape[1]:
            return self
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("input_ids", "attention_mask"):
                value = value[:, left : self.response_start + width]
            elif isinstance(value, torch.Tensor) and value.dim() >= 2:
                value = value[:, :width]  # (B, T) per-token fields, (B, T, V) per-position distributions
            out[f.name] = value
        out["response_start"] = self.response_start - left
        return replace(self, **out)


def shape_scores(
    raw_scores: torch.Tensor,
    finished: torch.Tensor,
    *,
    missing_eos: str = "penalty",
    missing_eos_value: float = 0.0,
    scale: float = 1.0,
    clip: float = 0.0,
) -> torch.Tensor:
    """Score each response gets as its final reward (B,).

    missing_eos: "penalty" subtracts `missing_eos_value` from responses that never produced EOS, "replace" gives them
    `missing_eos_value` as their score, "none" leaves them alone. Then the score is multiplied by `scale` and, when
    `clip` > 0, clipped to [-clip, clip].
    """
    scores = raw_scores.float().clone()
    if missing_eos == "penalty":
        scores = torch.where(finished, scores, scores - missing_eos_value)
    elif missing_eos == "replace":
        scores = torch.where(finished, scores, torch.full_like(scores, missing_eos_value))
    elif missing_eos != "none":
        raise ValueError(f"missing_eos must be penalty, replace or none, not {missing_eos!r}")
    scores = scores * scale
    if clip > 0:
        scores = scores.clamp(-clip, clip)
    return scores


def layout_rewards(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards (B, T) and per-token k1 KL (B, T).

    rewards[b, t] = -kl_coef * (logp - logp_ref)[b, t] on real tokens, + scores[b] at the last real token of row b,
    0 on padding. Assumes each row's mask is a prefix (right padding) with at least one real token.
    """
    m = mask.to(logprobs.dtype)
    kl = kl_k1(logprobs, ref_logprobs) * m  # (B, T)
    rewards = -kl_coef * kl  # (B, T)
    last = (mask.long().sum(1) - 1).clamp(min=0)  # (B,)
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows, last] += scores.to(rewards.dtype)
    return rewards, kl


def finish_rollout(
    rollout: Rollout,
    kl_coef: float,
    *,
    gamma: float = 1.0,
    lam: float = 0.95,
    whiten_rewards: bool = False,
    whiten_advantages: bool = True,
    kl_in_loss: bool = False,
    advantage: str = "gae",
    group_size: int = 1,
) -> Rollout:
    """Fill rewards, kl, advantages and returns from scores, log-probs and values (all already in `rollout`).
    `kl_in_loss`: no KL in the rewards; `loss_kl_coef` is set so that the loss's beta * exact KL keeps the balance
    of score and KL that beta sets in the rewards once the advantages are whitened (divided by their scale).
    `advantage="rloo"`: leave-one-out advantages over groups of `group_size` consecutive rows (the same prompt)
    instead of GAE; the values are not used."""
    mask = rollout.response_mask
    rewards, kl = layout_rewards(
        rollout.scores, rollout.logprobs, rollout.ref_logprobs, mask, 0.0 if kl_in_loss else kl_coef
    )
    if whiten_rewards:
        rewards = masked_whiten(rewards, mask, shift_mean=False)
    if advantage == "rloo":
        advantages, returns = rloo_advantages(rewards, mask, group_size)
    else:
        advantages, returns = gae(rewards, rollout.values, mask, gamma, lam)
    scale = 1.0
    if whiten_advantages:
        scale = float(masked_var(advantages, mask).clamp(min=1e-8).sqrt())
        advantages = masked_whiten(advantages, mask)
    rollout.loss_kl_coef = kl_coef / scale if kl_in_loss else 0.0
    rollout.rewards, rollout.kl, rollout.advantages, rollout.returns = rewards, kl, advantages, returns
    return rollout


# ---------------------------------------------------------------------------------------------------------------
# Model-level parallelism: independent models on their own cores; the allocator.


def keep_freed_memory() -> bool:
    """Keep freed memory in the process's heap instead of handing it back to the OS (Linux glibc; elsewhere a no-op).

    glibc serves blocks above its mmap threshold (128 KiB, adapting up to 32 MiB) with fresh mappings and unmaps them
    on free, and trims the heap top; every new (B, T, V) log-softmax, gradient or activation buffer then page-faults
    its pages in again (measured: 13-29 thousand faults and 70-90 ms of kernel time per PPO iteration of the
    benchmark; 1-10 thousand and 10-20 ms after this). The cost: the resident size stays at its peak. Returns
    whether the settings took effect."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        return bool(libc.mallopt(m_mmap_threshold, 256 << 20)) and bool(
            libc.mallopt(m_trim_threshold, 1 << 30)
        )
    except (OSError, AttributeError):
        return False


_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def _forget_pool() -> None:  # a forked child has none of the parent's worker threads: start its own pool
    global _POOL, _POOL_LOCK
    _POOL, _POOL_LOCK = None, threading.Lock()


os.register_at_fork(after_in_child=_forget_pool)


def concurrently(*tasks: Callable[[], Any], enabled: bool = True) -> list[Any]:
    """Run independent tasks (each on its own models: policy vs value, reference vs value + reward) at the same time,
    one Python thread each, the intra-op threads split between them; their results in order.

    Why: at these sizes one op on one core is far more efficient than one op split over two (fork/join per op, and
    on a busy machine a spinning partner thread), so two models side by side on one core each finish sooner than one
    after the other on two. Each task's arithmetic is the same as on its own (same ops, one thread each), so runs
    stay deterministic. Torch ops release the GIL. Grad mode (thread-local) is carried into the workers; autocast is
    thread-local too, so each task enters its own. With fewer intra-op threads than tasks, or `enabled` false (a GPU:
    its kernels are asynchronous already), they run one after another.
    """
    global _POOL
    threads = torch.get_num_threads()
    if not enabled or len(tasks) < 2 or threads < len(tasks):
        return [task() for task in tasks]
    grad, share = torch.is_grad_enabled(), threads // len(tasks)

    def call(task: Callable[[], Any]) -> Any:
        torch.set_num_threads(share)  # OpenMP's and MKL's counts are per calling thread: set them in each
        with torch.set_grad_enabled(grad):
            return task()

    with _POOL_LOCK:
        if _POOL is None or _POOL._max_workers < len(tasks) - 1:
            _POOL = ThreadPoolExecutor(len(tasks) - 1, thread_name_prefix="rlhf-model")
    torch.set_num_threads(share)
    try:
        futures = [_POOL.submit(call, task) for task in tasks[1:]]
        try:
            first = call(tasks[0])
        finally:
            for future in futures:  # never leave a worker running (threads are restored below)
                future.exception()
        return [first, *(future.result() for future in futures)]
    finally:
        torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------------------------
# Forward passes over a rollout's layout: only the response columns reach the LM head or the value head.


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counting real tokens only, so left padding does not shift them (as the sampler does)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def prompt_columns(prompt_ids: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids (B, P), mask (B, P)): the prompts left-padded to the longest, as `join_prompt_response` lays them out."""
    from rlhf.sampling import _left_pad  # the sampler's own layout, so the two can never disagree

    return _left_pad(prompt_ids, pad_id, "cpu")


def prefix_cache(trunk: torch.nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> Any | None:
    """KV cache of a transformer trunk over the prompt columns but the last (P - 1 of them; None when P = 1).

    It needs no response, so it is computed while the policy samples; the last prompt column, whose state predicts
    the first response token, goes with the response columns (`response_hidden(..., past=)`). Prefix + rest equals
    one pass over the whole sequence up to float rounding (bit-equal in our tests)."""
    if prompt_ids.shape[1] < 2:
        return None
    mask = prompt_mask[:, :-1]
    return trunk_forward(trunk, prompt_ids[:, :-1], mask, position_ids(mask), use_cache=True)[1]


def trunk_states(
    trunk: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    start: int,
    past: Any | None = None,
    through_last: bool = False,
) -> torch.Tensor:
    """(B, T, d) last hidden states of a trunk at the columns start - 1 .. L - 2 (those that predict the response
    tokens), or .. L - 1 with `through_last` (B, T + 1, d). With `past` (a `prefix_cache` of columns < start - 1) only
    the columns from start - 1 on run."""
    first = start - 1 if past is not None else 0
    end = input_ids.shape[1] if through_last else input_ids.shape[1] - 1  # the last column predicts nothing
    hidden, _ = trunk_forward(  # linear layers on real tokens only where that pays (rlhf.unpadded)
        trunk,
        input_ids[:, first:end],
        attention_mask[:, :end],
        position_ids(attention_mask)[:, first:end],
        past=past,
        use_cache=past is not None,
    )
    return hidden[:, start - 1 - first :]


def response_hidden(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    start: int,
    past: Any | None = None,
):
    """(B, T, d) last hidden states at the columns that predict response tokens (start - 1 .. L - 2)."""
    return trunk_states(model.base_model, input_ids, attention_mask, start, past)


def reward_scores(
    reward: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, start: int, past: Any | None = None
) -> torch.Tensor:
    """(B,) normalised reward-model scores read at each row's last real token (`RewardModel.score`), the prompt
    columns but the last taken from `past` (a `prefix_cache` of the reward model's trunk)."""
    trunk, head = reward.trunk_and_head()
    hidden = trunk_states(trunk, input_ids, attention_mask, start, past, through_last=True)  # (B, T + 1, d)
    columns = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    last = (columns * attention_mask.long()).argmax(-1) - (
        start - 1
    )  # (B,) last real token, in hidden's columns
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    return reward.normalise(head(hidden[rows, last]).squeeze(-1).float())


def response_logprobs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    start: int,
    temperature: float,
    *,
    with_logits: bool = False,
    with_log_softmax: bool = False,
    past: Any | None = None,
    rows: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """log pi(response token t | prefix) at `temperature` (B, T), the scaled logits (B, T, V) if asked (or their
    log-softmax, the full log pi(. | prefix), with `with_log_softmax`), and the hidden states (B, T, d) (a shared
    value head reads them). The LM head runs on response columns only; `past` is a `prefix_cache` of the prompt.

    With `rows` (B, T) bool (the response mask) the LM head runs on those positions only: the logits/log-softmax
    come back packed (M, V) in `rows`' row-major order and `logp` is 0 elsewhere. Responses that stop at EOS leave
    a third of the (B, T, V) grid as padding, and every pass over it (head, log-softmax, exact KL, their backward)
    is then skipped."""
    hidden = response_hidden(model, input_ids, attention_mask, start, past)  # (B, T, d)
    states = hidden if rows is None else hidden[rows]  # (B, T, d) or (M, d)
    targets = input_ids[:, start:] if rows is None else input_ids[:, start:][rows]  # (B, T) or (M,)
    # (h W^T) / temperature == (h / temperature) W^T: divide the (B, T, d) states, not the (B, T, V) logits
    logits = model.get_output_embeddings()(states / temperature)  # (B, T, V) or (M, V), bf16 under autocast
    # fp32 log-softmax read straight from the (bf16) logits: no separate fp32 copy of them, nor its backward
    log_softmax = torch.log_softmax(logits, dim=-1, dtype=torch.float32)
    logp = log_softmax.gather(-1, targets[..., None]).squeeze(-1)  # (B, T) or (M,)
    if rows is not None:
        logp = logp.new_zeros(rows.shape).masked_scatter(rows, logp)  # (B, T), 0 on padding
    return logp, (log_softmax if with_log_softmax else logits.float() if with_logits else None), hidden


def fast_gelu(model: torch.nn.Module) -> torch.nn.Module:
    """Swap GPT-2's Python-level tanh GELU ("gelu_new": 8 elementwise ops) for torch's fused kernel of the same
    formula (GELU(approximate="tanh"), as the fast sampler uses); other activations are left alone."""
    from transformers.activations import NewGELUActivation

    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, NewGELUActivation):
                setattr(module, name, torch.nn.GELU(approximate="tanh"))
    return model


class ValueModel(torch.nn.Module):
    """V(state before response token t) from a sequence-classification model: its trunk + its scalar `score` head
    applied at every response column. Initialised from the reward model, as recent PPO recipes do."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, start: int, past: Any | None = None
    ) -> torch.Tensor:
        hidden = response_hidden(self.model, input_ids, attention_mask, start, past)  # (B, T, d)
        return self.model.score(hidden).squeeze(-1).float()  # (B, T)


class SharedValueHead(torch.nn.Module):
    """The shared-backbone option: a scalar head on the policy's own hidden states (one trunk, two heads)."""

    def __init__(self, width: int, init_from: torch.nn.Module | None = None):
        super().__init__()
        self.score = torch.nn.Linear(width, 1)
        with torch.no_grad():
            self.score.bias.zero_()
            if init_from is not None and init_from.weight.shape == self.score.weight.shape:
                self.score.weight.copy_(init_from.weight)
            else:
                self.score.weight.normal_(0.0, width**-0.5)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # (B, T, d) -> (B, T)
        return self.score(hidden).squeeze(-1).float()


class PtxBatches:
    """PPO-ptx (Ouyang et al. 2022): random windows of the pre-training corpus and their LM loss at temperature 1."""

    def __init__(
        self,
        corpus: str,
        tokenizer,
        batch: int,
        seq_len: int,
        generator: torch.Generator,
        max_chars: int = 2_000_000,
    ):
        from pathlib import Path

        from rlhf.errors import UserError

        path = Path(corpus)
        if not path.is_file():
            raise UserError(f"config field 'ptx_corpus': '{corpus}' is not a file")
        text = path.read_text(encoding="utf-8")[:max_chars]
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) <= seq_len:
            raise UserError(
                f"config field 'ptx_corpus': '{corpus}' is shorter than ptx_seq_len={seq_len} tokens"
            )
        self.ids = torch.tensor(ids, dtype=torch.long)
        self.batch, self.seq_len, self.generator = batch, seq_len, generator

    def loss(self, model: torch.nn.Module, bf16: bool = False, device: str = "cpu") -> torch.Tensor:
        starts = torch.randint(0, len(self.ids) - self.seq_len, (self.batch,), generator=self.generator)
        window = torch.stack([self.ids[s : s + self.seq_len] for s in starts.tolist()])  # (b, S)
        with torch.autocast(
            "cuda" if str(device).startswith("cuda") else "cpu", torch.bfloat16, enabled=bf16
        ):
            logits = model(input_ids=window, use_cache=False).logits[:, :-1]  # (b, S-1, V)
        return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), window[:, 1:].flatten())
