"""The service's durable state: the mix log (and so the schedule) and the frontier reservation, in `--state-dir`.

Three files, each changed durably (fsync) before the request that changed it returns:

- `identity.json`: what a batch depends on besides the schedule (dataset names and manifest hashes,
  seq_len, global_batch, seed, and the mixer's rule version `mix_rule`). A restart with different
  inputs, or by a replaymix whose mix rule differs, is refused: it would change the bytes of steps
  already served.
- `mix_log.jsonl`: every change to the schedule, append-only (`mix_log.py`); the schedule is derived
  from it, and this state is the only owner of the schedule.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from pipeline.atomic_file import write_atomically
from service.errors import ServiceError
from service.integers import check_integer, is_integer
from service.mix_log import LOG_FILE, MixLog
from service.mix_schedule import MixSchedule, ScheduleError, Stage

IDENTITY_FILE, FRONTIER_FILE = "identity.json", "frontier.json"
# The mix rule of a state dir whose identity predates `mix_rule` (see service.mixer.MIX_RULE).
FIRST_MIX_RULE = 1


class StateError(ServiceError):
    """The state dir is unusable or belongs to other inputs; the message names the file and the fix."""


def write_json_durably(path: Path, data: object) -> None:
    write_atomically(path, json.dumps(data, indent=1, sort_keys=True))


def _read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise StateError(f"{path}: unreadable ({e}); restore it from a backup or start with a new --state-dir") from e


def _read_frontier(path: Path) -> tuple[int, int]:
    """(reserved, served) from frontier.json."""
    data = _read_json(path)
    valid = (
        isinstance(data, dict)
        and all(is_integer(data.get(k)) for k in ("reserved", "served"))
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
    log: MixLog
    reserved: int
    served: int
    unserved_from: int
    reserve_steps: int

    @property
    def schedule(self) -> MixSchedule:
        return self.log.schedule

    @classmethod
    def open(cls, root: Path, identity: dict, reserve_steps: int = 256) -> Optional["StateDir"]:
        """Resume the state in `root`; None when the folder holds none yet (see `create`)."""
        _check_reserve_steps(reserve_steps)
        root = Path(root)
        identity_path = root / IDENTITY_FILE
        if not identity_path.exists():
            return None
        stored = _read_json(identity_path)
        if not isinstance(stored, dict):
            raise StateError(f"{identity_path}: expected an object, got {stored!r}; start with a new --state-dir")
        stored_rule = stored.get("mix_rule", FIRST_MIX_RULE)
        if stored_rule != identity["mix_rule"]:
            raise StateError(
                f"{identity_path}: this state dir was served with mix rule {stored_rule}; this replaymix computes "
                f"batches with mix rule {identity['mix_rule']}, which would give steps already served other bytes. "
                "Finish that run with the replaymix version that started it, or use a new --state-dir"
            )
        if stored != identity:
            changed = sorted(k for k in set(stored) | set(identity) if stored.get(k) != identity.get(k))
            raise StateError(
                f"{identity_path}: this state dir was made for other inputs (differs in {changed}); serving "
                "with these would change steps already served. Use the original datasets and flags, or a "
                "new --state-dir"
            )
        try:
            log = MixLog.open(root / LOG_FILE)
        except OSError as e:
            raise StateError(f"{root / LOG_FILE}: unreadable ({e}); restore it from a backup or use a new --state-dir") from e
        except ScheduleError as e:
            raise StateError(f"{e}; restore it from a backup or use a new --state-dir") from e
        reserved, served = _read_frontier(root / FRONTIER_FILE)
        return cls(root, log, reserved, served, reserved, reserve_steps)

    @classmethod
    def create(cls, root: Path, identity: dict, first: Stage, by: str, reserve_steps: int = 256) -> "StateDir":
        """A new state in `root`, its log starting with `first` (asked for by `by`)."""
        _check_reserve_steps(reserve_steps)
        root = Path(root)
        root.mkdir(parents=True, exist_ok=True)
        (root / LOG_FILE).unlink(missing_ok=True)  # left by a creation that died before identity.json
        state = cls(root, MixLog.create(root / LOG_FILE, first, by), 0, 0, 0, reserve_steps)
        state._write_frontier(0)
        write_json_durably(root / IDENTITY_FILE, identity)  # last: a folder without it is not a state yet
        return state

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

    def close(self) -> None:
        """On a clean shutdown: shrink the reservation to what was provably served, so that a
        restarted service accepts mix changes from the next unserved step on."""
        self._write_frontier(self.unserved_from)


def _check_reserve_steps(reserve_steps: int) -> None:
    check_integer(reserve_steps, "reserve_steps", 1, error=StateError, hint=" (1 = fsync every new step)")
