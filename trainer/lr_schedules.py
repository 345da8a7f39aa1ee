"""Learning-rate schedules as pure functions of the step: each is a small frozen dataclass, `lr = s(step)`.

- `CosineSchedule`: linear warmup to `max_lr`, cosine decay to `min_lr` (a continued run re-warms and
  re-decays by building a fresh one).
- `InfiniteSchedule`: the infinite schedule of Ibrahim et al. 2024: warmup, cooldown to a constant rate,
  a constant phase of any length, then an exponential anneal to `min_lr`. A checkpoint taken before the
  anneal can be continued at the constant rate with no re-warming.
- `WSDSchedule`: warmup-stable-decay with the 1-sqrt cooldown of Hägele et al. 2024.

Steps past `total_steps` hold the final rate. A run holds its schedule as a `RunSchedule` (the schedule
and the offset of the run's step 0 in it), which every checkpoint records. A run continued without
re-warming (`--continue-schedule`) rebuilds the recorded schedule with `continue_schedule`: the same
phases and rates from the checkpoint's place in them, its final decay moved to the continued run's end.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any, Mapping


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
                "shorten --warmup-steps/--cooldown-steps/--decay-steps or give more --steps"
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
        # const * exp(-k (t - t_anneal)) with k chosen so that the rate reaches min_lr at total_steps.
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


Schedule = CosineSchedule | InfiniteSchedule | WSDSchedule
KINDS: dict[str, type[Schedule]] = {"cosine": CosineSchedule, "infinite": InfiniteSchedule, "wsd": WSDSchedule}
SCHEDULES = tuple(KINDS)

# The field holding the length of each schedule's final decay, which a continuation moves to its own end.
# A cosine has none: its decay spans the whole run, so there is no constant phase to continue.
_FINAL_DECAY = {InfiniteSchedule: "anneal_steps", WSDSchedule: "decay_steps"}


@dataclass(frozen=True)
class RunSchedule:
    """A schedule and where a run starts in it: the run's step `s` trains at `schedule(offset + s)`.

    Checkpoints store its `record()`, fully resolved, so that a resumed or continued run follows the
    schedule that produced the checkpoint whatever its own flags would derive."""

    schedule: Schedule
    offset: int = 0

    def __call__(self, step: int) -> float:
        return self.schedule(self.offset + step)

    def record(self) -> dict[str, Any]:
        kind = next(name for name, cls in KINDS.items() if isinstance(self.schedule, cls))
        return {"kind": kind, "offset": self.offset, "params": asdict(self.schedule)}

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> RunSchedule:
        return cls(KINDS[record["kind"]](**record["params"]), record["offset"])


def continue_schedule(recorded: RunSchedule, at_step: int, steps: int, decay_steps: int | None) -> RunSchedule:
    """`recorded`, whose run checkpointed after `at_step` steps, continued for `steps` more with no re-warming.

    The same rates and phases from the checkpoint's place in them on, the constant phase extended, and the
    final decay (`decay_steps` long, default the recorded length) moved so that it ends where this run ends.
    Raises ValueError, naming the flag to change, for a schedule or checkpoint that cannot be continued.
    """
    schedule, position = recorded.schedule, recorded.offset + at_step
    field = _FINAL_DECAY.get(type(schedule))
    if field is None:
        raise ValueError(
            f"the checkpoint's schedule ({recorded.record()['kind']}) has no constant phase to continue without re-warming; "
            "drop --continue-schedule and give this run its own --lr-schedule"
        )
    decay_start = schedule.total_steps - getattr(schedule, field)
    if position > decay_start:
        raise ValueError(
            f"the checkpoint was saved at step {position} of its schedule, inside the final decay that starts at step "
            f"{decay_start}; continue from a checkpoint saved at or before that step (--save-at {decay_start})"
        )
    decay = getattr(schedule, field) if decay_steps is None else decay_steps
    if decay > steps:
        raise ValueError(
            f"the schedule's final decay of {decay} steps does not fit in this run's --steps {steps}; "
            "give more --steps or a shorter --decay-steps"
        )
    return RunSchedule(replace(schedule, **{field: decay, "total_steps": position + steps}), offset=position)


@dataclass(frozen=True)
class ScheduleConfig:
    """What the CLI says about the schedule. Phase lengths left as None take the paper's fractions of
    this run's `steps`. With `continued` the run follows its --init-from checkpoint's recorded schedule
    instead (see `continue_schedule`), and only `decay_steps` may be given."""

    name: str = "cosine"
    max_lr: float = 3e-4
    min_lr: float = 3e-5
    const_lr: float | None = None  # infinite: defaults to (max_lr + min_lr) / 2
    warmup_steps: int | None = None  # default 1% of steps
    cooldown_steps: int | None = None  # infinite: default 59% of steps (cooldown ends at 60%)
    decay_steps: int | None = None  # infinite anneal (default 15%) or WSD cooldown (default 20%)
    cooldown_shape: str = "cosine"
    continued: bool = False


def build_schedule(config: ScheduleConfig, steps: int) -> Schedule:
    """A fresh schedule for a run of `steps` updates, its unset phase lengths sized from `steps`."""
    warmup = config.warmup_steps if config.warmup_steps is not None else max(1, round(0.01 * steps))
    if config.name == "cosine":
        return CosineSchedule(config.max_lr, config.min_lr, warmup, steps)
    if config.name == "infinite":
        return InfiniteSchedule(
            max_lr=config.max_lr,
            const_lr=config.const_lr if config.const_lr is not None else (config.max_lr + config.min_lr) / 2,
            min_lr=config.min_lr,
            warmup_steps=warmup,
            cooldown_steps=config.cooldown_steps if config.cooldown_steps is not None else round(0.59 * steps),
            anneal_steps=config.decay_steps if config.decay_steps is not None else round(0.15 * steps),
            total_steps=steps,
            cooldown_shape=config.cooldown_shape,
        )
    if config.name == "wsd":
        decay = config.decay_steps if config.decay_steps is not None else round(0.2 * steps)
        return WSDSchedule(config.max_lr, config.min_lr, warmup, decay, steps)
    raise ValueError(f"--lr-schedule {config.name!r}: choose one of {', '.join(SCHEDULES)}")
