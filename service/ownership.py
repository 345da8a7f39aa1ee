"""One writer per state: which process owns a state dir, and how a standby takes over from it.

Two services that both wrote one mix log would serve different bytes under one step number, so a state
has one owner, and the storage itself enforces it:

- Local or shared folder: an exclusive `flock` on `owner.lock`, held for the life of the owner and
  released by the kernel when it ends, kill -9 included. `owner.json` beside it names the holder, so a
  second process is refused with the owner's address, and a standby (`--standby`) waits on the lock and
  takes over the moment the owner is gone.
- Object store (`s3://`): no lock exists there, so `owner.json` is a lease. The owner creates it if
  absent (`If-None-Match: *`) and renews it every third of `--lease-seconds` by a conditional replace
  (`If-Match`). A standby takes over only when the owner released it (a clean shutdown) or when it saw
  the same version unchanged for a whole lease period on its own clock; its takeover is a conditional
  replace too, so of two standbys only one wins.

Safety does not rest on clocks. Every write of the state is conditional (state_store.py), and a new owner
that took over from an owner that may still run makes two writes before it serves: an `owner` record in
the mix log, and the frontier rewritten (state.py `StateDir.fence`). From then on every write the old
owner tries is refused, so it can neither log a change the new owner does not know nor move the
reservation; the steps it may still serve without writing are below the reservation the new owner read,
which counts them as served, with the schedule of a log the new owner holds whole. An owner whose lease
renewal is refused has lost the state and stops (`on_lost`).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from service.state_store import AlreadyExists, LocalStore, StateError, StateStore, Superseded

OWNER_FILE, LOCK_FILE = "owner.json", "owner.lock"
DEFAULT_LEASE_SECONDS = 10.0
POLL_SECONDS = 0.2  # how often a local standby tries the lock


class StateOwned(StateError):
    """The state has a live owner; the message names it and says what to do."""


@dataclass(frozen=True)
class Owner:
    """Who owns a state: a process, where it serves, and since when (term counts takeovers)."""

    id: str
    address: str
    host: str
    pid: int
    term: int = 0

    @classmethod
    def this_process(cls, address: str) -> "Owner":
        return cls(uuid.uuid4().hex, address, socket.gethostname(), os.getpid())

    def describe(self) -> str:
        return f"{self.address or 'no address'} (pid {self.pid} on {self.host})"


def _record(owner: Owner, released: bool = False) -> bytes:
    return json.dumps({"id": owner.id, "address": owner.address, "host": owner.host, "pid": owner.pid,
                       "term": owner.term, "released": released, "renewed": time.time()}, sort_keys=True).encode()


def _parse(data: bytes | None) -> tuple[Owner, bool] | None:
    """(owner, released) from owner.json; None when absent or unreadable (a torn write of a dead owner)."""
    try:
        record = json.loads(data) if data else None
        return Owner(record["id"], record["address"], record["host"], record["pid"], record["term"]), record["released"]
    except (ValueError, KeyError, TypeError):
        return None


class Ownership:
    """This process's ownership of one state; `release()` on a clean shutdown.

    `took_over`: whether the previous owner may still be running (a lease taken over after it expired), in
    which case the state must be fenced before anything is served (state.py).
    """

    def __init__(self, store: StateStore, owner: Owner, took_over: bool, release: Callable[[], None]):
        self.store, self.owner, self.took_over = store, owner, took_over
        self._release, self._released = release, False

    def release(self) -> None:
        """Hand the state on (idempotent)."""
        if not self._released:
            self._released = True
            self._release()


def acquire(store: StateStore, address: str, *, standby: bool = False, lease_seconds: float = DEFAULT_LEASE_SECONDS,
            on_lost: Callable[[str], None] | None = None, waiting: Callable[[str], None] | None = None) -> Ownership:
    """Own `store`'s state. Without `standby` a live owner is refused (StateOwned, naming it); with it,
    wait until the owner is gone (`waiting` is told once whom it waits for). `on_lost(reason)` is called
    from a background thread if an object-store lease is taken away; the caller must stop serving."""
    me = Owner.this_process(address)
    if isinstance(store, LocalStore):
        return _acquire_lock(store, me, standby, waiting)
    return _acquire_lease(store, me, standby, lease_seconds, on_lost, waiting)


def _refusal(store: StateStore, owner: Owner | None, how: str) -> StateOwned:
    whom = owner.describe() if owner else "another process"
    return StateOwned(
        f"{store.uri}: owned by {whom}, {how}; one process writes a state. Send requests to that service, stop it "
        "first, or start this one with --standby to take over when it ends (or --replica-of its URL to serve "
        "batches beside it)"
    )


def _acquire_lock(store: LocalStore, me: Owner, standby: bool, waiting: Callable[[str], None] | None) -> Ownership:
    store.make()
    path = store.root / LOCK_FILE
    # A file object, not a bare descriptor: an owner dropped without release() closes it when collected,
    # and the kernel releases the lock with it.
    lock = open(path, "a+b")
    told = False
    while True:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            current = _parse(store.read(OWNER_FILE))
            if not standby:
                lock.close()
                raise _refusal(store, current[0] if current else None, f"which holds the lock on {path}") from None
            if not told and waiting is not None:
                waiting(current[0].describe() if current else "another process")
                told = True
            time.sleep(POLL_SECONDS)
    store.replace(OWNER_FILE, _record(me))

    def release() -> None:
        store.replace(OWNER_FILE, _record(me, released=True))
        lock.close()  # releases the lock

    return Ownership(store, me, took_over=False, release=release)


def _acquire_lease(store: StateStore, me: Owner, standby: bool, lease_seconds: float,
                   on_lost: Callable[[str], None] | None, waiting: Callable[[str], None] | None) -> Ownership:
    """Take the lease: at once when absent or released; after it went unrenewed for a whole lease period
    (its owner is gone: a restart after a crash waits that long once); never while it is being renewed,
    which refuses a second owner at once and keeps a standby waiting."""
    if not lease_seconds > 0:
        raise StateError(f"--lease-seconds {lease_seconds}: must be > 0")
    seen, seen_since, told = None, time.monotonic(), False
    while True:
        data = store.read(OWNER_FILE)
        current = _parse(data)
        if data != seen:
            renewed = seen is not None  # the owner renewed while we watched: it is alive
            seen, seen_since = data, time.monotonic()
            if renewed and not standby:
                raise _refusal(store, current[0] if current else None,
                               f"whose lease in {store.where(OWNER_FILE)} is being renewed")
        try:
            if data is None:
                store.create(OWNER_FILE, _record(me))
                took_over = False
                break
            released = current is None or current[1]
            if released or time.monotonic() - seen_since >= lease_seconds:
                me = Owner(me.id, me.address, me.host, me.pid, (current[0].term + 1) if current else 1)
                store.replace(OWNER_FILE, _record(me))
                took_over = not released
                break
        except (AlreadyExists, Superseded):
            seen = None  # another process moved first: look again
            continue
        if standby and not told and waiting is not None:
            waiting(current[0].describe() if current else "another process")
            told = True
        time.sleep(min(lease_seconds / 4, 1.0))

    stop = threading.Event()
    renewals = threading.Thread(target=_renew, args=(store, me, lease_seconds, stop, on_lost), daemon=True,
                                name="state-lease")
    renewals.start()

    def release() -> None:
        stop.set()
        renewals.join()
        try:
            store.replace(OWNER_FILE, _record(me, released=True))
        except StateError:
            pass  # lost meanwhile: the new owner's record stays

    return Ownership(store, me, took_over=took_over, release=release)


def _renew(store: StateStore, me: Owner, lease_seconds: float, stop: threading.Event,
           on_lost: Callable[[str], None] | None) -> None:
    while not stop.wait(lease_seconds / 3):
        try:
            store.replace(OWNER_FILE, _record(me))
        except Superseded:
            if on_lost is not None:
                on_lost(f"{store.where(OWNER_FILE)}: another process took the state over")
            return
        except StateError:
            continue  # the store unreachable: try again; the writes themselves stay fenced
