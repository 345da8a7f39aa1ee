"""The service's durable state: the mix schedule and the served frontier, in `--state-dir`.

Three small JSON files, each replaced atomically (write a temporary file, fsync, rename, fsync the
folder) before the request that changed it returns:

- `identity.json`: what a batch depends on besides the schedule (dataset names and manifest hashes,
  seq_len, global_batch, seed). A restart with different inputs is refused, since it would change the
  bytes of steps already served.
- `schedule.json`: the mix schedule (`MixSchedule.to_json()`).
- `frontier.json`: one more than the largest step ever served; stages may only start at or after it.
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


@dataclass
class StateDir:
    """The files of one state dir. Not thread-safe: the service calls it under its lock."""

    root: Path
    schedule: MixSchedule
    frontier: int

    @classmethod
    def open(cls, root: Path, identity: dict, initial: MixSchedule) -> "StateDir":
        """Resume the state in `root`, or start it with `initial` when the folder has none."""
        root = Path(root)
        root.mkdir(parents=True, exist_ok=True)
        identity_path = root / IDENTITY_FILE
        if not identity_path.exists():
            state = cls(root, initial, 0)
            write_json_durably(root / SCHEDULE_FILE, initial.to_json())
            write_json_durably(root / FRONTIER_FILE, {"frontier": 0})
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
        frontier = _read_json(root / FRONTIER_FILE)
        if not isinstance(frontier, dict) or not isinstance(frontier.get("frontier"), int) or frontier["frontier"] < 0:
            raise StateError(f"{root / FRONTIER_FILE}: expected {{\"frontier\": <int >= 0>}}, got {frontier!r}")
        return cls(root, schedule, frontier["frontier"])

    def mark_served(self, step: int) -> bool:
        """Make `step` part of the served past, durably. Returns whether the frontier moved."""
        if step < self.frontier:
            return False
        write_json_durably(self.root / FRONTIER_FILE, {"frontier": step + 1})
        self.frontier = step + 1
        return True

    def set_schedule(self, schedule: MixSchedule) -> None:
        write_json_durably(self.root / SCHEDULE_FILE, schedule.to_json())
        self.schedule = schedule
