"""Control laws: from a trainer's validation losses, the next mixture weights (or none).

A law is a pure fold over observations: `observe(feedback, weights)` takes one observation and the
weights of the last scheduled stage, updates the law's own state, and returns a `Decision` or None.
Given the same observations in the same order it makes the same decisions, which is what lets the
service rebuild a controller from its log after a restart (`controller.py`).

- `ForgettingBudget`: hold the old data's forgetting within a budget with the least replay.
  Forgetting f = (L_old - L_old at the first feedback) / (that first loss): the relative rise of the old
  set's validation loss since continued pretraining began. The error e = (f - budget) / budget (1.0:
  forgetting twice the budget) drives a PI controller in velocity form on the old share u:
      u <- clamp(u + kp (e - e_prev) + ki e, min_share, max_share),
  each move at most `max_change` (a rate limit). The velocity form has no integral to wind up: at a
  bound, further error does not accumulate, so the share leaves the bound as soon as the error turns.
  With slack (f < budget) e is negative and the share falls: the least replay that holds the budget.
- `ExcessLossWeights`: several sources at once, from per-source losses: exponentiated-gradient
  ascent on each source's excess loss over its first observed loss, mixed with the uniform
  distribution for stability, the update of DoReMi (Xie et al., "DoReMi: Optimizing Data Mixtures
  Speeds Up Language Model Pretraining", NeurIPS 2023, Algorithm 1), with the first loss standing in
  for DoReMi's reference model.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Mapping, Optional, Protocol


@dataclass(frozen=True)
class Feedback:
    """A trainer's report at `step`: validation loss per named set (the datasets' names), and optionally
    its training loss per source."""

    step: int
    losses: dict[str, float]
    source_losses: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping) -> "Feedback":
        return cls(int(data["step"]), dict(data["losses"]), dict(data.get("source_losses") or {}))


@dataclass(frozen=True)
class Decision:
    weights: dict[str, float]
    reason: str


class ControlLaw(Protocol):
    name: str

    def settings(self) -> dict: ...

    def observe(self, feedback: Feedback, weights: Mapping[str, float]) -> Optional[Decision]: ...

    def state(self) -> dict: ...


def _with_share(weights: Mapping[str, float], name: str, share: float) -> dict[str, float]:
    """`weights` with `name` at `share` and the others sharing the rest in their current proportions."""
    others = {n: w for n, w in weights.items() if n != name}
    rest = sum(others.values())
    scaled = {n: (1 - share) * (w / rest if rest > 0 else 1 / len(others)) for n, w in others.items()}
    return {**scaled, name: share}


@dataclass
class ForgettingBudget:
    old: str
    budget: float
    min_share: float = 0.0
    max_share: float = 0.5
    kp: float = 0.02
    ki: float = 0.02
    max_change: float = 0.1
    min_change: float = 0.002  # smaller moves are not worth a stage
    interval: int = 0  # at least this many steps between decisions
    name: str = "forgetting-budget"
    reference: Optional[float] = None
    forgetting: Optional[float] = None
    previous_error: float = 0.0
    last_decision_step: Optional[int] = None

    def __post_init__(self) -> None:
        if not (0 <= self.min_share <= self.max_share <= 1):
            raise ValueError(f"min_share {self.min_share} and max_share {self.max_share}: need 0 <= min <= max <= 1")
        if not self.budget > 0:
            raise ValueError(f"budget {self.budget}: the accepted relative rise of the old loss must be > 0")

    def settings(self) -> dict:
        return {"old": self.old, "budget": self.budget, "min_share": self.min_share, "max_share": self.max_share,
                "kp": self.kp, "ki": self.ki, "max_change": self.max_change, "min_change": self.min_change,
                "interval": self.interval}

    def state(self) -> dict:
        return {"reference_loss": self.reference, "forgetting": self.forgetting, "target": self.budget,
                "error": self.previous_error, "last_decision_step": self.last_decision_step}

    def observe(self, feedback: Feedback, weights: Mapping[str, float]) -> Optional[Decision]:
        loss = feedback.losses.get(self.old)
        if loss is None:
            return None
        if self.reference is None:  # the start of continued pretraining: what forgetting is measured from
            self.reference = loss
            return None
        self.forgetting = (loss - self.reference) / self.reference
        if self.last_decision_step is not None and feedback.step < self.last_decision_step + self.interval:
            return None
        error = (self.forgetting - self.budget) / self.budget
        move = self.kp * (error - self.previous_error) + self.ki * error
        self.previous_error = error
        share = weights[self.old]
        target = min(self.max_share, max(self.min_share, share + max(-self.max_change, min(self.max_change, move))))
        if abs(target - share) < self.min_change:
            return None
        self.last_decision_step = feedback.step
        return Decision(
            _with_share(weights, self.old, round(target, 4)),
            f"forgetting of {self.old} {self.forgetting:+.4f} against a budget of {self.budget:.4f} at step "
            f"{feedback.step} (loss {loss:.4f}, first {self.reference:.4f}): {self.old} share {share:.4f} -> {target:.4f}",
        )


@dataclass
class ExcessLossWeights:
    step_size: float = 1.0
    smoothing: float = 0.1  # weight of the uniform distribution mixed in
    min_change: float = 0.002
    name: str = "excess-loss"
    references: dict[str, float] = field(default_factory=dict)
    excess: dict[str, float] = field(default_factory=dict)

    def settings(self) -> dict:
        return {"step_size": self.step_size, "smoothing": self.smoothing, "min_change": self.min_change}

    def state(self) -> dict:
        return {"reference_losses": dict(self.references), "excess": dict(self.excess)}

    def observe(self, feedback: Feedback, weights: Mapping[str, float]) -> Optional[Decision]:
        losses = feedback.source_losses or feedback.losses
        known = {n: loss for n, loss in losses.items() if n in weights}
        if not self.references:
            self.references = dict(known)
            return None
        self.excess = {n: max(0.0, (known[n] - self.references[n]) / self.references[n])
                       for n in known if n in self.references}
        if not self.excess:
            return None
        raised = {n: w * math.exp(self.step_size * self.excess.get(n, 0.0)) for n, w in weights.items()}
        total = sum(raised.values())
        k = len(weights)
        target = {n: round((1 - self.smoothing) * w / total + self.smoothing / k, 4) for n, w in raised.items()}
        if max(abs(target[n] - weights[n]) for n in weights) < self.min_change:
            return None
        excess = ", ".join(f"{n} {e:+.4f}" for n, e in sorted(self.excess.items()))
        return Decision(target, f"excess loss at step {feedback.step}: {excess}")


LAWS = {"forgetting-budget": ForgettingBudget, "excess-loss": ExcessLossWeights}


def make_law(name: str, settings: Mapping) -> ControlLaw:
    """The law called `name` with `settings` (ValueError naming a bad one)."""
    if name not in LAWS:
        raise ValueError(f"controller {name!r}: choose one of {sorted(LAWS)}")
    try:
        return LAWS[name](**settings)
    except TypeError as e:
        raise ValueError(f"controller {name}: {e}") from None
