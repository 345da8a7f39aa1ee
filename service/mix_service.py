"""The mixer service without HTTP: a Mixer, its durable state, and the rules for changing the mix.

Every method is safe to call from many threads. Serving step s first makes s part of the served past
(on disk, s is below the durable reservation; see state.py), then computes the batch (a pure function
of inputs that can no longer change for s), so a crash at any point never lets a later mix change
rewrite a step a client has seen.

A mix change may start at any step that provably was never served (`StateDir.unserved_from`; how the
reservation makes that cheap and crash-safe is explained once, in state.py). It must also start after
the last stage already scheduled: the log is append-only, and withdrawing a
stage no step has reached is its own, recorded operation (`cancel_stage`).
"""

from __future__ import annotations

import hashlib
import math
import threading
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from pipeline.dataset import TokenDataset
from service.errors import ServiceError
from service.prometheus_metrics import ServiceMetrics
from service.mixer import MIX_RULE, Mixer, MixerConfig
from service.control_laws import Feedback, make_law
from service.controller import Controller
from service.integers import check_integer
from service.mix_schedule import MixSchedule, ScheduleError, Stage, check_weight_names
from service.ownership import DEFAULT_LEASE_SECONDS, acquire
from service.state import StateDir, check_identity
from service.state_store import StateError, StateStore, Superseded, open_store
from service.wire import Batch

FENCE_ATTEMPTS = 5
MAX_BODY_BYTES = 64 << 20  # one response body; bounds the memory a single request can make the service hold


class MixConflict(ServiceError):
    """A mix change that would rewrite served steps or an already scheduled stage (HTTP 409)."""

    http_status = 409


class NoSuchStage(ServiceError):
    """A cancel names a start step at which no stage starts (HTTP 404)."""

    http_status = 404


class NoController(ServiceError):
    """Feedback or a controller request to a service that runs no controller (HTTP 409)."""

    http_status = 409


class TooFarAhead(ServiceError):
    """A read past the served frontier by more than the lookahead allows (HTTP 409)."""

    http_status = 409


