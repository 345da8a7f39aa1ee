"""What a run's metrics say: forgetting, adaptation, bits per byte; and the sweep's rule that picks a share.

Forgetting is the relative rise of a replayed corpus's validation loss since the run's start (its step-0
evaluation), the quantity the service's forgetting-budget controller holds, so a budget means the same in
a sweep and under the controller. A pilot's forgetting is its peak over every evaluation and every replayed
corpus: a re-warmed run forgets most near its peak rate and recovers in the decay, so the end alone would
hide the forgetting it showed on the way. Adaptation is the relative fall of the new corpora's loss (their
mean) from the start to the end.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

from trainer.metrics_log import read_metrics


def evaluations(run_dir: Path) -> dict[int, dict[str, float]]:
    """Each evaluation's losses by step; a step evaluated again after a resume counts once (the last)."""
    return {r["step"]: r["val_loss"] for r in read_metrics(run_dir) if r["kind"] == "eval"}


@dataclass(frozen=True)
class Outcome:
    name: str
    share: float | None
    start: dict[str, float]  # each validation set's loss at step 0
    final: dict[str, float]
    forgetting: float  # peak relative rise over the replayed corpora (0 with none replayed)
    adaptation: float  # relative fall of the new corpora's loss, start to end (their mean)
    steps: int


def outcome(name: str, share: float | None, run_dir: Path, replayed: Sequence[str], new: Sequence[str]) -> Outcome:
    evals = evaluations(run_dir)
    if not evals or 0 not in evals:
        raise ValueError(f"{run_dir}: no evaluation at step 0 in metrics.jsonl")
    return _judged(name, share, evals, replayed, new)


def merge_outcome(name: str, start: dict[str, float], losses: dict[str, float], replayed: Sequence[str],
                  new: Sequence[str]) -> Outcome:
    """A merge's outcome: its one evaluation against its update's full run's start (step 0), the same
    windows; 0 steps trained."""
    return replace(_judged(name, None, {0: start, 1: losses}, replayed, new), steps=0)


def _judged(name: str, share: float | None, evals: dict[int, dict[str, float]], replayed: Sequence[str],
            new: Sequence[str]) -> Outcome:
    start, last = evals[0], evals[max(evals)]
    rises = [losses[n] / start[n] - 1 for losses in evals.values() for n in replayed]
    falls = [1 - last[n] / start[n] for n in new]
    return Outcome(name, share, start, last, max([0.0, *rises]), sum(falls) / len(falls), max(evals))


@dataclass(frozen=True)
class Choice:
    share: float
    met: bool  # whether the share stays within the budget (False: none did, and `otherwise` picked it)
    reason: str


def choose_share(outcomes: Sequence[Outcome], budget: float, otherwise: str) -> Choice | None:
    """The smallest share whose forgetting stays within `budget`; with none, the largest (or None: stop)."""
    ranked = sorted(outcomes, key=lambda o: o.share)
    within = [o for o in ranked if o.forgetting <= budget]
    if within:
        o = within[0]
        return Choice(o.share, True, f"the smallest share whose forgetting ({o.forgetting:.4f}) stays within the "
                                     f"budget {budget:g}")
    if otherwise == "stop":
        return None
    o = ranked[-1]
    return Choice(o.share, False, f"no share kept forgetting within the budget {budget:g} (least: "
                                  f"{min(x.forgetting for x in ranked):.4f}); the largest share was taken")


def manifest(dataset: str) -> dict:
    return json.loads((Path(dataset) / "manifest.json").read_text())


def tokens_per_byte(dataset: str) -> float | None:
    """Tokens per UTF-8 byte of a dataset's text: exact for a held-out eval set (tokenized whole into its
    validation split); for a corpus's own validation split, the whole corpus's ratio stands for it (the
    split is a hash sample of its documents)."""
    stats = manifest(dataset).get("stats", {})
    return stats["tokens"] / stats["text_bytes"] if stats.get("text_bytes") else None


def bits_per_byte(loss: float, ratio: float | None) -> float | None:
    return None if ratio is None else loss / math.log(2) * ratio
