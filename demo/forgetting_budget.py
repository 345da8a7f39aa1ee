"""The forgetting budget of the demo's controller run, and the forgetting it is measured in.

Forgetting here is what the service's forgetting-budget controller holds (service/control_laws.py): the
relative rise of the English validation loss over its first evaluation, the phase-1 checkpoint. The budget
is the most forgetting a fixed-ratio run showed at any evaluation (the 5% run by default): the bound that
run holds all along, as the controller is asked to. So the controller run answers "can that forgetting be
held with less replay, or more German?" in one run instead of a sweep.

Why the peak and not the end: a re-warmed run forgets most near its learning-rate peak and recovers part of
it in the decay. A budget set at the fixed run's final forgetting is one that run itself broke for most of
its steps, and a controller holding it at every evaluation must replay more than the fixed run did (the
first demo run did: 6.6% on average against 5%, for German 0.011 worse).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from demo.experiment_config import ControllerRun, Phase2Run
from trainer.metrics_log import read_metrics

OLD = "en"  # the demo's old data: the dataset whose forgetting the controller holds
BASE_ENCODING = "en-base"  # the old data in the base tokenizer's encoding, scored beside OLD (demo/steps.py)
CONTROLLER_STATE_NAME = "controller.json"  # the service's GET /v1/controller answer at the end of the run


@dataclass(frozen=True)
class Budget:
    value: float  # the accepted relative rise of the English validation loss
    origin: str  # where the value came from, a sentence for the report


def forgetting_trajectory(run_dir: Path) -> list[tuple[int, float]]:
    """(step, relative rise of the English val loss over the run's first evaluation) per evaluation."""
    evals = [r for r in read_metrics(run_dir) if r["kind"] == "eval"]
    first = evals[0]["val_loss"][OLD]
    return [(r["step"], (r["val_loss"][OLD] - first) / first) for r in evals]


def round_up(value: float) -> float:
    """`value` to three significant digits, rounded up: the figure the service is started with is the one the
    report shows, and rounding down would put the reference run's own peak over it."""
    unit = 10.0 ** (math.floor(math.log10(value)) - 2)
    return float(f"{math.ceil(value / unit - 1e-9) * unit:.3g}")


def held_budget(run_dir: Path) -> float | None:
    """The budget the service's controller held in a run, from its saved state (None: not saved)."""
    state = run_dir / CONTROLLER_STATE_NAME
    return json.loads(state.read_text())["settings"]["budget"] if state.exists() else None


def choose_budget(spec: ControllerRun, earlier: Mapping[Phase2Run, Path]) -> Budget:
    """The budget of `spec`: the peak forgetting of its `budget_from` run among the runs before it, else
    its preset default (the service refuses a budget <= 0, and "no forgetting" cannot be a target)."""
    source = next((run_dir for run, run_dir in earlier.items() if run.name == spec.budget_from), None)
    if source is None:
        return Budget(spec.default_budget, f"the preset default, since no `{spec.budget_from}` ran before it")
    step, forgetting = max(forgetting_trajectory(source), key=lambda point: point[1])
    if forgetting <= 0:
        return Budget(spec.default_budget, f"the preset default, since `{spec.budget_from}` ended with no "
                                           f"English forgetting to match ({forgetting:+.4f} at step {step})")
    return Budget(round_up(forgetting), f"the most English forgetting `{spec.budget_from}` showed at any "
                                             f"evaluation (relative rise of its English val loss over its first "
                                             f"evaluation, at step {step}): the bound that fixed run held all along")
