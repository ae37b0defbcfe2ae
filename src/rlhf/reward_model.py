"""The reward model: a causal-LM trunk with a scalar head read at the last real token of prompt + response.

On disk an RM is a plain Hugging Face sequence-classification folder (`num_labels=1`, `pad_token_id` set), so
`transformers.AutoModelForSequenceClassification.from_pretrained(folder)` loads it and, given right-padded inputs
(or left-padded inputs with `position_ids = cumsum(attention_mask) - 1`), returns the same raw scores as
`RewardModel.raw_scores`. Beside the weights, `rlhf_reward.json` holds the normalisation fitted after training:

    score = (raw - shift) * gain        # shift = mean raw score on SFT-policy samples, gain = 1 / their std (or 1)

Two entry points, on purpose distinct:
- `reward_model_from_causal_lm(path)` starts a *new* RM from an LM (our SFT checkpoint or any local HF causal LM):
  trunk weights are kept, the head is fresh (normal, std 1/sqrt(d+1), as in Ziegler et al. 2019);
- `RewardModel.load(path)` loads a *trained* RM and refuses a causal LM folder, whose head would be random.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import torch

from rlhf.data.template import encode_prompt, encode_response
from rlhf.errors import UserError
from rlhf.modeling import ensure_special_tokens, load_tokenizer, local_path
from rlhf.unpadded import trunk_forward

log = logging.getLogger("rlhf")

NORM_FILE = "rlhf_reward.json"


def _architectures(folder: Path) -> list[str]:
    config_file = folder / "config.json"
    if not config_file.exists():
        raise UserError(f"'{folder}' has no config.json: not a Hugging Face checkpoint folder")
    try:
        return list(json.loads(config_file.read_text(encoding="utf-8")).get("architectures") or [])
    except json.JSONDecodeError as exc:
        raise UserError(f"{config_file}: not valid JSON ({exc.msg})") from None


def _is_reward_folder(folder: Path) -> bool:
    return (folder / NORM_FILE).exists() or any(
        a.endswith("ForSequenceClassification") for a in _architectures(folder)
    )


def _quiet_from_pretrained(cls: Any, folder: Path, **kwargs: Any) -> Any:
    """`from_pretrained` without the 'newly initialised weights' warning we expect when adding a head."""
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        return cls.from_pretrained(str(folder), **kwargs)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load a model from '{folder}': {exc}") from None
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that count real tokens only, so left padding does not shift them."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B,) column of the last real token of each row, for left, right or no padding."""
    columns = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (columns * attention_mask.long()).argmax(-1)


