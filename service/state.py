"""The service's durable state: the mix log (and so the schedule) and the frontier reservation, in `--state-dir`
(a local folder or `s3://bucket/prefix`: state_store.py; one process owns it: ownership.py).

Three files, each changed durably (fsync, or the store's acknowledgement) before the request that changed
it returns:

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

A new owner that took the state over from one that may still run (an expired lease, ownership.py)
fences it before serving (`fence`): an `owner` record appended to the log and the frontier rewritten,
both conditional writes that make every later write of the old owner fail.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Optional

from service.integers import check_integer, is_integer
from service.mix_log import LOG_FILE, MixLog
from service.mix_schedule import MixSchedule, ScheduleError, Stage
from service.state_store import StateError, StateStore

IDENTITY_FILE, FRONTIER_FILE = "identity.json", "frontier.json"
# The mix rule of a state dir whose identity predates `mix_rule` (see service.mixer.MIX_RULE).
FIRST_MIX_RULE = 1


def _json_bytes(data: object) -> bytes:
    return json.dumps(data, indent=1, sort_keys=True).encode()


def _read_json(store: StateStore, name: str) -> object:
    """The object `name` parsed; None when it does not exist."""
    raw = store.read(name)
    if raw is None:
        return None
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise StateError(f"{store.where(name)}: unreadable ({e}); restore it from a backup or start with a new "
                         "--state-dir") from e


def check_identity(store: StateStore, identity: dict) -> bool:
    """Whether `store` holds a state (False: none yet); StateError if it was made for other inputs or
    another mix rule. Read-only, so a standby checks it before it waits."""
    stored = _read_json(store, IDENTITY_FILE)
    if stored is None:
        return False
    where = store.where(IDENTITY_FILE)
    if not isinstance(stored, dict):
        raise StateError(f"{where}: expected an object, got {stored!r}; start with a new --state-dir")
    stored_rule = stored.get("mix_rule", FIRST_MIX_RULE)
    if stored_rule != identity["mix_rule"]:
        raise StateError(
            f"{where}: this state dir was served with mix rule {stored_rule}; this replaymix computes "
            f"batches with mix rule {identity['mix_rule']}, which would give steps already served other bytes. "
            "Finish that run with the replaymix version that started it, or use a new --state-dir"
        )
    if stored != identity:
        changed = sorted(k for k in set(stored) | set(identity) if stored.get(k) != identity.get(k))
        raise StateError(
            f"{where}: this state dir was made for other inputs (differs in {changed}); serving "
            "with these would change steps already served. Use the original datasets and flags, or a "
            "new --state-dir"
        )
    return True


def _read_frontier(store: StateStore) -> tuple[int, int]:
    """(reserved, served) from frontier.json."""
    path = store.where(FRONTIER_FILE)
    data = _read_json(store, FRONTIER_FILE)
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

    store: StateStore
    log: MixLog
    reserved: int
    served: int
    unserved_from: int
    reserve_steps: int

    @property
    def schedule(self) -> MixSchedule:
        return self.log.schedule

    @classmethod
    def open(cls, store: StateStore, identity: dict, reserve_steps: int = 256) -> Optional["StateDir"]:
        """Resume the state in `store` (which this process owns); None when it holds none yet (see `create`)."""
        _check_reserve_steps(reserve_steps)
        if not check_identity(store, identity):
            return None
        try:
            log = MixLog.open(store)
        except ScheduleError as e:
            raise StateError(f"{e}; restore it from a backup or use a new --state-dir") from e
        reserved, served = _read_frontier(store)
        return cls(store, log, reserved, served, reserved, reserve_steps)

    @classmethod
    def create(cls, store: StateStore, identity: dict, first: Stage, by: str, reserve_steps: int = 256) -> "StateDir":
        """A new state in `store`, its log starting with `first` (asked for by `by`). A log or frontier left
        by a creation that died before identity.json is replaced."""
        _check_reserve_steps(reserve_steps)
        for name in (LOG_FILE, FRONTIER_FILE):
            store.read(name)  # its version (or absence), which the conditional replaces below are checked against
        state = cls(store, MixLog.create(store, first, by), 0, 0, 0, reserve_steps)
        state._write_frontier(0)
        store.create(IDENTITY_FILE, _json_bytes(identity))  # last: a store without it is not a state yet
        return state

    def fence(self, owner: str) -> None:
        """Make every later write of a previous owner that may still run fail (see ownership.py): an `owner`
        record in the log, then the frontier rewritten, each a conditional write. Then no step below the
        reservation read here can get another schedule, and no step at or past it was served."""
        self.log.append("owner", owner, reason="took the state over from an owner whose lease expired",
                        data={"address": owner})
        self.reserved, self.served = _read_frontier(self.store)  # a step served meanwhile moved them
        self.unserved_from = self.reserved
        self._write_frontier(self.reserved)

    def _write_frontier(self, reserved: int) -> None:
        self.store.replace(FRONTIER_FILE, _json_bytes({"reserved": reserved, "served": self.served}))
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
