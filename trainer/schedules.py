"""Learning-rate schedules as pure functions of the step: each is a small frozen dataclass, `lr = s(step)`.

- `CosineSchedule`: linear warmup to `max_lr`, cosine decay to `min_lr` (a continued run re-warms and
  re-decays by building a fresh one).
- `InfiniteSchedule`: the infinite schedule of Ibrahim et al. 2024: warmup, cooldown to a constant rate,
  a constant phase of any length, then an exponential anneal to `min_lr`. A checkpoint taken before the
  anneal can be continued at the constant rate with no re-warming.
- `WSDSchedule`: warmup-stable-decay with the 1-sqrt cooldown of Hägele et al. 2024.

Steps past `total_steps` hold the final rate. A continued run that should not re-warm evaluates its
schedule at `offset + step` (`--lr-start-step`); `build_schedule` sizes the schedule for that.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

SCHEDULES = ("cosine", "infinite", "wsd")


def _warmup(step: int, warmup_steps: int, max_lr: float) -> float:
    # (step + 1) so that the very first update already moves the weights.
    return max_lr * (step + 1) / warmup_steps


@dataclass(frozen=True)
class CosineSchedule:
    max_lr: float
    min_lr: float
    warmup_steps: int
    total_steps: int

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return _warmup(step, self.warmup_steps, self.max_lr)
        decay_steps = max(self.total_steps - self.warmup_steps, 1)
        progress = min((step - self.warmup_steps) / decay_steps, 1.0)
        return self.min_lr + 0.5 * (self.max_lr - self.min_lr) * (1.0 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class InfiniteSchedule:
    max_lr: float
    const_lr: float
    min_lr: float
    warmup_steps: int
    cooldown_steps: int  # from max_lr down to const_lr, right after the warmup
    anneal_steps: int  # the last anneal_steps of total_steps decay exponentially to min_lr
    total_steps: int
    cooldown_shape: str = "cosine"  # or "inv_sqrt"

    def __post_init__(self) -> None:
        if self.warmup_steps + self.cooldown_steps > self.total_steps - self.anneal_steps:
            raise ValueError(
                f"infinite schedule: warmup ({self.warmup_steps}) + cooldown ({self.cooldown_steps}) steps overlap "
                f"the anneal, which starts at step {self.total_steps - self.anneal_steps} of {self.total_steps}; "
                "shorten --warmup-steps/--cooldown-steps/--anneal-steps"
            )
        if self.cooldown_shape not in ("cosine", "inv_sqrt"):
            raise ValueError(f"cooldown_shape {self.cooldown_shape!r}: choose 'cosine' or 'inv_sqrt'")

    @property
    def anneal_start(self) -> int:
        return self.total_steps - self.anneal_steps

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return _warmup(step, self.warmup_steps, self.max_lr)
        t = step - self.warmup_steps
        if t < self.cooldown_steps:
            if self.cooldown_shape == "cosine":
                return self.const_lr + 0.5 * (self.max_lr - self.const_lr) * (1 + math.cos(math.pi * t / self.cooldown_steps))
            # Inverse square root, rescaled to hit max_lr at t=0 and const_lr at t=cooldown_steps.
            shape = (1 / math.sqrt(1 + t) - 1 / math.sqrt(1 + self.cooldown_steps)) / (1 - 1 / math.sqrt(1 + self.cooldown_steps))
            return self.const_lr + (self.max_lr - self.const_lr) * shape
        if step < self.anneal_start:
            return self.const_lr
        # const * exp(-k (t - t_anneal)) with k chosen so that the last step lands on min_lr.
        progress = min((step - self.anneal_start) / max(self.anneal_steps, 1), 1.0)
        return self.const_lr * (self.min_lr / self.const_lr) ** progress


@dataclass(frozen=True)
class WSDSchedule:
    max_lr: float
    min_lr: float
    warmup_steps: int
    decay_steps: int  # the last decay_steps of total_steps follow the 1-sqrt cooldown
    total_steps: int

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return _warmup(step, self.warmup_steps, self.max_lr)
        decay_start = self.total_steps - self.decay_steps
        if step < decay_start:
            return self.max_lr
        progress = min((step - decay_start) / max(self.decay_steps, 1), 1.0)
        return self.min_lr + (self.max_lr - self.min_lr) * (1 - math.sqrt(progress))


Schedule = Callable[[int], float]


@dataclass(frozen=True)
class ScheduleConfig:
    """What the CLI says about the schedule. Phase lengths left as None take the paper's fractions of
    this run's `steps`; `start_step` shifts a continued run into the schedule (total = start_step + steps)."""

    name: str = "cosine"
    max_lr: float = 3e-4
    min_lr: float = 3e-5
    const_lr: float | None = None  # infinite: defaults to (max_lr + min_lr) / 2
    warmup_steps: int | None = None  # default 1% of steps
    cooldown_steps: int | None = None  # infinite: default 59% of steps (cooldown ends at 60%)
    decay_steps: int | None = None  # infinite anneal (default 15%) or WSD cooldown (default 20%)
    cooldown_shape: str = "cosine"
    start_step: int = 0


def build_schedule(config: ScheduleConfig, steps: int) -> Schedule:
    """The schedule a run of `steps` updates evaluates at `config.start_step + step`."""
    total = config.start_step + steps
    warmup = config.warmup_steps if config.warmup_steps is not None else max(1, round(0.01 * steps))
    if config.name == "cosine":
        return CosineSchedule(config.max_lr, config.min_lr, warmup, total)
    if config.name == "infinite":
        return InfiniteSchedule(
            max_lr=config.max_lr,
            const_lr=config.const_lr if config.const_lr is not None else (config.max_lr + config.min_lr) / 2,
            min_lr=config.min_lr,
            warmup_steps=warmup,
            cooldown_steps=config.cooldown_steps if config.cooldown_steps is not None else round(0.59 * steps),
            anneal_steps=config.decay_steps if config.decay_steps is not None else round(0.15 * steps),
            total_steps=total,
            cooldown_shape=config.cooldown_shape,
        )
    if config.name == "wsd":
        decay = config.decay_steps if config.decay_steps is not None else round(0.2 * steps)
        return WSDSchedule(config.max_lr, config.min_lr, warmup, decay, total)
    raise ValueError(f"--lr-schedule {config.name!r}: choose one of {', '.join(SCHEDULES)}")
