"""The mixer service without HTTP: a Mixer, its durable state, and the rules for changing the mix.

Every method is safe to call from many threads. Serving step s first makes s part of the served past
(on disk, s is below the durable reservation; see state.py), then computes the batch (a pure function
of inputs that can no longer change for s), so a crash at any point never lets a later mix change
rewrite a step a client has seen.

A mix change may start at any step that provably was never served (`unserved_from`): the next step
after the largest one this process served, or, for what earlier runs served, the reservation they
left (after a kill -9 up to `reserve_steps` beyond what they served; exact after a clean shutdown).
"""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from pipeline.dataset import MANIFEST_NAME, TokenDataset
from service.metrics import ServiceMetrics
from service.mixer import Batch, Mixer, MixerConfig
from service.schedule import MixSchedule, ScheduleError, Stage
from service.state import StateDir


class MixConflict(Exception):
    """A mix change that would rewrite served steps or an already scheduled stage (HTTP 409)."""


def inputs_identity(datasets: Mapping[str, TokenDataset], config: MixerConfig) -> dict:
    """What a batch depends on besides the schedule, with each dataset named by its manifest's hash."""
    return {
        "datasets": {
            name: hashlib.sha256((ds.root / MANIFEST_NAME).read_bytes()).hexdigest() for name, ds in datasets.items()
        },
        "seq_len": config.seq_len,
        "global_batch": config.global_batch,
        "seed": config.seed,
    }


class MixService:
    def __init__(self, datasets: Mapping[str, TokenDataset], config: MixerConfig, initial: MixSchedule, state_dir: Path,
                 reserve_steps: int = 256):
        # Validate the initial mix against the datasets before anything is written to the state dir.
        self.mixer = Mixer(datasets, config, initial)
        self.state = StateDir.open(state_dir, inputs_identity(datasets, config), initial, reserve_steps)
        self.mixer.set_schedule(self.state.schedule)
        self.metrics = ServiceMetrics(self.mixer.names)
        self._lock = threading.Lock()
        self._update_mix_metrics()

    @property
    def frontier(self) -> int:
        """The served frontier: one more than the largest step served (see StateDir.served)."""
        return self.state.served

    def batch(self, step: int, rank: int = 0, world_size: int = 1) -> Batch:
        return self.batches([step], rank, world_size)[0]

    def batches(self, steps: Sequence[int], rank: int = 0, world_size: int = 1, dtype: np.dtype = np.int64) -> list[Batch]:
        """The rank's batches of `steps` (see Mixer.batches); ValueError for a bad step, rank or world size."""
        self.mixer.check_request(steps, rank, world_size)  # refuse bad input before it can move the frontier
        if steps:
            with self._lock:
                if self.state.mark_served(max(steps)):
                    self.metrics.reserved.set(self.state.reserved)
                self.metrics.frontier.set(self.state.served)
        batches = self.mixer.batches(steps, rank, world_size, dtype)
        if batches:
            rows = np.bincount(np.concatenate([b.sources for b in batches]), minlength=len(self.mixer.names))
            row_tokens = self.mixer.config.seq_len + 1
            for name, count in zip(self.mixer.names, rows.tolist()):
                if count:
                    self.metrics.tokens.labels(name).inc(count * row_tokens)
        return batches

    def change_mix(self, weights: Mapping[str, float], start_step: int | None = None) -> Stage:
        """Append a stage (at the first unserved step when start_step is None) and persist it.

        Raises ScheduleError for bad weights or a start_step past the last addressable step (422), and
        MixConflict for a step already served or before a scheduled stage (409).
        """
        with self._lock:
            first, last = self.state.unserved_from, self.state.schedule.stages[-1]
            if start_step is None:
                start_step = first
            elif start_step < first:
                raise MixConflict(
                    f"start_step {start_step} may already have been served (steps before {first} may have "
                    f"been: served_frontier {self.state.served}, plus what the reservation left by an earlier "
                    f"run covers); give start_step >= {first} or omit it"
                )
            if start_step > self.mixer.max_step:
                raise ScheduleError(
                    f"start_step {start_step}: beyond the last step this mixer can address ({self.mixer.max_step})"
                )
            if start_step < last.start_step:
                raise MixConflict(
                    f"a stage is already scheduled at step {last.start_step} and the schedule is append-only; "
                    f"give start_step >= {last.start_step}"
                )
            stage = Stage(start_step, dict(weights))
            schedule = self.state.schedule.appended(stage)
            previous = self.mixer.schedule
            self.mixer.set_schedule(schedule)  # validates dataset names; raises before persisting
            try:
                self.state.set_schedule(schedule)
            except BaseException:
                self.mixer.set_schedule(previous)  # not durable, so not acknowledged, so not in effect
                raise
            self._update_mix_metrics()
            return stage

    def _update_mix_metrics(self) -> None:
        stage = self.mixer.schedule.stage_at(self.state.served)
        self.metrics.set_mix({name: stage.weights.get(name, 0.0) for name in self.mixer.names}, self.state.served)
        self.metrics.reserved.set(self.state.reserved)

    def close(self) -> None:
        """Record exactly what was served (a clean shutdown), so a restart accepts changes from there."""
        with self._lock:
            self.state.close()

    def status(self) -> dict:
        mixer, frontier = self.mixer, self.state.served
        drawn = mixer.samples_before(frontier)
        epochs = mixer.epochs(frontier)
        total = sum(drawn.values())
        stage = mixer.schedule.stage_at(frontier)
        return {
            "datasets": {  # keyed by name, in the mixer's order (sources index this order)
                name: {
                    "path": str(ds.root.resolve()),
                    "train_tokens": ds.train.num_tokens,
                    "windows": int(windows),
                    "vocab_size": ds.vocab_size,
                    "samples_served": drawn[name],
                    "epoch": epochs[name],
                    "share_served": drawn[name] / total if total else 0.0,
                }
                for (name, ds), windows in zip(mixer.datasets.items(), mixer.windows)
            },
            "vocab_size": mixer.vocab_size,
            "eos_id": mixer.eos_id,
            "seq_len": mixer.config.seq_len,
            "global_batch": mixer.config.global_batch,
            "seed": mixer.config.seed,
            # One more than the largest step served (lower bound for what earlier runs served).
            "served_frontier": frontier,
            # Durable upper bound: no step at or above it has ever been served.
            "reserved": self.state.reserved,
            "reserve_steps": self.state.reserve_steps,
            # The earliest start_step PUT /v1/mix accepts now, and where a change without one lands.
            "next_change_step": self.state.unserved_from,
            "current_weights": {name: stage.weights.get(name, 0.0) for name in mixer.names},
            "schedule": mixer.schedule.to_json(),
        }
