"""Learning-rate schedules stepped per iteration: poly, multi-step and cosine, each with optional warmup.

Each schedule is a picklable callable giving the lr factor for an iteration, wrapped in LambdaLR, so a
resumed run continues at the exact position (LambdaLR stores `last_epoch`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.optim.lr_scheduler import LambdaLR

SCHEDULES = ("poly", "multistep", "cosine", "constant")


@dataclass
class LRFactor:
    """lr(step) = base_lr * warmup(step) * decay(step)."""

    name: str
    total_steps: int
    warmup_steps: int = 0
    warmup_factor: float = 0.001
    power: float = 0.9
    milestones: Sequence[int] = ()
    gamma: float = 0.1
    min_factor: float = 0.0

    def __post_init__(self) -> None:
        if self.name not in SCHEDULES:
            raise ValueError(f"scheduler.name={self.name!r} is not a known schedule; choose one of {SCHEDULES}")
        if self.total_steps <= 0:
            raise ValueError(f"the schedule needs a positive number of steps, got total_steps={self.total_steps}")

    def __call__(self, step: int) -> float:
        return self.warmup(step) * self.decay(step)

    def warmup(self, step: int) -> float:
        """Linear warmup from `warmup_factor` to 1 over `warmup_steps` (Detectron2's WarmupLR)."""
        if step >= self.warmup_steps:
            return 1.0
        alpha = step / self.warmup_steps
        return self.warmup_factor * (1 - alpha) + alpha

    def decay(self, step: int) -> float:
        progress = min(step, self.total_steps) / self.total_steps
        if self.name == "poly":
            return max((1 - progress) ** self.power, self.min_factor)
        if self.name == "cosine":
            return self.min_factor + (1 - self.min_factor) * 0.5 * (1 + math.cos(math.pi * progress))
        if self.name == "multistep":
            return self.gamma ** sum(step >= milestone for milestone in self.milestones)
        return 1.0


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    name: str = "poly",
    warmup_steps: int = 0,
    warmup_factor: float = 0.001,
    power: float = 0.9,
    milestones: Sequence[float] = (),
    gamma: float = 0.1,
    min_factor: float = 0.0,
) -> LambdaLR:
    """A per-iteration LambdaLR. `milestones` are iterations, or fractions of `total_steps` when all < 1."""
    steps = [int(m * total_steps) if 0 < m < 1 else int(m) for m in milestones]
    if steps != sorted(steps):
        raise ValueError(f"scheduler.milestones must increase, got {list(milestones)}")
    factor = LRFactor(name, int(total_steps), warmup_steps, warmup_factor, power, steps, gamma, min_factor)
    return LambdaLR(optimizer, factor)
