"""KL controllers for the PPO reward penalty `-beta * KL`: a tiny object with `.value` and `.update()`.

Adaptive control follows Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences"
(https://arxiv.org/abs/1909.08593, section 2.2): after each batch,

    e = clip(KL_current / KL_target - 1, -0.2, 0.2)
    beta <- beta * (1 + e * n_steps / horizon)

where `n_steps` is the number of samples in the batch, so beta moves by at most 20% per `horizon` samples.
"""

from __future__ import annotations


class FixedKLController:
    """beta stays where it started."""

    def __init__(self, value: float):
        self.value = float(value)

    def update(self, current_kl: float, n_steps: int) -> float:
        return self.value

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


class AdaptiveKLController(FixedKLController):
    """Proportional control of beta towards a target KL (nats per response), Ziegler et al. 2019."""

    def __init__(self, value: float, target: float, horizon: int):
        if target <= 0 or horizon <= 0:
            raise ValueError("adaptive KL control needs target > 0 and horizon > 0")
        super().__init__(value)
        self.target, self.horizon = float(target), int(horizon)

    def update(self, current_kl: float, n_steps: int) -> float:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value


def make_kl_controller(
    kind: str, value: float, target: float = 6.0, horizon: int = 10_000
) -> FixedKLController:
    """`kind` is "fixed" or "adaptive"."""
    if kind == "fixed":
        return FixedKLController(value)
    if kind == "adaptive":
        return AdaptiveKLController(value, target, horizon)
    raise ValueError(f"unknown KL controller '{kind}' (fixed or adaptive)")