def steps_per_body(mixer: Mixer, rank: int, world_size: int, token_bytes: int) -> int:
    """How many of the rank's steps fit in one body of MAX_BODY_BYTES at `token_bytes` a token (at least 1);
    ValueError for a rank or world size that does not fit the global batch. (The owner's and a replica's.)"""
    rows = len(mixer.rows_of(rank, world_size))
    return max(1, MAX_BODY_BYTES // (rows * ((mixer.config.seq_len + 1) * token_bytes + 1)))


def count_served_tokens(metrics: ServiceMetrics, mixer: Mixer, batches: Sequence[Batch]) -> None:
    """Add the batches' tokens to the per-dataset counter (the owner's and a replica's)."""
    if not batches:
        return
    rows = np.bincount(np.concatenate([b.sources for b in batches]), minlength=len(mixer.names))
    for name, count in zip(mixer.names, rows.tolist()):
        if count:
            metrics.tokens.labels(name).inc(count * (mixer.config.seq_len + 1))


def inputs_identity(datasets: Mapping[str, TokenDataset], config: MixerConfig) -> dict:
    """What a batch depends on besides the schedule, with each dataset named by its manifest's hash."""
    return {
        "datasets": {
            name: hashlib.sha256(ds.manifest_bytes).hexdigest() for name, ds in datasets.items()
        },
        "seq_len": config.seq_len,
        "global_batch": config.global_batch,
        "seed": config.seed,
        "mix_rule": MIX_RULE,
    }


class MixService:
    """A Mixer over durable state. `initial` (the first stage's weights) starts a new state dir; on an
    existing one it may be omitted, and if given must equal the stage the state dir started with.

    `max_lookahead`: a read of a step this far or further past the first unserved step is refused, so
    no reader (a confused client, a typo) can move the served frontier, and with it every future mix
    change, out of the training run's reach. Default: four reservations, at least 1024 steps (well
    beyond a StreamClient's read-ahead).
    """

    def __init__(self, datasets: Mapping[str, TokenDataset], config: MixerConfig, state_dir: str | Path,
                 initial: Mapping[str, float] | None = None, reserve_steps: int = 256,
                 max_lookahead: int | None = None, created_by: str = "python -m service --weights",
                 controller: tuple[str, dict] | None = None, address: str = "", standby: bool = False,
                 lease_seconds: float = DEFAULT_LEASE_SECONDS, on_lost: Callable[[str], None] | None = None,
                 waiting: Callable[[str], None] | None = None):
        """`state_dir`: a folder or `s3://bucket/prefix`, owned by this service from here to `close()`
        (ownership.py): a live owner is refused, naming it, unless `standby`, which waits for it to end.
        `address` is where this service serves, told to whoever is refused. `on_lost` is called if an
        object-store lease is taken away (the caller must stop serving)."""
        identity = inputs_identity(datasets, config)
        store = open_store(state_dir)
        # Checked before waiting or writing anything: a standby for another run's state is refused now.
        exists = check_identity(store, identity)
        if not exists and initial is None:
            raise StateError(f"{store.uri}: no state here yet; give the initial mix (--weights) to start one")
        first = Stage(0, dict(initial)) if initial is not None else None
        if first is not None:  # the mix checked against the datasets before anything is written
            Mixer(datasets, config, MixSchedule([first]))
        self.ownership = acquire(store, address, standby=standby, lease_seconds=lease_seconds, on_lost=on_lost,
                                 waiting=waiting)
        try:
            state = self._open_state(store, identity, first, created_by, reserve_steps)
            self.mixer = Mixer(datasets, config, state.schedule)
            self.state, self.identity = state, identity
            if max_lookahead is None:
                max_lookahead = max(1024, 4 * reserve_steps)
            self.max_lookahead = check_integer(max_lookahead, "max_lookahead", 1, error=StateError)
            self.metrics = ServiceMetrics(self.mixer.names)
            self._lock = threading.Lock()
            self.controller = self._open_controller(controller, store.uri)
        except BaseException:
            self.ownership.release()
            raise
        self._update_mix_metrics()

    def _open_state(self, store: StateStore, identity: dict, first: Stage | None, created_by: str,
                    reserve_steps: int) -> StateDir:
        """The owned state: resumed (fenced first if the previous owner may still run), or created."""
        for _ in range(FENCE_ATTEMPTS):
            state = StateDir.open(store, identity, reserve_steps)
            if state is None:
                return StateDir.create(store, identity, first, created_by, reserve_steps)
            if first is not None and first != state.schedule.stages[0]:
                raise StateError(
                    f"{store.uri}: the initial mix given ({first.weights}) differs from the one this state dir started "
                    f"with ({state.schedule.stages[0].weights}); the state dir's log decides the mix. Give the original "
                    "--weights or omit them, and change the mix with PUT /v1/mix"
                )
            if not self.ownership.took_over:
                return state
            try:
                state.fence(self.ownership.owner.describe())
                return state
            except Superseded:
                continue  # the old owner wrote once more before the fence: read it all again
        raise StateError(f"{store.uri}: the previous owner kept writing through {FENCE_ATTEMPTS} attempts to fence it; "
                         "stop it, then start this service again")

    def _open_controller(self, asked: tuple[str, dict] | None, state_dir: str) -> Controller | None:
        """The log's controller, continued from its logged state; or the one asked for, set up in the log.
        A controller other than the log's is refused: the log decides, as it does for the mix."""
        logged = Controller.from_log(self.state.log.entries)
        if asked is None:
            return logged
        try:
            wanted = Controller(make_law(*asked))
        except ValueError as e:
            raise StateError(f"--controller: {e}") from None
        old = wanted.law.settings().get("old")
        if old is not None and old not in self.mixer.names:
            raise StateError(f"--old {old!r}: not a dataset; the datasets are {list(self.mixer.names)}")
        if logged is None:
            self.state.log.append("controller", "python -m service --controller", data=wanted.setup_record())
            return wanted
        if logged.setup_record() != wanted.setup_record():
            raise StateError(
                f"{state_dir}: its log runs controller {logged.setup_record()}, not {wanted.setup_record()}; give "
                "the same controller flags (or none, to continue it), or use a new --state-dir"
            )
        return logged

    @property
    def vocab_size(self) -> int:
        return self.mixer.vocab_size

    def steps_per_body(self, rank: int, world_size: int, token_bytes: int) -> int:
        return steps_per_body(self.mixer, rank, world_size, token_bytes)

    @property
    def frontier(self) -> int:
        """The served frontier: one more than the largest step served (see StateDir.served)."""
        return self.state.served

    def batches(self, steps: Sequence[int], rank: int = 0, world_size: int = 1, dtype: np.dtype = np.int64) -> list[Batch]:
        """The rank's batches of `steps` (see Mixer.batches); ValueError for a bad step, rank or world
        size, TooFarAhead for a step beyond the lookahead. Neither moves the frontier."""
        self.mixer.check_request(steps, rank, world_size)
        if steps:
            with self._lock:
                self._serve_through(max(steps))
        batches = self.mixer.batches(steps, rank, world_size, dtype)
        count_served_tokens(self.metrics, self.mixer, batches)
        return batches

    def lease(self, until: int, rank: int = 0, world_size: int = 1) -> dict:
        """Grant a lease on every step below `until`, for clients that compute batches themselves
        (`StreamClient(compute="local")`). The steps become part of the served past exactly as if their
        batches had been sent (durably, the reservation moving as it does for reads), so no mix change can
        reach them: what a holder computes for them from the schedule returned is what this service would
        serve. A lease is on steps, not on a rank: each rank's rows follow from (rank, world size), so no
        rank can get another's rows by asking. It never expires (nothing here reads a clock); a client that
        cannot renew stops at its bound. ValueError for a bad rank or world size, TooFarAhead past the
        lookahead; nothing moves then."""
        check_integer(until, "until", 1, error=ValueError)
        self.mixer.check_request([until - 1], rank, world_size)
        with self._lock:
            self._serve_through(until - 1)
            self.metrics.leases.inc()
            return {"until": until, "schedule": self.state.schedule.to_json(), "served_frontier": self.state.served,
                    "next_change_step": self.next_change_step()}

    def _serve_through(self, last_step: int) -> None:
        """Make steps up to `last_step` served (under the lock): refused past the lookahead."""
        limit = self.state.unserved_from + self.max_lookahead
        if last_step >= limit:
            raise TooFarAhead(
                f"step {last_step} is more than {self.max_lookahead} steps past the first unserved step "
                f"{self.state.unserved_from}; ask for steps below {limit} (the service's --max-lookahead), "
                "in order, as training reaches them"
            )
        if self.state.mark_served(last_step):
            self.metrics.reserved.set(self.state.reserved)
        self.metrics.frontier.set(self.state.served)

    def change_mix(self, weights: Mapping[str, float], start_step: int | None = None, by: str = "operator",
                   reason: str | None = None) -> Stage:
        """Append a stage and record it in the log, durably, before returning it.

        Without start_step the stage lands at the first step past everything served and everything
        already scheduled. Raises ScheduleError for bad weights (every dataset named, 0 to leave one
        out) or a start_step past the last addressable step (422), and MixConflict for a step that may
        have been served or that is not after the last scheduled stage (409).
        """
        stage = Stage(0, dict(weights))  # the weights' own errors first, whatever the step
        check_weight_names(stage.weights, self.mixer.names)
        with self._lock:
            first, last = self.state.unserved_from, self.state.schedule.stages[-1]
            if start_step is None:
                start_step = self.next_change_step()
            elif start_step < first:
                raise MixConflict(
                    f"start_step {start_step} may already have been served (steps before {first} may have "
                    f"been: served_frontier {self.state.served}, plus what the reservation left by an earlier "
                    f"run covers); give start_step >= {first} or omit it"
                )
            elif start_step <= last.start_step:
                raise MixConflict(
                    f"start_step {start_step}: a stage is already scheduled at step {last.start_step} and the log is "
                    f"append-only; give start_step > {last.start_step}, omit it, or withdraw that stage first "
                    f"with DELETE /v1/mix/stages/{last.start_step}"
                )
            if start_step > self.mixer.max_step:
                raise ScheduleError(
                    f"start_step {start_step}: beyond the last step this mixer can address ({self.mixer.max_step})"
                )
            self._suspend_controller(by)
            return self._append_stage(Stage(start_step, stage.weights), by, reason)

    def _append_stage(self, stage: Stage, by: str, reason: str | None, data: dict | None = None) -> Stage:
        self._log_change("stage", by, stage=stage, reason=reason, data=data)
        return stage

    def _suspend_controller(self, by: str) -> None:
        """An operator's change suspends the controller: a human always has the last word."""
        if self.controller is not None and self.controller.enabled:
            self.state.log.append("controller", by, reason="suspended: an operator changed the mix",
                                  data={"enabled": False})
            self.controller.enabled = False

    def set_controller(self, enabled: bool, by: str = "operator") -> dict:
        """Suspend or resume the controller (PUT /v1/controller); NoController (409) if there is none."""
        with self._lock:
            controller = self._the_controller()
            if controller.enabled != enabled:
                self.state.log.append("controller", by, reason="resumed" if enabled else "suspended",
                                      data={"enabled": enabled})
                controller.enabled = enabled
            return controller.describe()

    def controller_state(self) -> dict:
        with self._lock:
            return self._the_controller().describe()

    def _the_controller(self) -> Controller:
        if self.controller is None:
            raise NoController("this service runs no controller; start it with --controller to have one")
        return self.controller

    def feedback(self, feedback: Feedback, by: str) -> dict:
        """Take a trainer's losses at a step (POST /v1/feedback): recorded in the log, folded into the
        controller, and its decision, if any, appended as a stage at next_change_step.

        `step` counts updates, as the trainer's metrics do: the losses of the model trained on steps
        0..step-1. ScheduleError (422) for losses that name no dataset, are not finite or are negative, or a
        step whose batches were not served yet; MixConflict (409) for feedback older than the latest; NoController (409) without one.
        """
        losses = {**feedback.losses, **feedback.source_losses}
        if not feedback.losses:
            raise ScheduleError("losses: empty; give the validation loss of at least one dataset")
        for name, loss in losses.items():
            if name not in self.mixer.names:
                raise ScheduleError(f"losses.{name}: not a dataset; the datasets are {list(self.mixer.names)}")
            if isinstance(loss, bool) or not isinstance(loss, (int, float)) or not math.isfinite(loss) or loss < 0:
                raise ScheduleError(f"losses.{name}: {loss!r}; a loss must be a finite number >= 0")
        with self._lock:
            controller = self._the_controller()
            if feedback.step > self.state.served:  # the model after `step` updates trained on steps < step
                raise ScheduleError(f"step {feedback.step}: the model after {feedback.step} updates needs steps this "
                                    f"service has not served (served frontier {self.state.served})")
            if feedback.step <= controller.last_step:
                raise MixConflict(f"step {feedback.step}: feedback for step {controller.last_step} came already; "
                                  "feedback must move forward (one report per evaluation, from one rank)")
            self.state.log.append("feedback", by, data=feedback.to_json())
            observation = self.state.log.entries[-1]
            controller.observations.append(observation.to_json())
            decision = controller.observe(feedback, self.state.schedule)
            stage = None
            if decision is not None:
                stage = self._append_stage(Stage(self.next_change_step(), decision.weights), controller.by,
                                           decision.reason, data={"feedback_seq": observation.seq})
                controller.decisions.append(self.state.log.entries[-1].to_json())
            self._update_control_metrics()
            return {"stage": stage.to_json() if stage else None, "controller": controller.describe()["state"]}

    def cancel_stage(self, start_step: int, by: str = "operator", reason: str | None = None) -> Stage:
        """Withdraw the stage starting at `start_step`, recorded in the log; only while no step at or past
        it may have been served. NoSuchStage (404) or MixConflict (409) otherwise."""
        with self._lock:
            schedule = self.state.schedule
            stage = next((s for s in schedule.stages if s.start_step == start_step), None)
            if stage is None:
                raise NoSuchStage(
                    f"no stage starts at step {start_step}; the stages start at {[s.start_step for s in schedule.stages]}"
                )
            if start_step == 0 or start_step < self.state.unserved_from:
                raise MixConflict(
                    f"the stage at step {start_step} is the first stage or may already have served steps (steps before "
                    f"{self.state.unserved_from} may have been served); it stays in the log. Append a new stage instead"
                )
            self._suspend_controller(by)
            self._log_change("cancel", by, start_step=start_step, reason=reason)
            return stage

    def _log_change(self, op: str, by: str, **entry) -> None:
        """A schedule change, durably in the log, then in force for the mixer and its metrics."""
        self.mixer.set_schedule(self.state.log.append(op, by, **entry))
        self._update_mix_metrics()

    def mix(self) -> dict:
        """The schedule, its log and the frontiers (the body of GET and PUT /v1/mix).

        Read without the lock, safely: a change replaces the schedule object whole (never mutates it) and
        only appends to the log's list, so a reader sees a consistent schedule, a log at least as long as
        it, and frontiers that only grow; at worst it misses a change made while it reads."""
        state = self.state
        return {"schedule": state.schedule.to_json(), "log": [entry.to_json() for entry in state.log.entries],
                "served_frontier": state.served, "reserved": state.reserved, "next_change_step": self.next_change_step()}

    def next_change_step(self) -> int:
        """Where a change without start_step lands now: past everything served and scheduled."""
        return max(self.state.unserved_from, self.state.schedule.stages[-1].start_step + 1)

    def _update_mix_metrics(self) -> None:
        stage = self.state.schedule.stage_at(self.state.served)
        self.metrics.set_mix(stage.weights, self.state.served)
        self.metrics.reserved.set(self.state.reserved)
        self._update_control_metrics()

    def _update_control_metrics(self) -> None:
        if self.controller is not None:
            self.metrics.set_control(self.controller.law.state(), self.controller.enabled)

    def close(self) -> None:
        """Record exactly what was served (a clean shutdown), so a restart accepts changes from there, and
        hand the state on: a standby takes over at once."""
        with self._lock:
            try:
                self.state.close()
            except Superseded:
                pass  # another process owns the state now: what it holds stays as it wrote it
            finally:
                self.ownership.release()

    def status(self, include_paths: bool = False) -> dict:
        """The service's state for /v1/status; dataset paths on the server's disk only when asked
        (authenticated callers: a trainer opens the validation splits from them)."""
        mixer, frontier = self.mixer, self.state.served
        drawn = mixer.samples_before(frontier)
        epochs = mixer.epochs(frontier)
        total = sum(drawn.values())
        stage = self.state.schedule.stage_at(frontier)
        manifests = self.identity["datasets"]
        datasets = {  # keyed by name, in the mixer's order (sources index this order)
            name: {
                "manifest_sha256": manifests[name],
                "train_tokens": ds.train.num_tokens,
                "windows": int(windows),
                "vocab_size": ds.vocab_size,
                "samples_served": drawn[name],
                "epoch": epochs[name],
                "share_served": drawn[name] / total if total else 0.0,
            }
            for (name, ds), windows in zip(mixer.datasets.items(), mixer.windows)
        }
        if include_paths:
            for name, ds in mixer.datasets.items():
                datasets[name]["path"] = ds.uri
        return {
            "datasets": datasets,
            "vocab_size": mixer.vocab_size,
            "eos_id": mixer.eos_id,
            "seq_len": mixer.config.seq_len,
            "global_batch": mixer.config.global_batch,
            "seed": mixer.config.seed,
            "mix_rule": MIX_RULE,
            # One more than the largest step served (lower bound for what earlier runs served).
            "served_frontier": frontier,
            # Durable upper bound: no step at or above it has ever been served.
            "reserved": self.state.reserved,
            "reserve_steps": self.state.reserve_steps,
            "max_lookahead": self.max_lookahead,
            # The earliest start_step PUT /v1/mix accepts now, and where a change without one lands.
            "next_change_step": self.next_change_step(),
            "current_weights": dict(stage.weights),
            # Whether trainers should POST /v1/feedback after each evaluation, and to which controller.
            "feedback": {"wanted": self.controller is not None,
                         "controller": self.controller.law.name if self.controller else None,
                         "enabled": bool(self.controller and self.controller.enabled)},
            "schedule": self.state.schedule.to_json(),
        }
