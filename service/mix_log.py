"""The mix log: every change to the mix schedule, durable and append-only; the schedule is derived from it.

`mix_log.jsonl` in the state dir holds one JSON object per line, in the order the changes were made:

    {"seq": 0, "time": "2026-11-30T14:02:11.5Z", "by": "python -m service --weights", "op": "stage",
     "stage": {"start_step": 0, "weights": {"de": 0.95, "en": 0.05}}}
    {"seq": 1, "time": "...", "by": "alice (127.0.0.1)", "op": "stage", "stage": {"start_step": 300, ...}}
    {"seq": 2, "time": "...", "by": "alice (127.0.0.1)", "op": "cancel", "start_step": 300}

`op` is `stage` (append a stage: it must start after the last one) or `cancel` (withdraw the stage that
starts at `start_step`; the service allows it only while no step at or past it was served). Two more ops
leave the schedule as it is and record what a controller decides from (`controller.py`): `feedback` (a
trainer's validation losses at a step, in `data`) and `controller` (a controller set up, suspended or
resumed, in `data`), and `owner` (a new owner took the state over from one whose lease expired: its
fence, see ownership.py). Entries are never rewritten: the effective schedule is `replay(entries)`, so who changed what and when is always
on record. An entry may carry a `reason` (free text). Each line is appended and fsynced before the
change is acknowledged; a last line without its newline is a write a crash cut short, never
acknowledged, and is dropped when the log is opened. Any other unreadable line is damage, refused
with its line number.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Optional, Sequence

from service.integers import is_integer
from service.mix_schedule import MixSchedule, ScheduleError, Stage
from service.state_store import StateStore

LOG_FILE = "mix_log.jsonl"
SCHEDULE_OPS = ("stage", "cancel")  # the ops that change the schedule
RECORD_OPS = ("feedback", "controller", "owner")  # the ops that only record, with their payload in `data`
OPS = SCHEDULE_OPS + RECORD_OPS


@dataclass(frozen=True)
class LogEntry:
    seq: int
    time: str  # UTC, ISO 8601
    by: str  # who asked: "python -m service --weights", or the operator's name and address
    op: str  # one of OPS
    stage: Optional[Stage] = None  # op == "stage"
    start_step: Optional[int] = None  # op == "cancel"
    reason: Optional[str] = None
    data: Optional[dict] = None  # op in RECORD_OPS, or what a controller's stage was decided from

    def to_json(self) -> dict:
        data: dict = {"seq": self.seq, "time": self.time, "by": self.by, "op": self.op}
        if self.stage is not None:
            data["stage"] = self.stage.to_json()
        if self.start_step is not None:
            data["start_step"] = self.start_step
        if self.reason is not None:
            data["reason"] = self.reason
        if self.data is not None:
            data["data"] = self.data
        return data

    @classmethod
    def from_json(cls, data: object, where: str) -> "LogEntry":
        if not isinstance(data, dict) or data.get("op") not in OPS:
            raise ScheduleError(f"{where}: expected an object with op in {OPS}, got {data!r}")
        stage = Stage.from_json(data["stage"], f"{where}.stage") if data["op"] == "stage" else None
        start_step = data.get("start_step") if data["op"] == "cancel" else None
        if data["op"] == "cancel" and not is_integer(start_step):
            raise ScheduleError(f"{where}.start_step: {start_step!r}; a cancel names the start step of a stage")
        payload = data.get("data")
        if (payload is not None and not isinstance(payload, dict)) or (data["op"] in RECORD_OPS and payload is None):
            raise ScheduleError(f"{where}.data: {payload!r}; expected an object")
        return cls(data.get("seq"), data.get("time"), data.get("by"), data["op"], stage, start_step,
                   data.get("reason"), payload)


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def replay(entries: Sequence[LogEntry]) -> MixSchedule:
    """The schedule the entries make, applied in order; ScheduleError naming the first that does not fit."""
    if not entries or entries[0].op != "stage":
        raise ScheduleError("entry 0: the log must start with the first stage (op 'stage' at step 0)")
    schedule = MixSchedule([entries[0].stage])
    for i, entry in enumerate(entries[1:], start=1):
        try:
            schedule = applied(schedule, entry)
        except ScheduleError as e:
            raise ScheduleError(f"entry {i}: {e}") from None
    return schedule


def applied(schedule: MixSchedule, entry: LogEntry) -> MixSchedule:
    """The schedule after one entry (record-only entries leave it as it is)."""
    if entry.op == "stage":
        return schedule.appended(entry.stage)
    if entry.op == "cancel":
        return schedule.cancelled(entry.start_step)
    return schedule


class MixLog:
    """The log of one state (`mix_log.jsonl` in its store). Not thread-safe: the service calls it under its lock."""

    def __init__(self, store: StateStore, entries: list[LogEntry]):
        self.store, self.entries = store, entries
        self.path = store.where(LOG_FILE)
        self.schedule = replay(entries)

    @classmethod
    def create(cls, store: StateStore, first: Stage, by: str) -> "MixLog":
        log = cls.__new__(cls)
        log.store, log.path, log.entries = store, store.where(LOG_FILE), []
        store.replace(LOG_FILE, b"")  # a log left by a creation that died before identity.json starts over
        log._write(LogEntry(0, now(), by, "stage", stage=first), MixSchedule([first]))
        return log

    @classmethod
    def open(cls, store: StateStore) -> "MixLog":
        """Read the log, dropping a torn last line (a crash mid-append); ScheduleError on damage."""
        path = store.where(LOG_FILE)
        raw = store.read(LOG_FILE)
        if raw is None:
            raise ScheduleError(f"{path}: missing; restore it from a backup")
        complete, _, torn = raw.rpartition(b"\n")
        if torn:  # never acknowledged: drop it so the next append starts clean
            store.replace(LOG_FILE, complete + (b"\n" if complete else b""))
        entries = []
        for number, line in enumerate(complete.split(b"\n") if complete else [], start=1):
            try:
                data = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ScheduleError(f"{path}:{number}: not JSON ({e})") from None
            entries.append(LogEntry.from_json(data, f"{path}:{number}"))
        try:
            return cls(store, entries)
        except ScheduleError as e:
            raise ScheduleError(f"{path}: {e}") from None

    def append(self, op: str, by: str, *, stage: Stage | None = None, start_step: int | None = None,
               reason: str | None = None, data: dict | None = None) -> MixSchedule:
        """Record one entry durably and return the schedule it makes; ScheduleError (nothing written)
        when it does not fit the schedule."""
        entry = LogEntry(len(self.entries), now(), by, op, stage, start_step, reason, data)
        schedule = applied(self.schedule, entry)
        self._write(entry, schedule)
        return schedule

    def _write(self, entry: LogEntry, schedule: MixSchedule) -> None:
        self.store.append(LOG_FILE, json.dumps(entry.to_json(), sort_keys=True).encode() + b"\n")
        self.entries.append(entry)
        self.schedule = schedule
