"""The in-process mixer: the batch for (step, rank, world_size), as a pure function of its inputs.

Samples are windows of seq_len + 1 tokens from each dataset's train split; window w covers tokens
[w * seq_len, w * seq_len + seq_len + 1), so consecutive windows share one token (the last target
of one row is the first input of the next) and a dataset of T tokens has (T - 1) // seq_len windows.

Datasets are always taken in name order (`canonical_names`): source ids, tie-breaks and quantised
weights never depend on the order in which datasets were listed on a command line or in a mapping.

Global sample g = step * global_batch + row. Inside a stage, which dataset sample g comes from follows
Tijdeman's chairman-assignment rule (R. Tijdeman, "The chairman assignment problem", Discrete Math. 32,
1980): with k datasets of positive weight, every prefix of n samples of the stage holds c_i samples of
dataset i with |c_i - w_i n| <= 1 - 1/(2(k - 1)), the best bound that holds for all weights (Megatron's
greedy rule, used before `MIX_RULE` 2, exceeds one sample for k >= 4). With integer weights u_i summing
to P (the stage's units divided by their gcd) every count is exact at n = P, so the rule repeats every P
samples and one table of P entries per distinct weight vector answers any index in O(1). Per-dataset
counts at each stage's start are kept (O(stages), computed when the schedule is set), so no lookup
replays history.

Dataset i's k-th sample is window permute(k mod W_i) of epoch k // W_i, with a Feistel bijection keyed
by (seed, dataset name, epoch): every window once per epoch, a fresh order each epoch, no arrays.

`batches(steps)` computes several steps together: the lookups above run as numpy array operations
over all rows of all steps at once, and only the row copies out of the memory maps are a loop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Iterator, Mapping, Sequence

import numpy as np

from pipeline.dataset import TokenDataset, TokenSplit
from service.errors import ServiceError
from service.integers import check_integer
from service.permutation import ROUNDS, permutation_key, permute_many, round_keys
from service.mix_schedule import MixSchedule, check_weight_names
from service.vocabulary import check_vocabularies
from service.wire import Batch

MAX_DATASETS = 255  # a row's source is one uint8
# The rule that assigns samples to datasets, versioned because changing it changes the bytes of every
# batch: a state dir written under another rule is refused rather than served differently.
# 1: Megatron's greedy rule, datasets in the order given; 2: Tijdeman's rule, datasets in name order.
MIX_RULE = 2


class MixError(ServiceError, ValueError):
    """Datasets that cannot be mixed as configured: none, too many, or one shorter than a sequence."""


def canonical_names(names: Iterable[str]) -> tuple[str, ...]:
    """The one order of datasets everywhere a mix is computed: by name."""
    return tuple(sorted(names))


@dataclass(frozen=True)
class MixerConfig:
    seq_len: int
    global_batch: int
    seed: int = 0

    def __post_init__(self) -> None:
        check_integer(self.seq_len, "seq_len", 1)
        check_integer(self.global_batch, "global_batch", 1)
        check_integer(self.seed, "seed")


@dataclass(frozen=True)
class _Period:
    """One period of Tijdeman's rule for integer weights `units` (summing to `length`)."""

    units: np.ndarray  # (datasets,) int64
    length: int
    owner: np.ndarray  # (length,) uint8: the dataset of each sample in the period
    before: np.ndarray  # (length + 1, datasets) int64: samples of each dataset among the first r

    @classmethod
    def build(cls, units: tuple[int, ...]) -> "_Period":
        divisor = math.gcd(*units)
        reduced = [u // divisor for u in units]
        length = sum(reduced)
        owner = np.empty(length, dtype=np.uint8)
        for n, best in enumerate(_tijdeman(reduced)):
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
    starts: np.ndarray  # (stages,) int64: each stage's start step
    periods: tuple[_Period, ...]  # per stage
    stage_counts: np.ndarray  # (stages, datasets): samples each dataset gave before each stage


class Mixer:
    """Batches mixed from several token datasets by a schedule; see the module docstring for the rule."""

    def __init__(self, datasets: Mapping[str, TokenDataset], config: MixerConfig, schedule: MixSchedule):
        if not datasets:
            raise MixError("datasets: none given; a mix needs at least one dataset")
        if len(datasets) > MAX_DATASETS:
            raise MixError(f"datasets: {len(datasets)} given; at most {MAX_DATASETS} fit a uint8 source id")
        self.names: tuple[str, ...] = canonical_names(datasets)
        self.datasets = {name: datasets[name] for name in self.names}
        self.config = config
        vocabulary = check_vocabularies(self.datasets)
        self.vocab_size: int = vocabulary.vocab_size
        self.eos_id: int = vocabulary.eos_id
        self.windows = np.array(
            [(ds.train.num_tokens - 1) // config.seq_len for ds in self.datasets.values()], dtype=np.int64
        )
        for name, count in zip(self.names, self.windows):
            if count < 1:
                raise MixError(
                    f"dataset {name!r} ({self.datasets[name].root}): its train split has "
                    f"{self.datasets[name].train.num_tokens} tokens, fewer than seq_len + 1 = "
                    f"{config.seq_len + 1}; use a shorter --seq-len or a larger dataset"
                )
        # Global sample numbers (step * global_batch + row) stay far below 2**63 up to here.
        self.max_step = (1 << 62) // config.global_batch - 1
        self._readers = [_WindowReader(ds.train, config.seq_len) for ds in self.datasets.values()]
        self._periods: dict[tuple[int, ...], _Period] = {}
        self.set_schedule(schedule)

    # --- the schedule ---------------------------------------------------------------------------

    def set_schedule(self, schedule: MixSchedule) -> None:
        """Use `schedule` from now on. Its stage starts must keep the counts of earlier stages, which
        holds whenever it extends the current one (the service only ever appends)."""
        periods = []
        for i, stage in enumerate(schedule.stages):
            check_weight_names(stage.weights, self.names, f"stages[{i}].weights")
            units = tuple(stage.units[name] for name in self.names)
            if units not in self._periods:
                self._periods[units] = _Period.build(units)
            periods.append(self._periods[units])
        stage_counts = np.zeros((len(periods), len(self.names)), dtype=np.int64)
        for i in range(1, len(periods)):
            length = (schedule.stages[i].start_step - schedule.stages[i - 1].start_step) * self.config.global_batch
            stage_counts[i] = stage_counts[i - 1] + periods[i - 1].counts(length)
        # One assignment, so a thread computing a batch never sees a half-updated schedule.
        starts = np.array([stage.start_step for stage in schedule.stages], dtype=np.int64)
        self._plan = _Plan(schedule, starts, tuple(periods), stage_counts)

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
        check_integer(world_size, "world_size", 1)
        if B % world_size:
            raise ValueError(
                f"world_size: {world_size} does not divide global_batch {B}; choose a world size that "
                f"divides it or change --global-batch"
            )
        check_integer(rank, "rank", 0, world_size - 1)
        per_rank = B // world_size
        return range(rank * per_rank, (rank + 1) * per_rank)

    def locate(self, step: int, rank: int = 0, world_size: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """For each of the rank's rows: (dataset index, that dataset's sample ordinal)."""
        source, ordinal = self.locate_steps([step], rank, world_size)
        return source[0], ordinal[0]

    def check_request(self, steps: Sequence[int], rank: int, world_size: int) -> range:
        """The rank's rows, after checking every step; ValueError naming the bad step, rank or world size."""
        rows = self.rows_of(rank, world_size)
        for step in steps:
            check_integer(step, "step", 0, self.max_step)
        return rows

    def locate_steps(self, steps: Sequence[int], rank: int = 0, world_size: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """`locate` for several steps at once: two (len(steps), rows) arrays, uint8 and int64."""
        rows = self.check_request(steps, rank, world_size)
        plan = self._plan
        steps = np.asarray(steps, dtype=np.int64)
        stage_of = np.searchsorted(plan.starts, steps, side="right") - 1
        row_numbers = np.arange(rows.start, rows.stop, dtype=np.int64)
        source = np.empty((len(steps), len(rows)), dtype=np.uint8)
        ordinal = np.empty((len(steps), len(rows)), dtype=np.int64)
        for s in sorted(set(stage_of.tolist())):  # a range of steps nearly always lies in one stage
            chosen = stage_of == s
            period = plan.periods[s]
            j = (steps[chosen] - plan.starts[s])[:, None] * self.config.global_batch + row_numbers
            whole, rest = np.divmod(j, period.length)
            owner = period.owner[rest]
            source[chosen] = owner
            ordinal[chosen] = plan.stage_counts[s][owner] + whole * period.units[owner] + period.before[rest, owner]
        return source, ordinal

    def window_numbers(self, source: np.ndarray, ordinal: np.ndarray) -> np.ndarray:
        """The window number of each (dataset, sample ordinal) pair, epoch-permuted; flat int64."""
        source, ordinal = np.ravel(source), np.ravel(ordinal)
        windows = self.windows[source]
        epoch, position = np.divmod(ordinal, windows)
        pairs = list(zip(source.tolist(), epoch.tolist()))
        # A batch holds a handful of (dataset, epoch) permutations; derive each one's keys once.
        keys_of = {
            (index, e): round_keys(permutation_key(self.config.seed, self.names[index], e)) for index, e in set(pairs)
        }
        keys = np.array([keys_of[pair] for pair in pairs], dtype=np.uint64).reshape(len(pairs), ROUNDS)
        return permute_many(position, windows, keys)

    def batches(self, steps: Sequence[int], rank: int = 0, world_size: int = 1, dtype: np.dtype = np.int64) -> list[Batch]:
        """The rank's batch of each step, computed together: one permutation pass, one output array.

        `dtype` is the tokens' type: int64 (what embedding lookups take) or the service's wire width.
        """
        source, ordinal = self.locate_steps(steps, rank, world_size)
        flat_source = source.reshape(-1)
        windows = self.window_numbers(flat_source, ordinal.reshape(-1))
        tokens = np.empty((source.size, self.config.seq_len + 1), dtype=dtype)
        for index, reader in enumerate(self._readers):
            rows = np.flatnonzero(flat_source == index)
            if rows.size:
                reader.read_into(tokens, rows, windows[rows])
        tokens = tokens.reshape(source.shape + (self.config.seq_len + 1,))
        return [
            Batch(int(step), rank, world_size, tokens[i], source[i], self.names) for i, step in enumerate(steps)
        ]

    def batch(self, step: int, rank: int = 0, world_size: int = 1) -> Batch:
        return self.batches([step], rank, world_size)[0]


def _tijdeman(units: Sequence[int]) -> Iterator[int]:
    """The dataset of each of the first sum(units) samples under Tijdeman's rule, in exact integers.

    With weights w_i = u_i / P, c_i samples of dataset i so far and D = 1 - 1/(2(k - 1)): at sample t
    (1-based) the candidates are the datasets that may take one more sample without running ahead of
    their share by more than D (w_i t - c_i >= 1 - D); among them the one whose deadline, the first t'
    at which it would fall behind by more than D (t' > (c_i + D) / w_i), comes earliest wins, ties to
    the lower index. Tijdeman proves a candidate always exists and no deadline is ever missed.
    Everything is scaled by 2(k - 1) P to stay in integers: candidate iff 2(k-1)(u_i t - P c_i) >= P,
    deadline (2(k-1) c_i + 2k - 3) / u_i compared by cross-multiplication.
    """
    active = [i for i, u in enumerate(units) if u > 0]
    length, counts = sum(units), [0] * len(units)
    if len(active) == 1:
        yield from [active[0]] * length
        return
    scale = 2 * (len(active) - 1)
    for t in range(1, length + 1):
        best = -1
        for i in active:
            if scale * (units[i] * t - length * counts[i]) < length:
                continue
            if best < 0 or (scale * counts[i] + scale - 1) * units[best] < (scale * counts[best] + scale - 1) * units[i]:
                best = i
        counts[best] += 1
        yield best


class _WindowReader:
    """Copies one dataset's windows out of its memory-mapped shards.

    Plain ndarray views of the maps skip np.memmap's per-slice bookkeeping, which cost more than the
    copy itself for a 2049-token row; the split says which shard holds a window (`TokenSplit.locate`), and
    a window crossing a shard boundary goes through TokenSplit.read.
    """

    def __init__(self, split: TokenSplit, seq_len: int):
        self.split, self.seq_len = split, seq_len

    def read_into(self, out: np.ndarray, rows: np.ndarray, windows: np.ndarray) -> None:
        """out[rows[i]] = the tokens of window windows[i]."""
        length = self.seq_len + 1
        starts = windows * self.seq_len
        shard_of, offsets = self.split.locate(starts)
        # Asked of the split per call, not kept: a remote dataset's shard is fetched by its first read and
        # may leave the bounded cache later (see pipeline/shard_cache.py).
        shards = {shard: self.split.shard_tokens(shard).view(np.ndarray) for shard in set(shard_of.tolist())}
        for row, shard, offset, start in zip(rows.tolist(), shard_of.tolist(), offsets.tolist(), starts.tolist()):
            tokens = shards[shard]
            if offset + length <= len(tokens):
                out[row] = tokens[offset : offset + length]
            else:
                out[row] = self.split.read(start, length)
