"""The in-process mixer: the batch for (step, rank, world_size), as a pure function of its inputs.

Samples are windows of seq_len + 1 tokens from each dataset's train split; window w covers tokens
[w * seq_len, w * seq_len + seq_len + 1), so consecutive windows share one token (the last target
of one row is the first input of the next) and a dataset of T tokens has (T - 1) // seq_len windows.

Global sample g = step * global_batch + row. Inside a stage, which dataset sample g comes from follows
Megatron's greedy rule (take the dataset furthest behind its quota, ties to the earlier name), so every
prefix of the stage holds each dataset's share within one sample of weight x length. With integer
weights u_i summing to P (the stage's units divided by their gcd) the rule repeats every P samples, so
one table of P entries per distinct weight vector answers any index in O(1). Per-dataset counts at
each stage's start are kept (O(stages), computed when the schedule is set), so no lookup replays history.

Dataset i's k-th sample is window permute(k mod W_i) of epoch k // W_i, with a Feistel bijection keyed
by (seed, dataset name, epoch): every window once per epoch, a fresh order each epoch, no arrays.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import numpy as np

from pipeline.dataset import TokenDataset
from service.permutation import FeistelPermutation, permutation_key
from service.schedule import MixSchedule, ScheduleError
from service.vocab import check_vocabularies

MAX_DATASETS = 255  # a row's source is one uint8


@dataclass(frozen=True)
class MixerConfig:
    seq_len: int
    global_batch: int
    seed: int = 0

    def __post_init__(self) -> None:
        for field in ("seq_len", "global_batch"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{field}: {value!r}; it must be a positive integer")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed: {self.seed!r}; it must be an integer >= 0")


@dataclass(frozen=True)
class Batch:
    step: int
    rank: int
    world_size: int
    tokens: np.ndarray  # (rows, seq_len + 1) int64: inputs are [:, :-1], targets [:, 1:]
    sources: np.ndarray  # (rows,) uint8, index into dataset_names
    dataset_names: tuple[str, ...]


@dataclass(frozen=True)
class _Period:
    """One period of the greedy rule for integer weights `units` (summing to `length`)."""

    units: np.ndarray  # (datasets,) int64
    length: int
    owner: np.ndarray  # (length,) uint8: the dataset of each sample in the period
    before: np.ndarray  # (length + 1, datasets) int64: samples of each dataset among the first r

    @classmethod
    def build(cls, units: tuple[int, ...]) -> "_Period":
        divisor = math.gcd(*units)
        reduced = [u // divisor for u in units]
        length = sum(reduced)
        counts = [0] * len(reduced)
        owner = np.empty(length, dtype=np.uint8)
        for n in range(length):
            # Megatron's rule in integers: the largest deficit u_i * (n + 1) - length * c_i wins.
            best = max(range(len(reduced)), key=lambda i: (reduced[i] * (n + 1) - length * counts[i], -i))
            counts[best] += 1
            owner[n] = best
        before = np.zeros((length + 1, len(reduced)), dtype=np.int64)
        before[np.arange(1, length + 1), owner] = 1
        np.cumsum(before, axis=0, out=before)
        return cls(np.asarray(reduced, dtype=np.int64), length, owner, before)

    def counts(self, n: np.ndarray | int) -> np.ndarray:
        """Samples of each dataset among the first n of the stage; shape (..., datasets)."""
        whole, rest = np.divmod(np.asarray(n, dtype=np.int64), self.length)
        return whole[..., None] * self.units + self.before[rest]


@dataclass(frozen=True)
class _Plan:
    schedule: MixSchedule
    periods: tuple[_Period, ...]  # per stage
    stage_counts: np.ndarray  # (stages, datasets): samples each dataset gave before each stage


class Mixer:
    """Batches mixed from several token datasets by a schedule; see the module docstring for the rule."""

    def __init__(self, datasets: Mapping[str, TokenDataset], config: MixerConfig, schedule: MixSchedule):
        if not datasets:
            raise ValueError("datasets: none given; a mix needs at least one dataset")
        if len(datasets) > MAX_DATASETS:
            raise ValueError(f"datasets: {len(datasets)} given; at most {MAX_DATASETS} fit a uint8 source id")
        self.datasets = dict(datasets)
        self.names: tuple[str, ...] = tuple(datasets)
        self.config = config
        vocabulary = check_vocabularies(self.datasets)
        self.vocab_size: int = vocabulary.vocab_size
        self.eos_id: int = vocabulary.eos_id
        self.windows = np.array(
            [(ds.train.num_tokens - 1) // config.seq_len for ds in self.datasets.values()], dtype=np.int64
        )
        for name, count in zip(self.names, self.windows):
            if count < 1:
                raise ValueError(
                    f"dataset {name!r} ({self.datasets[name].root}): its train split has "
                    f"{self.datasets[name].train.num_tokens} tokens, fewer than seq_len + 1 = "
                    f"{config.seq_len + 1}; use a shorter --seq-len or a larger dataset"
                )
        self._periods: dict[tuple[int, ...], _Period] = {}
        self.set_schedule(schedule)

    # --- the schedule ---------------------------------------------------------------------------

    def set_schedule(self, schedule: MixSchedule) -> None:
        """Use `schedule` from now on. Its stage starts must keep the counts of earlier stages, which
        holds whenever it extends the current one (the service only ever appends)."""
        periods = []
        for i, stage in enumerate(schedule.stages):
            unknown = sorted(set(stage.weights) - set(self.names))
            if unknown:
                raise ScheduleError(
                    f"stages[{i}].weights: unknown dataset(s) {unknown}; the datasets are {list(self.names)}"
                )
            units = tuple(stage.units.get(name, 0) for name in self.names)
            if units not in self._periods:
                self._periods[units] = _Period.build(units)
            periods.append(self._periods[units])
        starts = np.zeros((len(periods), len(self.names)), dtype=np.int64)
        for i in range(1, len(periods)):
            length = (schedule.stages[i].start_step - schedule.stages[i - 1].start_step) * self.config.global_batch
            starts[i] = starts[i - 1] + periods[i - 1].counts(length)
        # One assignment, so a thread computing a batch never sees a half-updated schedule.
        self._plan = _Plan(schedule, tuple(periods), starts)

    @property
    def schedule(self) -> MixSchedule:
        return self._plan.schedule

    # --- random access --------------------------------------------------------------------------

    def samples_before(self, step: int) -> dict[str, int]:
        """How many samples each dataset has contributed to steps [0, step)."""
        counts = self._counts_before(step)
        return {name: int(c) for name, c in zip(self.names, counts)}

    def epochs(self, step: int) -> dict[str, int]:
        """The epoch (0-based) each dataset's next sample at `step` comes from."""
        counts = self._counts_before(step)
        return {name: int(c // w) for name, c, w in zip(self.names, counts, self.windows)}

    def _counts_before(self, step: int) -> np.ndarray:
        if step < 0:
            raise ValueError(f"step: {step}; steps start at 0")
        plan = self._plan
        s = plan.schedule.stage_index(step)
        offset = (step - plan.schedule.stages[s].start_step) * self.config.global_batch
        return plan.stage_counts[s] + plan.periods[s].counts(offset)

    def rows_of(self, rank: int, world_size: int) -> range:
        """The rows of the global batch that `rank` gets: a contiguous, disjoint slice."""
        B = self.config.global_batch
        if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"world_size: {world_size!r}; it must be a positive integer")
        if B % world_size:
            raise ValueError(
                f"world_size: {world_size} does not divide global_batch {B}; choose a world size that "
                f"divides it or change --global-batch"
            )
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"rank: {rank!r}; it must be in [0, {world_size})")
        per_rank = B // world_size
        return range(rank * per_rank, (rank + 1) * per_rank)

    def locate(self, step: int, rank: int = 0, world_size: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """For each of the rank's rows: (dataset index, that dataset's sample ordinal)."""
        rows = self.rows_of(rank, world_size)
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step: {step!r}; it must be an integer >= 0")
        plan = self._plan
        s = plan.schedule.stage_index(step)
        period = plan.periods[s]
        offset = (step - plan.schedule.stages[s].start_step) * self.config.global_batch
        j = offset + np.arange(rows.start, rows.stop, dtype=np.int64)
        whole, rest = np.divmod(j, period.length)
        source = period.owner[rest]
        ordinal = plan.stage_counts[s][source] + whole * period.units[source] + period.before[rest, source]
        return source, ordinal

    def window_of(self, source: int, ordinal: int) -> int:
        """The window number of dataset `source`'s sample number `ordinal` (epoch-permuted)."""
        windows = int(self.windows[source])
        epoch, position = divmod(int(ordinal), windows)
        key = permutation_key(self.config.seed, self.names[source], epoch)
        return FeistelPermutation(windows, key)(position)

    def batch(self, step: int, rank: int = 0, world_size: int = 1) -> Batch:
        source, ordinal = self.locate(step, rank, world_size)
        seq_len = self.config.seq_len
        tokens = np.empty((len(source), seq_len + 1), dtype=np.int64)
        splits = [self.datasets[name].train for name in self.names]
        for row, (index, k) in enumerate(zip(source.tolist(), ordinal.tolist())):
            tokens[row] = splits[index].read(self.window_of(index, k) * seq_len, seq_len + 1)
        return Batch(step, rank, world_size, tokens, source.astype(np.uint8), self.names)
