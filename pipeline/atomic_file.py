"""Atomic, durable file replacement: the one way replaymix writes a file that must never be half there.

A reader of `path` sees the old file or the new one, never a torn mix, and once a write returns the
new file survives a crash or power loss. Every step is needed for that:

1. write to a temporary file in the target's own folder (a rename is atomic only within one filesystem),
   named `.<name>.<pid>.<random>.tmp` so that globs and listings pass it over;
2. fsync the file, so its bytes reach the disk before its name does (otherwise a crash can leave the
   new name pointing at an empty or partial file);
3. `os.replace` it onto the target;
4. fsync the folder, so the rename itself is on disk (otherwise a crash can bring back the old file).

A write that fails leaves the target as it was and removes its temporary file.
"""

from __future__ import annotations

import os
import secrets
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator, Literal


def fsync_dir(path: str | Path) -> None:
    """Make the entries of folder `path` (new, renamed or removed names) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_writer(
    path: str | Path, mode: Literal["wb", "w"] = "wb", encoding: str | None = None
) -> Iterator[IO]:
    """A file object to stream the new content of `path` into; it replaces `path` when the block ends
    without an exception, and is discarded otherwise. The folder is created if missing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        # "x": a fresh file with the umask's permissions (mkstemp would make it private to its owner).
        with open(tmp, mode.replace("w", "x"), encoding=encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_atomically(path: str | Path, data: bytes | str) -> None:
    """Replace `path` with `data` (a str is written as UTF-8), atomically and durably."""
    with atomic_writer(path) as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)


def replace_folder(staging: str | Path, out: str | Path) -> None:
    """Move a finished `staging` folder onto `out`, replacing what is there, so that `out` is the old folder
    or the new one, never a half-deleted mix. `staging` must be on `out`'s filesystem for the rename to be
    atomic; it is copied there first when it is not (a temporary folder elsewhere)."""
    import shutil

    staging, out = Path(staging), Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if staging.parent.resolve() != out.parent.resolve():
        local = out.with_name(f".{out.name}.staging-{os.getpid()}")
        shutil.rmtree(local, ignore_errors=True)
        shutil.copytree(staging, local)
        staging = local
    if out.exists():
        trash = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, trash)
        os.replace(staging, out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(staging, out)
    fsync_dir(out.parent)
