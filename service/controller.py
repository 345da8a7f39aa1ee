"""A controller inside the service: a control law (`control_laws.py`) bound to the mix log.

Everything a controller does is an entry of the log (`mix_log.py`):
- `controller` entries set it up (`{"law": ..., "settings": ..., "enabled": true}`), suspend it (an
  operator's PUT or DELETE of the mix: a human always has the last word) or resume it
  (`PUT /v1/controller`);
- `feedback` entries hold each observation it was given (a trainer's losses at a step);
- its decisions are ordinary `stage` entries, by "controller <law>", with the reason and the
  feedback entry they came from, placed like an operator's change without start_step.
So the run is replayable byte for byte from the log, and `Controller.from_log` rebuilds the law's
state after a restart by folding the same observations through it in the same order (a law is a
pure fold), which gives the state an uninterrupted service would have.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

from service.control_laws import ControlLaw, Decision, Feedback, make_law
from service.mix_log import LogEntry, applied
from service.mix_schedule import MixSchedule


@dataclass
class Controller:
    law: ControlLaw
    enabled: bool = True
    observations: list[dict] = field(default_factory=list)  # the feedback entries, as logged
    decisions: list[dict] = field(default_factory=list)  # the stage entries it appended, as logged
    last_step: int = -1  # the step of the latest feedback; feedback must move forward

    @property
    def by(self) -> str:
        return f"controller {self.law.name}"

    def setup_record(self) -> dict:
        return {"law": self.law.name, "settings": self.law.settings(), "enabled": True}

    @classmethod
    def from_log(cls, entries: Sequence[LogEntry]) -> Optional["Controller"]:
        """The controller the log set up, in the state its entries leave it; None if it set up none."""
        controller, schedule = None, None
        for entry in entries:
            schedule = MixSchedule([entry.stage]) if schedule is None else applied(schedule, entry)
            if entry.op == "controller" and "law" in entry.data:
                controller = cls(make_law(entry.data["law"], entry.data["settings"]))
            elif controller is None:
                continue
            elif entry.op == "controller":
                controller.enabled = bool(entry.data["enabled"])
            elif entry.op == "feedback":
                controller.observe(Feedback.from_json(entry.data), schedule)  # its decision is the next entry
                controller.observations.append(entry.to_json())
            elif entry.op == "stage" and entry.by == controller.by:
                controller.decisions.append(entry.to_json())
        return controller

    def observe(self, feedback: Feedback, schedule: MixSchedule) -> Optional[Decision]:
        """Fold one observation in; the decision it leads to, if the controller is enabled."""
        self.last_step = feedback.step
        decision = self.law.observe(feedback, schedule.stages[-1].weights)
        return decision if self.enabled else None

    def describe(self) -> dict:
        """GET /v1/controller: its law, settings, state, every observation and every decision with its reason."""
        return {"law": self.law.name, "settings": self.law.settings(), "enabled": self.enabled,
                "state": self.law.state(), "observations": self.observations, "decisions": self.decisions}
