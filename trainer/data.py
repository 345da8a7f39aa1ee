"""Batch sources: the in-process mixer or the mixer service, behind one interface.

Both hand the loop `TrainBatch`es for consecutive steps from a start step, each holding this rank's rows
of that step. Which rows a step holds is decided by the mixer from (manifests, seed, schedule, step,
rank, world size) alone, so a resumed run asks for its next step and gets the bytes it would have had.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import Iterator, Protocol

import httpx
import numpy as np
import torch

from pipeline.dataset import TokenDataset, TokenSplit
from trainer.train_config import DataConfig


@dataclass
class TrainBatch:
    step: int
    tokens: torch.Tensor  # int64 (rows, seq_len + 1): inputs are [:, :-1], targets [:, 1:]
    sources: np.ndarray  # (rows,) index into the source's `names`


class BatchSource(Protocol):
    names: list[str]
    vocab_size: int
    seq_len: int
    global_batch: int

    def batches(self, start_step: int) -> Iterator[TrainBatch]: ...

    def validation_splits(self) -> dict[str, TokenSplit]: ...

    def close(self) -> None: ...


def _open_datasets(paths: dict[str, str]) -> dict[str, TokenDataset]:
    return {name: TokenDataset(path) for name, path in paths.items()}


class MixerSource:
    """Mixes `--dataset`s in this process at constant `--weights`; a thread keeps `prefetch` steps ready."""

    def __init__(self, config: DataConfig, rank: int, world_size: int, prefetch: int = 2):
        from service.mixer import Mixer, MixerConfig
        from service.mix_schedule import MixSchedule

        self.datasets = _open_datasets(config.datasets)
        self.mixer = Mixer(
            self.datasets,
            MixerConfig(seq_len=config.seq_len, global_batch=config.global_batch, seed=config.seed),
            MixSchedule.constant(config.weights),
        )
        self.names = list(self.mixer.names)
        self.vocab_size = self.mixer.vocab_size
        self.seq_len, self.global_batch = config.seq_len, config.global_batch
        self.rank, self.world_size, self.prefetch = rank, world_size, prefetch
        self._stop = threading.Event()

    def _make(self, step: int) -> TrainBatch:
        batch = self.mixer.batch(step, rank=self.rank, world_size=self.world_size)
        return TrainBatch(step, torch.from_numpy(np.asarray(batch.tokens, dtype=np.int64)), np.asarray(batch.sources))

    def batches(self, start_step: int) -> Iterator[TrainBatch]:
        ready: queue.Queue = queue.Queue(maxsize=self.prefetch)

        def produce() -> None:
            step = start_step
            while not self._stop.is_set():
                try:
                    item: TrainBatch | BaseException = self._make(step)
                except BaseException as e:  # handed to the loop, which raises it where it is seen
                    item = e
                while not self._stop.is_set():
                    try:
                        ready.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if isinstance(item, BaseException):
                    return
                step += 1

        threading.Thread(target=produce, name="mixer-prefetch", daemon=True).start()
        while True:
            item = ready.get()
            if isinstance(item, BaseException):
                raise item
            yield item

    def validation_splits(self) -> dict[str, TokenSplit]:
        return {name: dataset.val for name, dataset in self.datasets.items()}

    def close(self) -> None:
        self._stop.set()


class StreamSource:
    """Pulls this rank's rows from a mixer service; seq_len, batch size and vocabulary are the service's."""

    def __init__(self, config: DataConfig, rank: int, world_size: int):
        from service.client import StreamClient
        from service.tokens import read_token

        self.url, self.rank, self.world_size = config.stream_url.rstrip("/"), rank, world_size
        read_ahead = config.stream_read_ahead
        token = read_token(config.stream_token_file, "--stream-token-file")
        self._client_options = {"token": token}
        if read_ahead is not None:
            self._client_options.update(prefetch=read_ahead, range_steps=read_ahead)
        self._client_class = StreamClient
        self._client = None
        # Plain GET: a StreamClient would start prefetching steps before we know where to start.
        try:
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            response = httpx.get(f"{self.url}/v1/status", timeout=30.0, headers=headers)
            response.raise_for_status()
        except httpx.HTTPError as e:
            raise ConnectionError(f"--stream {self.url}: GET /v1/status failed ({e}); is the service up?") from e
        self.info = response.json()
        self.names = list(self.info["datasets"])
        self.vocab_size = int(self.info["vocab_size"])
        self.seq_len, self.global_batch = int(self.info["seq_len"]), int(self.info["global_batch"])

    def batches(self, start_step: int) -> Iterator[TrainBatch]:
        self._client = self._client_class(self.url, rank=self.rank, world_size=self.world_size, start_step=start_step,
                                          **self._client_options)
        expected = start_step
        for item in self._client:
            if item.step != expected:
                raise RuntimeError(f"{self.url}: the service sent step {item.step} where step {expected} was due")
            yield TrainBatch(item.step, item.tokens.long(), item.sources.numpy())
            expected += 1

    def validation_splits(self) -> dict[str, TokenSplit]:
        """The val splits of the service's datasets, opened from the paths it reports (a shared filesystem)."""
        paths = {name: entry["path"] for name, entry in self.info["datasets"].items()}
        return {name: dataset.val for name, dataset in _open_datasets(paths).items()}

    def close(self) -> None:
        if self._client is not None:
            self._client.close()


def open_source(config: DataConfig, rank: int, world_size: int) -> BatchSource:
    if config.stream_url:
        return StreamSource(config, rank, world_size)
    return MixerSource(config, rank, world_size)


def open_eval_splits(config: DataConfig, source: BatchSource) -> dict[str, TokenSplit]:
    """`--eval-dataset`s if given, else the val splits of the datasets being trained on."""
    if config.eval_datasets:
        return {name: dataset.val for name, dataset in _open_datasets(config.eval_datasets).items()}
    return source.validation_splits()
