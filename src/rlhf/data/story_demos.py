"""The demo's story-continuation task, cut deterministically from the shipped children's-stories corpus.

Each narrative paragraph of the corpus gives one example: its opening sentence(s) become the prompt

    "Continue the story: Once there was a little yellow Tulip, and she lived down in a little dark house ..."

and the sentence(s) that follow become the human-written demonstration. Paragraphs are dealt, in a fixed shuffled
order (seeded), into three disjoint sets: SFT demonstrations, RLHF prompts (sampled, labelled and optimised on) and
held-out evaluation prompts. Standard library only.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path

from rlhf.data.records import Demonstration, write_jsonl
from rlhf.errors import UserError

INSTRUCTION = "Continue the story:"
_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n")
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+(?=[\"'(\[]?[A-Z])")


@dataclass
class StoryData:
    demos: list[Demonstration]  # SFT demonstrations: prompt -> human continuation
    prompts: list[str]  # RLHF training prompts
    eval_prompts: list[str]  # held out: never sampled for labels or optimised on
    eval_references: list[str]  # the corpus continuation of each eval prompt (for reading, not scoring)


def _clean(paragraph: str) -> str:
    text = " ".join(paragraph.split())
    return text.replace("_", "").replace("--", " - ")


def _is_narrative(raw: str, text: str) -> bool:
    """Prose, not a title (all capitals), verse (indented lines) or a bracketed note."""
    letters = [c for c in text if c.isalpha()]
    if len(letters) < 40 or text.upper() == text:
        return False
    if any(line.startswith("    ") for line in raw.splitlines()):
        return False
    return not text.startswith("[")


def sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE_END.split(text) if s.strip()]


def story_examples(
    text: str, max_prompt_words: int = 30, min_response_words: int = 6, max_response_words: int = 30
) -> list[tuple[str, str]]:
    """(opening, continuation) pairs, one per narrative paragraph that has both, in corpus order."""
    pairs = []
    for raw in _PARAGRAPH_BREAK.split(text):
        clean = _clean(raw)
        if not _is_narrative(raw, clean):
            continue
        sents = sentences(clean)
        if len(sents) < 2:
            continue
        opening, rest = [sents[0]], sents[1:]
        while rest and len(" ".join(opening + rest[:1]).split()) <= max_prompt_words // 2:
            opening.append(rest.pop(0))
        response: list[str] = []
        for sent in rest:
            if len(" ".join(response + [sent]).split()) > max_response_words:
                break
            response.append(sent)
        prompt_text, response_text = " ".join(opening), " ".join(response)
        if len(prompt_text.split()) > max_prompt_words or len(response_text.split()) < min_response_words:
            continue
        pairs.append((prompt_text, response_text))
    return pairs


def build_story_data(
    corpus: str | Path, n_demos: int, n_prompts: int, n_eval: int, seed: int = 0, max_response_words: int = 30
) -> StoryData:
    """Deal the corpus's story examples into SFT demos, RLHF prompts and held-out eval prompts (disjoint)."""
    path = Path(corpus)
    if not path.is_file():
        raise UserError(f"story corpus not found: {path}")
    pairs = story_examples(path.read_text(encoding="utf-8"), max_response_words=max_response_words)
    need = n_demos + n_prompts + n_eval
    if need > len(pairs):
        raise UserError(
            f"{path} yields {len(pairs)} story examples; {n_demos} demos + {n_prompts} prompts + {n_eval} eval "
            f"prompts = {need} asked for"
        )
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    picked = [pairs[i] for i in order[:need]]
    demo_pairs = picked[:n_demos]
    prompt_pairs = picked[n_demos : n_demos + n_prompts]
    eval_pairs = picked[n_demos + n_prompts :]
    return StoryData(
        demos=[Demonstration(f"{INSTRUCTION} {p}", r, source=f"story:{path.name}") for p, r in demo_pairs],
        prompts=[f"{INSTRUCTION} {p}" for p, _ in prompt_pairs],
        eval_prompts=[f"{INSTRUCTION} {p}" for p, _ in eval_pairs],
        eval_references=[r for _, r in eval_pairs],
    )


def write_story_data(data: StoryData, out_dir: str | Path) -> dict[str, Path]:
    """demos.jsonl ({prompt, response, source}), prompts.jsonl and eval_prompts.jsonl ({prompt_id, prompt})."""
    out = Path(out_dir)
    paths = {
        "demos": out / "demos.jsonl",
        "prompts": out / "prompts.jsonl",
        "eval_prompts": out / "eval_prompts.jsonl",
    }
    write_jsonl(paths["demos"], data.demos)
    write_jsonl(paths["prompts"], ({"prompt_id": f"p{i}", "prompt": p} for i, p in enumerate(data.prompts)))
    write_jsonl(
        paths["eval_prompts"],
        (
            {"prompt_id": f"e{i}", "prompt": p, "reference": r}
            for i, (p, r) in enumerate(zip(data.eval_prompts, data.eval_references))
        ),
    )
    return paths


def main(argv: list[str] | None = None) -> None:
    """`python -m rlhf.data.story_demos OUT_DIR [DEMOS PROMPTS EVAL SEED]`, run from the repository root: write the
    story task for the stage-by-stage commands. The shipped `data/story/` is this with the demo's sizes (600 demos,
    768 prompts, 32 eval prompts, seed 0), the same split `rlhf loop --config configs/demo.yaml` makes."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    if not 1 <= len(args) <= 5:
        raise SystemExit(main.__doc__)
    sizes = [int(a) for a in args[1:]] + [600, 768, 32, 0][len(args) - 1 :]
    paths = write_story_data(build_story_data("data/corpus/children_stories_5books.txt", *sizes), args[0])
    print("\n".join(str(p) for p in paths.values()))  # noqa: T201


if __name__ == "__main__":
    main()
