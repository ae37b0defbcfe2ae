"""rlhf: the whole RLHF loop (pretrain -> SFT -> feedback -> reward model -> PPO -> evaluate) in one tool."""

import os

# Never reach a model hub: every model, tokenizer and data set comes from a local path.
for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# Our own progress bars say what a stage is doing; transformers' per-load/save bars only clutter the logs.
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

__version__ = "0.1.0"
