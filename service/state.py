"""The service's durable state: the mix schedule and the frontier reservation, in `--state-dir`.

Three small JSON files, each replaced atomically (write a temporary file, fsync, rename, fsync the
folder) before the request that changed it returns:

- `identity.json`: what a batch depends on besides the schedule (dataset names and manifest hashes,
  seq_len, global_batch, seed). A restart with different inputs is refused, since it would change the
  bytes of steps already served.
- `schedule.json`: the mix schedule (`MixSchedule.to_json()`).
- `frontier.json`: `{"reserved": R, "served": F}`. R is an upper bound of every step ever served:
  no step >= R has left the service. F is a lower bound of the served frontier (one more than the
  largest step served) at the moment R was written; exact after a clean shutdown.

Reservations make serving cheap: persisting R costs two fsyncs, so the service moves R in leaps of
`reserve_steps` beyond the step being served, and a step below R is served with no disk write at all.
The price is that after a kill -9 the steps in [F, R) count as served (nobody can tell which were),
so a mix change can start no earlier than R; a clean shutdown writes R = the exact served frontier.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from service.schedule import MixSchedule, ScheduleError

IDENTITY_FILE, SCHEDULE_FILE, FRONTIER_FILE = "identity.json", "schedule.json", "frontier.json"


class StateError(Exception):
    """The state dir is unusable or belongs to other inputs; the message names the file and the fix."""


def write_json_durably(path: Path, data: object) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise StateError(f"{path}: unreadable ({e}); restore it from a backup or start with a new --state-dir") from e


def _read_frontier(path: Path) -> tuple[int, int]:
    """(reserved, served) from frontier.json; the pre-reservation form {"frontier": F} reads as (F, F)."""
    data = _read_json(path)
    if isinstance(data, dict) and set(data) == {"frontier"}:
        data = {"reserved": data["frontier"], "served": data["frontier"]}
    valid = (
        isinstance(data, dict)
        and all(isinstance(data.get(k), int) and not isinstance(data.get(k), bool) and data[k] >= 0 for k in ("reserved", "served"))
        and data["served"] <= data["reserved"]
    )
    if not valid:
        raise StateError(
            f"{path}: expected {{\"reserved\": R, \"served\": F}} with integers 0 <= F <= R, got {data!r}; "
            "restore it from a backup or start with a new --state-dir"
        )
    return data["reserved"], data["served"]


@dataclass
class StateDir:
    """The files of one state dir, and what this process knows beyond them.

    `reserved` is durable: every step ever served is below it. `served` is one more than the largest
    step served (exact for steps this process served; from the file for earlier runs, a lower bound).
    `unserved_from` is the first step that provably was never served: the reservation inherited from
    the last run (R, exact after a clean shutdown) or, once this process serves beyond it, `served`.
    Not thread-safe: the service calls it under its lock.
    """

    root: Path
    schedule: MixSchedule
    reserved: int
    served: int
    unserved_from: int
    reserve_steps: int

    @classmethod
    def open(cls, root: Path, identity: dict, initial: MixSchedule, reserve_steps: int = 256) -> "StateDir":
        """Resume the state in `root`, or start it with `initial` when the folder has none."""
        if isinstance(reserve_steps, bool) or not isinstance(reserve_steps, int) or reserve_steps < 1:
            raise StateError(f"reserve_steps: {reserve_steps!r}; it must be an integer >= 1 (1 = fsync every new step)")
        root = Path(root)
        root.mkdir(parents=True, exist_ok=True)
        identity_path = root / IDENTITY_FILE
        if not identity_path.exists():
            state = cls(root, initial, 0, 0, 0, reserve_steps)
            write_json_durably(root / SCHEDULE_FILE, initial.to_json())
            state._write_frontier(0)
            write_json_durably(identity_path, identity)  # last: a folder without it is not a state yet
            return state
        stored = _read_json(identity_path)
        if stored != identity:
            changed = sorted(k for k in set(stored) | set(identity) if stored.get(k) != identity.get(k))
            raise StateError(
                f"{identity_path}: this state dir was made for other inputs (differs in {changed}); serving "
                "with these would change steps already served. Use the original datasets and flags, or a "
                "new --state-dir"
            )
        try:
            schedule = MixSchedule.from_json(_read_json(root / SCHEDULE_FILE))
        except ScheduleError as e:
            raise StateError(f"{root / SCHEDULE_FILE}: {e}") from e
        reserved, served = _read_frontier(root / FRONTIER_FILE)
        return cls(root, schedule, reserved, served, reserved, reserve_steps)

    def _write_frontier(self, reserved: int) -> None:
        write_json_durably(self.root / FRONTIER_FILE, {"reserved": reserved, "served": self.served})
        self.reserved = reserved

    def mark_served(self, last_step: int) -> bool:
        """Make steps up to `last_step` part of the served past, durably. Returns whether the
        reservation moved (a disk write); it moves only when `last_step` reaches it."""
        self.served = max(self.served, last_step + 1)
        self.unserved_from = max(self.unserved_from, self.served)
        if last_step < self.reserved:
            return False
        self._write_frontier(last_step + self.reserve_steps)
        return True

    def set_schedule(self, schedule: MixSchedule) -> None:
        write_json_durably(self.root / SCHEDULE_FILE, schedule.to_json())
        self.schedule = schedule

    def close(self) -> None:
        """On a clean shutdown: shrink the reservation to what was provably served, so that a
        restarted service accepts mix changes from the next unserved step on."""
        self._write_frontier(self.unserved_from)
