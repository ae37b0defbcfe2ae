"""The one prompt template. SFT, sampling, the reward model, PPO and DPO all tokenize through these functions.

A prompt and a response are tokenized *separately* and their ids concatenated:

    [BOS] + ids("Human: {prompt}\\n\\nAssistant:")  +  ids(" {response}") + [EOS]

so the ids a policy generates after the prompt are exactly the ids training sees. (Tokenizing the joined string
instead can merge tokens across the boundary and silently shift the loss mask.) The format mirrors Anthropic's
HH-RLHF transcripts, so an imported multi-turn HH prompt is the transcript itself.
"""

from __future__ import annotations

from typing import Any

HUMAN, ASSISTANT = "Human:", "Assistant:"


def format_prompt(prompt: str) -> str:
    """The text the model sees before its response."""
    return f"{HUMAN} {prompt.strip()}\n\n{ASSISTANT}"


def encode_prompt(tokenizer: Any, prompt: str) -> list[int]:
    ids = tokenizer(format_prompt(prompt), add_special_tokens=False)["input_ids"]
    return [tokenizer.bos_token_id, *ids]


def encode_response(tokenizer: Any, response: str, add_eos: bool = True) -> list[int]:
    """Response ids, EOS-terminated so the model learns to stop."""
    ids = tokenizer(" " + response.strip(), add_special_tokens=False)["input_ids"]
    return [*ids, tokenizer.eos_token_id] if add_eos else list(ids)


def decode_response(tokenizer: Any, ids: list[int]) -> str:
    """Text of generated ids, cut at the first EOS, without special tokens or the leading space."""
    eos = tokenizer.eos_token_id
    if eos in ids:
        ids = ids[: ids.index(eos)]
    return tokenizer.decode(ids, skip_special_tokens=True).strip()
