"""Learning-rate schedules as ``LambdaLR`` factories for Hydra ``_partial_: true`` configs.

Each factory takes the optimizer (``DiffusionModule.configure_optimizers`` passes it) and returns a
``torch.optim.lr_scheduler.LambdaLR`` stepped once per optimizer step. The multipliers are small classes,
not lambdas, so ``LambdaLR.state_dict()`` stores them and a resumed run continues the same schedule.
EDM's learning-rate ramp-up is ``constant`` with ``warmup_steps`` (configs/lr_scheduler/edm_rampup.yaml).
"""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

__all__ = ["constant", "cosine", "inverse_sqrt", "Constant", "Cosine", "InverseSqrt"]


def _check(name: str, value: float, minimum: float = 0) -> None:
    if value < minimum:
        raise ValueError(f"lr_scheduler.{name}={value} is invalid; allowed: a number >= {minimum}")


def _warmup(step: int, warmup_steps: int) -> float:
    """Linear ramp ``min(step / warmup_steps, 1)`` (EDM ``training_loop.py``: lr * min(n_img / rampup, 1),
    so the first step has learning rate 0); 1 when ``warmup_steps`` is 0."""
    return min(step / warmup_steps, 1.0) if warmup_steps > 0 else 1.0


class Constant:
    """Multiplier 1 after a linear warm-up of ``warmup_steps`` optimizer steps."""

    def __init__(self, warmup_steps: int = 0):
        _check("warmup_steps", warmup_steps)
        self.warmup_steps = warmup_steps

    def __call__(self, step: int) -> float:
        return _warmup(step, self.warmup_steps)


class Cosine:
    """Warm-up, then ``final + (1 - final) (1 + cos(pi s / S)) / 2`` over ``S = total_steps - warmup_steps``
    (Loshchilov & Hutter 2017, SGDR eq. 5, without restarts), ``final`` after ``total_steps``."""

    def __init__(self, total_steps: int, warmup_steps: int = 0, final_factor: float = 0.0):
        _check("warmup_steps", warmup_steps)
        _check("total_steps", total_steps, warmup_steps + 1)
        if not 0 <= final_factor <= 1:
            raise ValueError(f"lr_scheduler.final_factor={final_factor} is invalid; allowed: 0 <= value <= 1")
        self.total_steps, self.warmup_steps, self.final_factor = total_steps, warmup_steps, final_factor

    def __call__(self, step: int) -> float:
        progress = min(max(step - self.warmup_steps, 0) / (self.total_steps - self.warmup_steps), 1.0)
        cosine = self.final_factor + (1 - self.final_factor) * 0.5 * (1 + math.cos(math.pi * progress))
        return _warmup(step, self.warmup_steps) * cosine


class InverseSqrt:
    """Warm-up, then ``1 / sqrt(max(step / ref_steps, 1))`` (EDM2, Karras et al. 2024, Sec. 3,
    ``training_loop.learning_rate_schedule``: constant until ``ref_steps``, then decays as ``step^-1/2``)."""

    def __init__(self, ref_steps: int, warmup_steps: int = 0):
        _check("ref_steps", ref_steps, 1)
        _check("warmup_steps", warmup_steps)
        self.ref_steps, self.warmup_steps = ref_steps, warmup_steps

    def __call__(self, step: int) -> float:
        return _warmup(step, self.warmup_steps) / math.sqrt(max(step / self.ref_steps, 1.0))


def constant(optimizer: Optimizer, warmup_steps: int = 0) -> LambdaLR:
    """Constant learning rate after a linear warm-up (``warmup_steps`` > 0 is EDM's ramp-up)."""
    return LambdaLR(optimizer, Constant(warmup_steps))


def cosine(optimizer: Optimizer, total_steps: int, warmup_steps: int = 0,
           final_factor: float = 0.0) -> LambdaLR:
    """Linear warm-up then cosine decay to ``final_factor`` times the base rate at ``total_steps``."""
    return LambdaLR(optimizer, Cosine(total_steps, warmup_steps, final_factor))


def inverse_sqrt(optimizer: Optimizer, ref_steps: int, warmup_steps: int = 0) -> LambdaLR:
    """Linear warm-up then EDM2's inverse-square-root decay after ``ref_steps``."""
    return LambdaLR(optimizer, InverseSqrt(ref_steps, warmup_steps))
