"""Content hashes: what a step's record pins its inputs by, and what an object-store output compares
its files by (`recipe/store.py`), so a rerun neither rebuilds nor uploads what did not change."""

from __future__ import annotations

import glob
import hashlib
from pathlib import Path

from pipeline.storage import is_uri


# Each file's sha256 by (path, size, mtime): a rerun does not read a model of many GB again to learn that
# it did not change. A file rewritten in place keeps neither its size and mtime both, in practice.
FILE_HASHES: dict[str, list] = {}


def file_hash(f: Path) -> str:
    """The sha256 of file `f`, read again only when its size or mtime changed."""
    stat = f.stat()
    key, seen = str(f.resolve()), FILE_HASHES.get(str(f.resolve()))
    if seen and seen[:2] == [stat.st_size, stat.st_mtime_ns]:
        return seen[2]
    digest = hashlib.sha256()
    with open(f, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    FILE_HASHES[key] = [stat.st_size, stat.st_mtime_ns, digest.hexdigest()]
    return digest.hexdigest()


def content_hash(path: str) -> str:
    """sha256 of a file; of a token dataset its manifest (which pins every shard); of a folder (or glob) its
    files' names and sha256s; a remote path is pinned by its URI (its dataset's manifest pins what was read)."""
    if is_uri(path):
        return f"uri:{path}"
    p = Path(path)
    if (p / "manifest.json").is_file():
        p = p / "manifest.json"
    if p.is_file():
        return file_hash(p)
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else sorted(Path(f) for f in glob.glob(path))
    digest = hashlib.sha256()
    for f in files:
        digest.update(f"{f.relative_to(p) if p.is_dir() else f.name}\0{file_hash(f)}\n".encode())
    return digest.hexdigest()