class RewardModel(torch.nn.Module):
    """A sequence-classification model (num_labels=1) + its tokenizer + the fitted normalisation."""

    def __init__(self, model: Any, tokenizer: Any, shift: float = 0.0, gain: float = 1.0):
        super().__init__()
        if getattr(model.config, "num_labels", 1) != 1:
            raise UserError(f"a reward model has one output; this one has {model.config.num_labels}")
        self.model = model
        self.tokenizer = tokenizer
        self.shift = float(shift)
        self.gain = float(gain)
        model.config.pad_token_id = tokenizer.pad_token_id

    # ------------------------------------------------------------------------------------------------------
    # Loading and saving

    @classmethod
    def load(cls, path: str | Path, dtype: torch.dtype | None = None) -> RewardModel:
        """A trained reward model folder (written by `save` / `rlhf reward`)."""
        from transformers import AutoModelForSequenceClassification

        folder = local_path(path, "reward model")
        if not _is_reward_folder(folder):
            arch = ", ".join(_architectures(folder)) or "unknown architecture"
            raise UserError(
                f"'{folder}' is a causal LM ({arch}) without a trained reward head; train a reward model from it "
                f"with `rlhf reward model.path={folder}` (reward_model_from_causal_lm), then load that"
            )
        tokenizer = load_tokenizer(folder)
        model = _quiet_from_pretrained(
            AutoModelForSequenceClassification, folder, num_labels=1, dtype=dtype or torch.float32
        )
        norm = {"shift": 0.0, "gain": 1.0}
        if (folder / NORM_FILE).exists():
            norm.update(json.loads((folder / NORM_FILE).read_text(encoding="utf-8")))
        return cls(model.eval(), tokenizer, norm["shift"], norm["gain"])

    def save(self, path: str | Path, extra: dict | None = None) -> Path:
        """Weights + tokenizer (loadable by plain transformers) + `rlhf_reward.json` (normalisation)."""
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        from transformers.utils import logging as hf_logging

        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        try:
            self.model.save_pretrained(folder, safe_serialization=True)
        finally:
            if bars:
                hf_logging.enable_progress_bar()
        self.tokenizer.save_pretrained(folder)
        norm = {"shift": self.shift, "gain": self.gain, **(extra or {})}
        (folder / NORM_FILE).write_text(json.dumps(norm, indent=2) + "\n", encoding="utf-8")
        return folder

    # ------------------------------------------------------------------------------------------------------
    # Scoring

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def raw_scores(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B,) un-normalised scores, with grad; read at the last real token whatever the padding side."""
        attention_mask = attention_mask.to(input_ids.device)
        trunk, head = self.trunk_and_head()
        position_ids = position_ids_from_mask(attention_mask)
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        last = last_token_index(attention_mask)
        hidden, _ = trunk_forward(trunk, input_ids, attention_mask, position_ids)  # (B, L, d)
        return head(hidden[rows, last]).squeeze(-1).float()  # (B,)

    def shared_prompt_scores(
        self, prompts: list[list[int]], responses: list[list[int]], owner: list[int]
    ) -> torch.Tensor:
        """(N,) raw scores of prompts[owner[n]] + responses[n], with grad, each prompt forwarded only once.

        The prompts run left-padded with a KV cache; each response then attends to its own prompt's cached keys
        (selected per response, so K responses of one ranking share one prompt pass). Equal to `raw_scores` on
        the joined sequences up to float rounding. Every response needs at least one token.
        """
        device = self.device
        pad = self.tokenizer.pad_token_id
        width = max(map(len, prompts))
        p_ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        p_mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):
            p_ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
            p_mask[i, width - len(p) :] = 1
        p_ids, p_mask = p_ids.to(device), p_mask.to(device)
        trunk, head = self.trunk_and_head()
        # linear layers on real tokens only where the padding makes that pay (rlhf.unpadded)
        _, cache = trunk_forward(trunk, p_ids, p_mask, position_ids_from_mask(p_mask), use_cache=True)
        index = torch.tensor(owner, dtype=torch.long, device=device)
        cache.batch_select_indices(index)  # (B, ...) -> (N, ...): one copy of its prompt's keys per response
        r_ids, r_mask = self.pad(responses)  # (N, R) right-padded
        lengths = r_mask.sum(1)
        if int(lengths.min()) < 1:
            raise ValueError("shared_prompt_scores needs at least one response token per response")
        mask = torch.cat([p_mask[index], r_mask], dim=1)  # (N, P + R)
        positions = p_mask[index].sum(1, keepdim=True) + torch.arange(r_ids.shape[1], device=device)
        positions = positions.clamp(
            max=self.context - 1
        )  # only pad columns (never read) could pass the context
        hidden, _ = trunk_forward(trunk, r_ids, mask, positions, past=cache, use_cache=True)  # (N, R, d)
        rows = torch.arange(len(responses), device=device)
        return head(hidden[rows, lengths - 1]).squeeze(-1).float()  # (N,)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *,
        prompts: list[list[int]] | None = None,
        responses: list[list[int]] | None = None,
        owner: list[int] | None = None,
    ) -> torch.Tensor:
        """`raw_scores(input_ids, attention_mask)`, or `shared_prompt_scores(prompts, responses, owner)` when
        prompts are given. Training calls the RM through here so a DDP/FSDP wrapper of the whole RewardModel
        sees the forward pass (its gradient all-reduce is armed by the wrapper's forward)."""
        if prompts is not None:
            return self.shared_prompt_scores(prompts, responses or [], owner or [])
        return self.raw_scores(input_ids, attention_mask)

    def trunk_and_head(self) -> tuple[Any, Any]:
        """(the transformer trunk returning hidden states, the scalar `score` head), also under LoRA (PEFT)."""
        model = self.model
        if hasattr(model, "get_base_model"):  # a PeftModel: adapters live inside the base model's layers
            model = model.get_base_model()
        head = getattr(model, "score", None)
        if head is None:
            raise UserError(f"unsupported reward model architecture {type(model).__name__}: no 'score' head")
        return model.base_model, head

    def merge_lora(self) -> None:
        """Fold LoRA adapters (and the trained head) into plain weights, so `save` writes a plain RM folder."""
        if hasattr(self.model, "merge_and_unload"):
            self.model = self.model.merge_and_unload()

    def normalise(self, raw: torch.Tensor) -> torch.Tensor:
        return (raw - self.shift) * self.gain

    @torch.no_grad()
    def score(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B,) normalised scores, no grad."""
        return self.normalise(self.raw_scores(input_ids, attention_mask))

    def encode(
        self, prompt: str, response: str, response_ids: list[int] | None = None, max_length: int = 0
    ) -> list[int]:
        """Template ids of prompt + response (`response_ids` verbatim when given), cut to `max_length`.

        A prompt that leaves no room for a response token is an error; a too-long response is cut at the end.
        """
        limit = max_length or self.context
        prompt_ids = encode_prompt(self.tokenizer, prompt)
        if len(prompt_ids) >= limit:
            raise UserError(
                f"prompt of {len(prompt_ids)} tokens does not fit the reward model's context of {limit} "
                f"with room for a response: '{prompt[:60]}...'"
            )
        ids = list(response_ids) if response_ids is not None else encode_response(self.tokenizer, response)
        return (prompt_ids + ids)[:limit]

    @property
    def context(self) -> int:
        config = self.model.config
        for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
            if getattr(config, attr, None):
                return int(getattr(config, attr))
        return 2048

    def pad(self, sequences: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-pad id lists into (input_ids, attention_mask) on the model's device."""
        width = max(len(s) for s in sequences)
        pad_id = self.tokenizer.pad_token_id
        ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for i, seq in enumerate(sequences):
            ids[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            mask[i, : len(seq)] = 1
        return ids.to(self.device), mask.to(self.device)

    @torch.no_grad()
    def score_texts(
        self, prompts: list[str], responses: list[str], batch_size: int = 16, raw: bool = False
    ) -> list[float]:
        """Normalised (or raw) scores of (prompt, response) pairs through the template."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts for {len(responses)} responses")
        was_training = self.model.training
        self.model.eval()
        out: list[float] = []
        for start in range(0, len(prompts), batch_size):
            seqs = [
                self.encode(p, r)
                for p, r in zip(prompts[start : start + batch_size], responses[start : start + batch_size])
            ]
            scores = self.raw_scores(*self.pad(seqs))
            out.extend((scores if raw else self.normalise(scores)).tolist())
        self.model.train(was_training)
        return out


def reward_model_from_causal_lm(path: str | Path, tokenizer_path: str = "") -> RewardModel:
    """Start a new RM from a local causal LM (e.g. our SFT `model/`): its trunk, plus a fresh small scalar head.

    A folder that already holds a reward model is loaded as it is (its head and normalisation kept), so a
    trained RM can be trained further.
    """
    from transformers import AutoModelForSequenceClassification

    folder = local_path(path, "model checkpoint")
    if _is_reward_folder(folder) and not tokenizer_path:
        log.info("%s already holds a reward model: continuing from its head", folder)
        return RewardModel.load(folder)
    tokenizer = load_tokenizer(tokenizer_path or folder)
    ensure_special_tokens(tokenizer)
    model = _quiet_from_pretrained(
        AutoModelForSequenceClassification, folder, num_labels=1, dtype=torch.float32
    )
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    for attr in ("pad_token_id", "eos_token_id", "bos_token_id"):
        setattr(model.config, attr, getattr(tokenizer, attr))
    head = getattr(model, "score", None)
    if head is None:
        raise UserError(
            f"cannot find the scalar head of {type(model).__name__} (expected an attribute 'score')"
        )
    d = head.weight.shape[1]
    with torch.no_grad():
        head.weight.normal_(0.0, 1.0 / math.sqrt(d + 1))
        if getattr(head, "bias", None) is not None:
            head.bias.zero_()
    return RewardModel(model, tokenizer)
