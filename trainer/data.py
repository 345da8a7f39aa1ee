"""Batch sources: the in-process mixer or the mixer service, behind one interface.

Both hand the loop `service.wire.Batch`es (numpy) for consecutive steps from a start step, each holding
this rank's rows of that step; the loop makes tensors of them as it moves them to its device. Which rows a step holds is decided by the mixer from (manifests, seed, schedule, step,
rank, world size) alone, so a resumed run asks for its next step and gets the bytes it would have had.
"""

from __future__ import annotations

import queue
import threading
from typing import Iterator, Protocol

from pipeline.dataset import TokenDataset, TokenSplit
from pipeline.tokenizer.encoding_mix import warn_encoding_mixes
from service.wire import Batch
from trainer.train_config import DataConfig


class BatchSource(Protocol):
    names: list[str]
    vocab_size: int
    eos_id: int  # ends every document of every dataset (service/vocabulary.py): where documents start
    seq_len: int
    global_batch: int

    def batches(self, start_step: int) -> Iterator[Batch]: ...

    def validation_splits(self) -> dict[str, TokenSplit]: ...

    def report_losses(self, step: int, losses: dict[str, float]) -> None: ...

    def mix_changes(self) -> list[dict]: ...

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
        if rank == 0:  # a base-tokenized dataset beside its extension's: said once for the run, not per rank
            warn_encoding_mixes(self.datasets)
        self.names = list(self.mixer.names)
        self.vocab_size, self.eos_id = self.mixer.vocab_size, self.mixer.eos_id
        self.seq_len, self.global_batch = config.seq_len, config.global_batch
        self.rank, self.world_size, self.prefetch = rank, world_size, prefetch
        self.weights = {name: weight / sum(config.weights.values()) for name, weight in config.weights.items()}
        self._weights_told = False
        self._stop = threading.Event()

    def batches(self, start_step: int) -> Iterator[Batch]:
        ready: queue.Queue = queue.Queue(maxsize=self.prefetch)

        def produce() -> None:
            step = start_step
            while not self._stop.is_set():
                try:
                    item: Batch | BaseException = self.mixer.batch(step, rank=self.rank, world_size=self.world_size)
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

    def report_losses(self, step: int, losses: dict[str, float]) -> None:
        """Constant weights in-process: nobody steers them."""

    def mix_changes(self) -> list[dict]:
        """The mix's changes not returned before, as the service's log entries: in-process, the constant
        --weights, once."""
        told, self._weights_told = self._weights_told, True
        return [] if told else [{"op": "stage", "by": "--weights",
                                 "stage": {"start_step": 0, "weights": dict(self.weights)}}]

    def close(self) -> None:
        self._stop.set()


class StreamSource:
    """Pulls this rank's rows from a mixer service; seq_len, batch size and vocabulary are the service's."""

    def __init__(self, config: DataConfig, rank: int, world_size: int):
        from service.client import StreamClient
        from service.tokens import read_token

        options = {"token": read_token(config.stream_token_file, "--stream-token-file"),
                   "compute": config.stream_compute}
        if config.stream_read_ahead is not None:
            options.update(prefetch=config.stream_read_ahead, range_steps=config.stream_read_ahead)
        # Made now for the service's status; it fetches no batch before the first is taken.
        self._client = StreamClient(config.stream_url, rank=rank, world_size=world_size, **options)
        self.info = self._client.info
        self.names = list(self.info["datasets"])
        self.vocab_size, self.eos_id = int(self.info["vocab_size"]), int(self.info["eos_id"])
        self.seq_len, self.global_batch = int(self.info["seq_len"]), int(self.info["global_batch"])
        self._mix_seq = -1  # the last mix log entry mix_changes returned

    def batches(self, start_step: int) -> Iterator[Batch]:
        self._client.seek(start_step)
        return iter(self._client)

    def validation_splits(self) -> dict[str, TokenSplit]:
        """The val splits of the service's datasets, opened from the paths it reports (a shared filesystem)."""
        paths = {name: entry["path"] for name, entry in self.info["datasets"].items()}
        return {name: dataset.val for name, dataset in _open_datasets(paths).items()}

    def report_losses(self, step: int, losses: dict[str, float]) -> None:
        """The validation losses of the model after `step` updates, for the service's controller, when the
        service asks for them (only the sets named like its datasets mean anything to it)."""
        if self.info.get("feedback", {}).get("wanted"):
            known = {name: loss for name, loss in losses.items() if name in self.names}
            if known:
                self._client.send_feedback(step, known)

    def mix_changes(self) -> list[dict]:
        """The service's mix log entries (stages an operator or its controller added, with the reason;
        cancellations) not returned before, from GET /v1/mix."""
        log = self._client.mix()["log"]
        new = [entry for entry in log if entry["seq"] > self._mix_seq]
        self._mix_seq = max([self._mix_seq, *(entry["seq"] for entry in new)])
        return new

    def close(self) -> None:
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


def on_device(batches: Iterator[Batch], device: "torch.device", depth: int = 2) -> Iterator[tuple[Batch, "torch.Tensor"]]:
    """Each batch with its tokens as a tensor on `device`, the next `depth` made ready while a step runs.

    A thread takes batches from the source and turns them into tensors, in page-locked (pinned) memory on
    CUDA, so that the copy the loop issues with `non_blocking=True` goes by DMA while the GPU still computes
    the step before, and the loop's wait for data is the wait for a batch nobody had ready."""
    import torch

    pin = device.type == "cuda"
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def offer(item: object) -> bool:
        """Queue an item, waiting for room; False once the loop has stopped taking them."""
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for batch in batches:
                tokens = torch.from_numpy(batch.tokens)
                if not offer((batch, tokens.pin_memory() if pin else tokens)):
                    return
        except BaseException as e:  # handed to the loop, which raises it where it is seen
            offer(e)

    producer = threading.Thread(target=produce, name="device-prefetch", daemon=True)
    producer.start()
    try:
        while True:
            item = ready.get()
            if isinstance(item, BaseException):
                raise item
            batch, tokens = item
            yield batch, tokens.to(device, non_blocking=True)
    finally:
        stop.set()
        # Joined, not left running: a daemon thread inside a torch call while the interpreter shuts down
        # aborts the process ("terminate called without an active exception") after a finished run.
        producer.join(timeout=30)
