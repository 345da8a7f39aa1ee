"""The mix schedule: an append-only list of stages, each a start step and the weights from then on.

A batch is a pure function of the schedule (with the datasets, seed, step, rank and world size), so
the schedule is the only thing an operator changes at run time, and only by adding a stage at a step
that has not been served yet (or withdrawing one no step has reached). Steps before that stage keep
the exact bytes they had. The service derives its schedule from a durable log of those changes
(`mix_log.py`). Every stage names every dataset: an omitted dataset is an error, not a weight of 0.

Weights are normalised to sum 1 and quantised to multiples of 1/WEIGHT_UNITS (0.01%). Quantising
makes the mix exact rational arithmetic (the mixer works in integer units), keeps normalisation
idempotent, and makes a JSON round trip reproduce the same stage bit for bit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

from service.errors import ServiceError
from service.integers import check_integer

WEIGHT_UNITS = 10_000


class ScheduleError(ServiceError, ValueError):
    """A stage or schedule is invalid; the message says which field and why."""

    http_status = 422


def quantize_weights(weights: Mapping[str, float]) -> dict[str, int]:
    """Integer units summing to WEIGHT_UNITS, by largest remainder, keyed in name order.

    Ties go to the alphabetically earlier name, so the units never depend on the order in which the
    weights were written (a command line, a JSON body).

    Raises ScheduleError for an empty mapping, a non-number, a negative, NaN or infinite weight, or
    weights that are all zero.
    """
    if not weights:
        raise ScheduleError("weights: empty; give at least one dataset with a positive weight")
    values: dict[str, float] = {}
    for name, value in sorted(weights.items(), key=lambda item: str(item[0])):
        if not isinstance(name, str) or not name:
            raise ScheduleError(f"weights: dataset name {name!r} must be a non-empty string")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ScheduleError(f"weights.{name}: {value!r} is not a number")
        if not math.isfinite(value) or value < 0:
            raise ScheduleError(f"weights.{name}: {value!r}; a weight must be a finite number >= 0")
        values[name] = float(value)
    try:
        total = math.fsum(values.values())
    except OverflowError:
        total = math.inf
    if not math.isfinite(total):
        raise ScheduleError(f"weights: {values} add up past the largest float; only their ratios matter, "
                            "so scale them down (e.g. 0.05 and 0.95)")
    if total <= 0:
        raise ScheduleError(f"weights: all zero ({values}); at least one dataset needs a positive weight")
    exact = {name: value / total * WEIGHT_UNITS for name, value in values.items()}
    units = {name: math.floor(x) for name, x in exact.items()}
    missing = WEIGHT_UNITS - sum(units.values())
    order = sorted(exact, key=lambda name: -(exact[name] - units[name]))  # stable: ties keep name order
    for name in order[:missing]:
        units[name] += 1
    if sum(units.values()) != WEIGHT_UNITS or all(u == 0 for u in units.values()):
        raise ScheduleError(f"weights: {values} cannot be quantised to 1/{WEIGHT_UNITS} steps")
    return units


def check_weight_names(weights: Mapping[str, float], names: Iterable[str], where: str = "weights") -> None:
    """Every dataset is named in every weight set: leaving one out is refused, never read as 0.

    A typo or a forgotten dataset would otherwise silently stop its replay; a weight of 0 says it.
    """
    names = set(names)
    unknown, missing = sorted(set(weights) - names), sorted(names - set(weights))
    if unknown or missing:
        problems = ([f"unknown dataset(s) {unknown}"] if unknown else []) + (
            [f"no weight for {missing} (give 0 to leave a dataset out)"] if missing else [])
        raise ScheduleError(f"{where}: {'; '.join(problems)}; the datasets are {sorted(names)}")


@dataclass(frozen=True)
class Stage:
    """From `start_step` on (until the next stage), datasets are drawn in proportion to `weights`.

    Weights are normalised to sum 1 (in steps of 1/WEIGHT_UNITS) when the stage is made.
    """

    start_step: int
    weights: dict[str, float]

    def __post_init__(self) -> None:
        check_integer(self.start_step, "start_step", error=ScheduleError)
        units = quantize_weights(self.weights)
        object.__setattr__(self, "weights", {name: u / WEIGHT_UNITS for name, u in units.items()})

    @property
    def units(self) -> dict[str, int]:
        """The weights as integers summing to WEIGHT_UNITS (exact, which the mixer relies on)."""
        return {name: round(w * WEIGHT_UNITS) for name, w in self.weights.items()}

    def to_json(self) -> dict:
        return {"start_step": self.start_step, "weights": dict(self.weights)}

    @classmethod
    def from_json(cls, data: object, where: str = "stage") -> "Stage":
        if not isinstance(data, dict) or set(data) != {"start_step", "weights"}:
            raise ScheduleError(f"{where}: expected an object with start_step and weights, got {data!r}")
        if not isinstance(data["weights"], dict):
            raise ScheduleError(f"{where}.weights: expected an object of name -> weight")
        try:
            return cls(start_step=data["start_step"], weights=data["weights"])
        except ScheduleError as e:
            raise ScheduleError(f"{where}.{e}") from None


class MixSchedule:
    """An append-only tuple of stages, the first starting at step 0, start steps strictly increasing."""

    def __init__(self, stages: Sequence[Stage]):
        stages = tuple(stages)
        if not stages:
            raise ScheduleError("schedule: no stages; the first stage must start at step 0")
        if stages[0].start_step != 0:
            raise ScheduleError(f"stages[0].start_step: {stages[0].start_step}; the first stage must start at 0")
        for i in range(1, len(stages)):
            if stages[i].start_step <= stages[i - 1].start_step:
                raise ScheduleError(
                    f"stages[{i}].start_step: {stages[i].start_step} is not after stages[{i - 1}].start_step "
                    f"= {stages[i - 1].start_step}; start steps must increase"
                )
        self.stages = stages
        self._starts = [s.start_step for s in stages]

    @classmethod
    def constant(cls, weights: Mapping[str, float]) -> "MixSchedule":
        return cls([Stage(0, dict(weights))])

    def stage_index(self, step: int) -> int:
        if step < 0:
            raise ScheduleError(f"step: {step}; steps start at 0")
        # Binary search: O(log stages), so a long schedule never slows a lookup down.
        lo, hi = 0, len(self._starts)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if self._starts[mid] <= step:
                lo = mid
            else:
                hi = mid
        return lo

    def stage_at(self, step: int) -> Stage:
        return self.stages[self.stage_index(step)]

    def appended(self, stage: Stage) -> "MixSchedule":
        """A new schedule with `stage` added at the end; it must start after the last stage."""
        last = self.stages[-1]
        if stage.start_step <= last.start_step:
            raise ScheduleError(
                f"start_step: {stage.start_step} is not after the last stage's start step {last.start_step}; "
                "the schedule is append-only (cancel the later stage first to replace it)"
            )
        return MixSchedule(self.stages + (stage,))

    def cancelled(self, start_step: int) -> "MixSchedule":
        """A new schedule without the stage starting at `start_step` (never the first stage)."""
        if start_step not in self._starts:
            raise ScheduleError(f"start_step: no stage starts at step {start_step}; the stages start at {self._starts}")
        if start_step == 0:
            raise ScheduleError("start_step: 0 is the first stage, which cannot be cancelled; append a stage instead")
        return MixSchedule(tuple(stage for stage in self.stages if stage.start_step != start_step))

    def to_json(self) -> list[dict]:
        return [stage.to_json() for stage in self.stages]

    @classmethod
    def from_json(cls, data: object) -> "MixSchedule":
        if not isinstance(data, list):
            raise ScheduleError(f"schedule: expected a list of stages, got {type(data).__name__}")
        return cls([Stage.from_json(item, where=f"stages[{i}]") for i, item in enumerate(data)])

    def __eq__(self, other: object) -> bool:
        return isinstance(other, MixSchedule) and self.stages == other.stages

    def __len__(self) -> int:
        return len(self.stages)

    def __repr__(self) -> str:
        return f"MixSchedule({list(self.stages)!r})"
