"""KL coefficient controllers: fixed, or adaptive towards a target KL (Ziegler et al. 2019, sec. 2.2)."""
from __future__ import annotations

from rlhf_fast.config import KLConfig


class KLController:
    """beta for `r_t = score - beta * KL_t`. Adaptive when `target > 0`:
        e = clip(KL / target - 1, -0.2, 0.2);   beta <- beta * (1 + e * n_samples / horizon)
    where KL is the batch's mean per-sequence KL to the reference."""

    def __init__(self, cfg: KLConfig):
        self.value = cfg.coef
        self.target = cfg.target
        self.horizon = cfg.horizon

    @property
    def adaptive(self) -> bool:
        return self.target > 0

    def update(self, kl: float, n_samples: int) -> None:
        if not self.adaptive:
            return
        err = min(max(kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + err * n_samples / self.horizon

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])
