"""Finding and naming the policies `rlhf eval` compares: short labels from run-folder paths (unique even across
runs), the model folder inside a checkpoint, a PPO stage's snapshots in step order, and the prompts to sample."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from rlhf.data.demonstrations import read_prompts as read_prompt_file
from rlhf.errors import UserError


def policy_label(path: str | Path, depth: int = 0) -> str:
    """A short name: runs/demo/round-1/ppo/model -> round-1/ppo; .../ppo/snapshots/iter-000040 -> round-1/ppo@40.
    `depth` > 0 keeps at least that many trailing folders (see `unique_labels`)."""
    parts = list(Path(path).parts)
    step = ""
    for marker in ("checkpoints", "snapshots"):
        if marker in parts:
            i = parts.index(marker)
            name = parts[i + 1] if i + 1 < len(parts) else ""
            digits = name.rsplit("-", 1)[-1]
            step = f"@{int(digits)}" if digits.isdigit() else ""
            parts = parts[:i]
            break
    while parts and parts[-1] in ("model", "policy"):
        parts.pop()
    keep = parts[-2:] if len(parts) >= 2 and parts[-2].startswith("round-") else parts[-1:]
    if depth > len(keep):
        keep = parts[-depth:]
    return "/".join(keep) + step


def unique_labels(paths: list[Path], taken: tuple[str, ...] = ()) -> list[str]:
    """`policy_label` of each path, lengthened by leading folders where two would be equal (runs/a/ppo/model and
    runs/b/ppo/model: a/ppo and b/ppo) or equal one in `taken` (the reference's), so no result overwrites another."""
    depths = [0] * len(paths)
    for _ in range(16):
        labels = [policy_label(p, d) for p, d in zip(paths, depths)]
        counts = Counter([*labels, *taken])
        clashes = [i for i, label in enumerate(labels) if counts[label] > 1]
        if not clashes:
            return labels
        for i in clashes:
            depths[i] = len(labels[i].split("@")[0].split("/")) + 1
    raise UserError(f"policies with indistinguishable paths: {sorted(set(labels))}")


def policy_method(label: str) -> str:
    """The method a policy label names: round-2/dpo -> dpo, round-1/ppo@40 -> ppo, sft -> sft."""
    return label.split("@")[0].rsplit("/", 1)[-1]


def model_folder(path: Path) -> Path | None:
    """The causal LM folder inside a final model or a checkpoint (`policy/` part), or None."""
    for candidate in (path / "policy", path):
        if (candidate / "config.json").exists():
            return candidate
    return None


def snapshot_folders(stage_dir: str | Path) -> list[Path]:
    """A PPO stage's kept snapshots (snapshots/iter-N, else its checkpoints) in step order, then its model/."""
    from rlhf.checkpoint import list_checkpoints

    stage_dir = Path(stage_dir)
    snaps = sorted((stage_dir / "snapshots").glob("iter-*"), key=lambda p: int(p.name.split("-")[1]))
    found = [f for f in (model_folder(c) for c in snaps or list_checkpoints(stage_dir)) if f is not None]
    final = model_folder(stage_dir / "model")
    if final is not None:
        if found and _weights_digest(found[-1]) == _weights_digest(final):
            found.pop()  # the last snapshot is the final model: evaluate it once, as the final model
        found.append(final)
    if not found:
        raise UserError(f"config field 'snapshots': {stage_dir} holds no checkpoint and no model/")
    return found


def _weights_digest(folder: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    for path in sorted(folder.glob("*.safetensors")):
        digest.update(path.read_bytes())
    return digest.hexdigest()


def read_prompts(path: str | Path, limit: int) -> list[tuple[str, str]]:
    """The first `limit` (prompt_id, prompt) pairs of a prompt file (any format `rlhf sample` reads)."""
    rows = read_prompt_file(path)
    if not rows:
        raise UserError(f"{path}: no prompts")
    return rows[:limit]
