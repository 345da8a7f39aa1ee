"""The mixer service without HTTP: a Mixer, its durable state, and the rules for changing the mix.

Every method is safe to call from many threads. Serving step s first makes s part of the served past
on disk, then computes the batch (a pure function of inputs that can no longer change for s), so a
crash at any point never lets a later mix change rewrite a step a client has seen.
"""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path
from typing import Mapping

from pipeline.dataset import MANIFEST_NAME, TokenDataset
from service.metrics import ServiceMetrics
from service.mixer import Batch, Mixer, MixerConfig
from service.schedule import MixSchedule, Stage
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
    def __init__(self, datasets: Mapping[str, TokenDataset], config: MixerConfig, initial: MixSchedule, state_dir: Path):
        # Validate the initial mix against the datasets before anything is written to the state dir.
        self.mixer = Mixer(datasets, config, initial)
        self.state = StateDir.open(state_dir, inputs_identity(datasets, config), initial)
        self.mixer.set_schedule(self.state.schedule)
        self.metrics = ServiceMetrics(self.mixer.names)
        self._lock = threading.Lock()
        self._update_mix_metrics()

    @property
    def frontier(self) -> int:
        return self.state.frontier

    def batch(self, step: int, rank: int = 0, world_size: int = 1) -> Batch:
        self.mixer.rows_of(rank, world_size)  # refuse a bad rank before it can move the frontier
        with self._lock:
            if self.state.mark_served(step):
                self.metrics.frontier.set(self.state.frontier)
        batch = self.mixer.batch(step, rank, world_size)
        row_tokens = batch.tokens.shape[1]
        for index, name in enumerate(batch.dataset_names):
            rows = int((batch.sources == index).sum())
            if rows:
                self.metrics.tokens.labels(name).inc(rows * row_tokens)
        return batch

    def change_mix(self, weights: Mapping[str, float], start_step: int | None = None) -> Stage:
        """Append a stage (at the first unserved step when start_step is None) and persist it.

        Raises ScheduleError for bad weights (422) and MixConflict for a step already served or before
        a scheduled stage (409).
        """
        with self._lock:
            frontier, last = self.state.frontier, self.state.schedule.stages[-1]
            if start_step is None:
                start_step = frontier
            elif start_step < frontier:
                raise MixConflict(
                    f"start_step {start_step} was already served (steps before {frontier} are); "
                    f"give start_step >= {frontier} or omit it"
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
        stage = self.mixer.schedule.stage_at(self.state.frontier)
        self.metrics.set_mix({name: stage.weights.get(name, 0.0) for name in self.mixer.names}, self.state.frontier)

    def status(self) -> dict:
        mixer, frontier = self.mixer, self.state.frontier
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
            "served_frontier": frontier,
            "current_weights": {name: stage.weights.get(name, 0.0) for name in mixer.names},
            "schedule": mixer.schedule.to_json(),
        }
