"""A deterministic sample of a corpus for tokenizer training, and a held-out slice for measuring it.

Every document gets a number in [0, 1) from a hash of its text. Documents below `holdout_fraction` are
held out (never trained on); of the rest, a hash-chosen share sized to `max_train_bytes` is the
training sample. The same text is therefore always in the same role, on any machine, with any number
of Ray workers, and a large corpus is thinned on the workers before anything reaches the driver.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import ray.data
from tqdm import tqdm

HOLDOUT_FRACTION = 0.05


def text_hash(text: str) -> float:
    """A stable number in [0, 1) for a document: where it falls decides its role."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64


def is_heldout(text: str, holdout_fraction: float = HOLDOUT_FRACTION) -> bool:
    """Whether a document belongs to the held-out slice (before any thinning for size)."""
    return text_hash(text) < holdout_fraction


def text_lines(text: str) -> Iterator[str]:
    """A document's non-blank lines: SentencePiece trains on lines, and encodes them fastest."""
    for line in text.split("\n"):
        line = line.rstrip("\r")
        if line.strip():
            yield line


@dataclass(frozen=True)
class TextSample:
    """Where the sample was written and what it holds."""

    train_file: Path
    heldout_file: Path
    corpus_documents: int
    corpus_bytes: int
    train_documents: int
    train_lines: int
    train_bytes: int
    heldout_documents: int
    heldout_lines: int
    heldout_bytes: int

    def summary(self) -> str:
        return (
            f"sampled {self.train_documents}/{self.corpus_documents} documents "
            f"({self.train_bytes / 1e6:.1f}/{self.corpus_bytes / 1e6:.1f} MB, {self.train_lines} lines) for training, "
            f"{self.heldout_documents} held out ({self.heldout_bytes / 1e6:.2f} MB)"
        )


def _roles(batch: dict, holdout_fraction: float, heldout_keep: float, train_keep: float) -> dict:
    """Per document its role (1 = training sample, 2 = held out, 0 = left out) and size; the text
    travels to the driver only for documents that have a role."""
    texts = batch["text"]
    u = np.array([text_hash(t) for t in texts], dtype=np.float64)
    heldout = u < holdout_fraction * heldout_keep
    train = (u >= holdout_fraction) & ((u - holdout_fraction) / (1 - holdout_fraction) < train_keep)
    role = np.where(heldout, 2, np.where(train, 1, 0)).astype(np.int8)
    return {
        "text": np.array([t if r else "" for t, r in zip(texts, role)], dtype=object),
        "role": role,
        "bytes": np.array([len(t.encode("utf-8")) for t in texts], dtype=np.int64),
    }


def sample_text(
    documents: ray.data.Dataset,
    folder: Path,
    max_train_bytes: int,
    max_heldout_bytes: int,
    estimated_bytes: int,
    holdout_fraction: float = HOLDOUT_FRACTION,
) -> TextSample:
    """Write `folder/train.txt` and `folder/heldout.txt` (one line per text line) from a dataset of
    rows with a `text` column, in one pass.

    `estimated_bytes` (say, the input files' size) sets how thinly to sample; the figures returned are
    counted exactly.
    """
    if not 0 < holdout_fraction < 1:
        raise ValueError(f"holdout_fraction must be in (0, 1), got {holdout_fraction}")
    heldout_keep = min(1.0, max_heldout_bytes / max(1.0, holdout_fraction * estimated_bytes))
    train_keep = min(1.0, max_train_bytes / max(1.0, (1 - holdout_fraction) * estimated_bytes))
    selected = documents.select_columns(["text"]).map_batches(
        _roles,
        batch_format="numpy",
        fn_kwargs=dict(holdout_fraction=holdout_fraction, heldout_keep=heldout_keep, train_keep=train_keep),
    )
    folder.mkdir(parents=True, exist_ok=True)
    counts = {0: [0, 0, 0], 1: [0, 0, 0], 2: [0, 0, 0]}  # role -> documents, lines, bytes
    corpus_bytes = 0
    train_file, heldout_file = folder / "train.txt", folder / "heldout.txt"
    # The bar is closed on an error too, so that the error starts a line of its own.
    with (
        open(train_file, "w", encoding="utf-8") as train,
        open(heldout_file, "w", encoding="utf-8") as held,
        tqdm(desc="sampling", unit="doc", mininterval=2) as progress,
    ):
        outputs = {1: train, 2: held}
        for batch in selected.iter_batches(batch_format="numpy", batch_size=1024):
            corpus_bytes += int(batch["bytes"].sum())
            for text, role in zip(batch["text"], batch["role"].tolist()):
                stats = counts[role]
                stats[0] += 1
                if role:
                    lines = list(text_lines(text))
                    outputs[role].writelines(line + "\n" for line in lines)
                    stats[1] += len(lines)
                    stats[2] += sum(len(line.encode("utf-8")) for line in lines)
            progress.update(len(batch["role"]))
    corpus_documents = sum(stats[0] for stats in counts.values())
    return TextSample(train_file, heldout_file, corpus_documents, corpus_bytes, *counts[1], *counts[2])


def read_lines(path: Path) -> list[str]:
    """Lines written by `sample_text`, without their newlines."""
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f]


def write_lines(path: Path, lines: Iterable[str]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(line + "\n" for line in lines)
