"""What both halves of the stream benchmark share (`benchmarks/stream.py`: the mixer, HTTP and baselines on
local disk; `benchmarks/stream_store.py`: object storage): its settings, the mixer as a reader, and the
timer every reader is measured with.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.dataset import TokenDataset

REPO = Path(__file__).resolve().parents[1]
SEQ_LEN, GLOBAL_BATCH, WEIGHTS = 2048, 8, {"old": 0.25, "new": 0.75}
ROW = SEQ_LEN + 1


@dataclass(frozen=True)
class BenchConfig:
    work: Path
    pages: int
    steps: int
    rounds: int
    baseline_python: Path | None
    baseline: str | None  # internal: run one baseline in this (other) interpreter
    only: str  # "all", "local" (sections 1-3) or "store" (section 4)
    mosaic_python: Path
    store_repeat: int
    store_steps: int
    store_rounds: int


def rate(make_batches, steps: int, warmup: int = 5) -> float:
    """Tokens per second over `steps` batches of GLOBAL_BATCH rows, after a short warm-up."""
    batches = make_batches()
    for _ in range(warmup):
        next(batches)
    started = time.perf_counter()
    for _ in range(steps):
        tokens = next(batches)
        assert tokens.shape == (GLOBAL_BATCH, ROW)
    elapsed = time.perf_counter() - started
    batches.close()  # a client's generator closes its client
    return steps * GLOBAL_BATCH * ROW / elapsed


def in_process_batches(paths: dict[str, Path | str], chunk: int = 1, cache=None):
    """The mixer's batches in step order, computed `chunk` steps per call; a path may be an s3:// URI,
    read through the shard cache `cache` (a CacheConfig)."""
    from service.mixer import Mixer, MixerConfig
    from service.mix_schedule import MixSchedule

    import torch

    mixer = Mixer({n: TokenDataset(paths[n], cache=cache) for n in WEIGHTS}, MixerConfig(SEQ_LEN, GLOBAL_BATCH),
                  MixSchedule.constant(WEIGHTS))
    step = 0
    while True:
        for batch in mixer.batches(list(range(step, step + chunk))):
            yield torch.from_numpy(batch.tokens)
        step += chunk


def windows_of(path: Path) -> np.ndarray:
    split = TokenDataset(path).train
    count = (split.num_tokens - 1) // SEQ_LEN
    return np.stack([split.read(w * SEQ_LEN, ROW) for w in range(count)])
