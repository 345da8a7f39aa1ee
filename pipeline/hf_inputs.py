"""Hugging Face Hub datasets as inputs: `--input hf://datasets/ORG/NAME`, read through `datasets`.

So a replay set can be drawn from the original pretraining corpus (a FineWeb or Dolma sample) without a
manual download. `datasets.load_dataset(ORG/NAME, name=--config, streaming=True)` opens it, streaming
(rows come as the files are read, nothing is copied to disk first); a dataset that cannot stream is
loaded whole and read as an iterable. `--split` chooses the split, and is needed when there are several:
splits are never merged. A local folder at the relative path ORG/NAME is loaded instead of the Hub's
repository, as `datasets` itself does; `HF_TOKEN`, `HF_ENDPOINT` and `HF_HUB_OFFLINE` are honoured by it.

The driver opens the dataset once to choose the split and count its shards (its files); each read task
reads one shard, in order (`IterableDataset.shard(n, i)`, contiguous), so the documents arrive in the
dataset's own order on any cluster. An input is named by a source string that carries the choice:
`hf://datasets/ORG/NAME?config=C&split=S`, recorded as such in the manifest's inputs.
"""

from __future__ import annotations

import contextlib
import functools
import signal
import threading
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Iterator
from urllib.parse import parse_qsl, urlencode

from pipeline.errors import PipelineError

HUB_PREFIX = "hf://datasets/"


class HubInputError(PipelineError, ValueError):
    """A Hub dataset input cannot be opened or read as asked; the message names it and what to do."""


def is_hub_input(path: str) -> bool:
    return str(path).startswith("hf://")


@dataclass(frozen=True)
class HubInput:
    """One split of a Hub dataset, as read: its repository, configuration, split and shard count."""

    repo: str
    config: str | None
    split: str
    num_shards: int
    folder: str | None = None  # the local folder `datasets` found at the relative path ORG/NAME, absolute

    @property
    def source(self) -> str:
        """The input's name in rows and the manifest; it carries the choice to every read task (whose
        working directory may differ, hence the absolute folder)."""
        options = (("config", self.config), ("split", self.split), ("folder", self.folder))
        return f"{HUB_PREFIX}{self.repo}?{urlencode([(k, v) for k, v in options if v is not None], safe='/')}"

    @classmethod
    def from_source(cls, source: str) -> "HubInput":
        repo, _, query = source[len(HUB_PREFIX):].partition("?")
        options = dict(parse_qsl(query))
        return cls(repo, options.get("config"), options["split"], 0, options.get("folder"))


def _repo(uri: str) -> str:
    if not uri.startswith(HUB_PREFIX) or uri[len(HUB_PREFIX):].strip("/").count("/") != 1:
        raise HubInputError(f"{uri}: a Hub dataset input is hf://datasets/ORG/NAME (e.g. "
                            "hf://datasets/HuggingFaceFW/fineweb-edu); choose the subset with --config")
    return uri[len(HUB_PREFIX):].strip("/")


_LOAD_LOCK = threading.Lock()


@contextlib.contextmanager
def _interrupts_deferred() -> Iterator[None]:
    """Hold back a KeyboardInterrupt that arrives in the block, and raise it once the block is done.

    Ray cancels a running task by interrupting the worker's main thread (`_thread.interrupt_main`,
    a simulated SIGINT), and Ray Data cancels every sibling read task as soon as one fails. A sibling
    interrupted inside its first `import datasets` leaves the package's finished submodules in
    sys.modules without the package itself; the worker is then reused by the next job, whose import
    re-runs `datasets/__init__` against those leftovers and stops with "partially initialized module
    'datasets' has no attribute 'utils'" (it cannot simply be imported again either: the first attempt
    already registered its Arrow extension types). Finishing the import, then honouring the
    cancellation, keeps every worker clean. Signal handlers belong to the main thread, where Ray runs
    tasks; elsewhere the block runs as it is.
    """
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) is None:
        yield  # (None: a handler set outside Python, which could not be put back)
        return
    pending: list[tuple[int, FrameType | None]] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: pending.append((signum, frame)))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if pending:
            if callable(previous):
                previous(*pending[0])  # Ray's own handler, or Python's default: raises KeyboardInterrupt
            elif previous == signal.SIG_DFL:
                raise KeyboardInterrupt


def _load(repo: str, config: str | None):
    """The dataset's splits as a dict of iterable datasets: streamed where it can be, else loaded.

    One load at a time per process (Ray Data may run reads in threads, and an import must not run twice
    at once), and never cut short by a cancellation: see `_interrupts_deferred`. The first load imports
    `datasets` and everything it needs to read, so later reads import nothing."""
    with _LOAD_LOCK, _interrupts_deferred():
        return _load_once(repo, config)


@functools.lru_cache(maxsize=8)
def _load_once(repo: str, config: str | None):
    import datasets

    try:
        try:
            return datasets.load_dataset(repo, name=config, streaming=True)
        except NotImplementedError:  # a format that cannot stream: load it, then read it as an iterable
            loaded = datasets.load_dataset(repo, name=config)
            return {split: ds.to_iterable_dataset() for split, ds in loaded.items()}
    except (FileNotFoundError, ValueError, ConnectionError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise HubInputError(f"{HUB_PREFIX}{repo}: cannot open it with datasets ({first}); check the name and "
                            "--config, and HF_TOKEN for a gated dataset") from e


def open_hub_input(uri: str, config: str | None, split: str | None) -> HubInput:
    """Choose the split (required when there are several) and count its shards. `uri` may also be a
    `HubInput.source`, whose choice of config and split it keeps."""
    folder = None
    if "?" in uri:
        chosen = HubInput.from_source(uri)
        uri, config, split, folder = f"{HUB_PREFIX}{chosen.repo}", chosen.config, chosen.split, chosen.folder
    repo = _repo(uri)
    if folder is None and Path(repo).is_dir():
        folder = str(Path(repo).resolve())
    splits = _load(folder or repo, config)
    names = list(splits)
    if split is None:
        if len(names) != 1:
            raise HubInputError(f"{uri}: has splits {', '.join(names)}; choose one with --split NAME "
                                "(splits are never merged)")
        split = names[0]
    if split not in splits:
        raise HubInputError(f"{uri}: --split {split}: no such split (its splits: {', '.join(names)})")
    return HubInput(repo, config, split, max(1, splits[split].num_shards), folder)


def read_hub_shard(source: str, shard: int, text_field: str) -> Iterator[tuple[str, int, bool]]:
    """(text, row within the shard, False) of one shard of the split, in order. The shard count is the
    dataset's own (its files), the same here as on the driver that planned the reads."""
    hub = HubInput.from_source(source)
    dataset = _load(hub.folder or hub.repo, hub.config)[hub.split]
    num_shards = max(1, dataset.num_shards)
    columns = dataset.column_names
    if columns is not None and text_field not in columns:
        raise HubInputError(f"{source}: no {text_field!r} column (columns: {', '.join(columns)}); choose one "
                            "with --text-field")
    part = dataset.shard(num_shards, shard, contiguous=True) if num_shards > 1 else dataset
    for row, record in enumerate(part.select_columns([text_field])):
        text = record[text_field]
        if not isinstance(text, str):
            raise HubInputError(f"{source}: shard {shard}, row {row}: {text_field!r} is "
                                f"{type(text).__name__}, expected a string")
        yield text, row, False
