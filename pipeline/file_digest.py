"""The sha256 of a file: what a dataset's manifest records of each of its files, and what its readers
(`pipeline.dataset`, `pipeline.shard_cache`) and the tokenizer tools check against it."""

from __future__ import annotations

import hashlib
from pathlib import Path


def sha256_file(path: Path, chunk_bytes: int = 1 << 22) -> str:
    """The hex sha256 of the file at `path`, read in chunks of `chunk_bytes`."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()
