"""A recipe's output in an object store (`output: s3://BUCKET/PREFIX` or `gs://...`): the job works in a
local working copy (`compute.work_dir`) and the store is the output of record.

`OutputStore` mirrors files of the working copy to the same relative paths under the prefix and back,
through `pipeline/storage.py` (pyarrow's S3 and GCS filesystems: the one object-store client of the data
path, with its credentials, endpoints, retries and errors). A file is uploaded only when it is new or
changed: the store keeps `store-index.json`, each uploaded file's size and sha256, and a file whose size
and sha256 (`recipe/hashing.py`, cached by mtime) match its entry, and whose object is there at that size,
is not sent again. So a rerun, or a step reused, costs a listing and no transfer.

What is mirrored when (the recipe's layout, `recipe/runner.py`): a step's outputs once its record is
written, then its record; a training run's folder and its service's state dir while it trains, each time
its trainer writes a checkpoint; at the end the model folder, the plots, report.md and the lock. Never the
service tokens (`secrets/`), nor local caches and half-written files.
"""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Callable, Iterable, Mapping

import pyarrow.fs as pafs
from tqdm import tqdm

from pipeline import storage
from pipeline.storage import Location, MissingObject, StorageError, parse_location
from recipe.errors import RecipeError
from recipe.hashing import file_hash

INDEX = "store-index.json"
TRANSFERS = 8  # objects in flight at once
BAR_BYTES = 64 << 20  # a transfer this large shows a progress bar
# Never sent: the service tokens, the records' hash cache (a local cache), half-written files.
NOT_SENT = ("secrets/", "steps/file-hashes.json")


def _sent(relative: str) -> bool:
    name = relative.rsplit("/", 1)[-1]
    return not (relative.startswith(NOT_SENT) or name.endswith((".partial", ".tmp")) or ".partial/" in relative)


class OutputStore:
    """The prefix `uri` as the output of record of the local folder `work`."""

    def __init__(self, uri: str, work: Path):
        try:
            self.root = parse_location(uri)
        except StorageError as e:
            raise RecipeError(f"output: {e}") from None
        if self.root.is_local:
            raise ValueError(f"{uri} is not in an object store")
        self.uri, self.work = uri, Path(work)
        self._index: dict[str, list] | None = None  # relative path -> [size, sha256] of what was uploaded
        self._lock = threading.Lock()  # a training run's mirror thread and the runner push in turn

    def _call(self, what, *args, missing: object = MissingObject):
        """A `pipeline.storage` operation; its StorageError becomes one line naming `output` (a missing
        object `missing`, when that is given)."""
        try:
            return what(*args)
        except MissingObject as e:
            if missing is MissingObject:
                raise RecipeError(f"output: {e.message}") from None
            return missing
        except StorageError as e:
            raise RecipeError(f"output: {e.message}") from None

    # -- what it holds

    def check_reachable(self) -> None:
        """The bucket exists and these credentials may list the prefix: before anything starts."""
        bucket = Location(self.root.scheme, self.root.path.split("/", 1)[0])
        info = self._call(storage.with_retries, bucket, "look up its bucket",
                          lambda: storage.filesystem(bucket).get_file_info(bucket.path))
        if info.type == pafs.FileType.NotFound:
            raise RecipeError(f"output: {self.uri}: the bucket {bucket.path!r} does not exist (or these credentials "
                              "cannot see it); create it, or fix the URI or the endpoint (AWS_ENDPOINT_URL)")
        self.listing()

    def listing(self, relative: str = "") -> dict[str, int]:
        """Every file of the working copy's under the prefix (or under `relative` in it): {path relative to
        the prefix: size}."""
        where = self.root.child(relative) if relative else self.root
        found = self._call(storage.list_files, where)
        found = {(f"{relative.rstrip('/')}/{k}" if relative else k): v for k, v in found.items()}
        return {k: v for k, v in found.items() if k != INDEX and _sent(k)}

    def read(self, relative: str) -> bytes | None:
        """An object's bytes, None when there is none."""
        return self._call(storage.read_bytes, self.root.child(relative), missing=None)

    def index(self) -> dict[str, list]:
        if self._index is None:
            held = self.read(INDEX)
            self._index = json.loads(held) if held else {}
        return self._index

    # -- down

    def download(self, objects: Mapping[str, int]) -> tuple[int, int]:
        """Each object ({path: size}, as `listing` gives) to the same path in the working copy; (files, bytes)
        fetched."""
        jobs = [(storage.download_file, (self.root.child(r), self.work / r), size) for r, size in objects.items()]
        self._transfer(jobs, "download")
        return len(jobs), sum(size for _, _, size in jobs)

    def differs(self, relative: str) -> bool:
        """Whether the working copy's file is missing or is not what the store holds (by the index)."""
        local = self.work / relative
        if not local.is_file():
            return True
        entry = self.index().get(relative)
        return entry is None or entry != [local.stat().st_size, file_hash(local)]

    # -- up

    def push(self, paths: Iterable[str | Path], mirror: bool = False) -> tuple[int, int]:
        """Upload the files of each path (a file or a folder of the working copy) that are new or changed;
        with `mirror`, delete the objects under a folder that the working copy no longer holds (a step
        rebuilt in place: never a mix of old and new files). (files, bytes) sent."""
        with self._lock:
            index, sent, gone = self.index(), {}, []
            for path in paths:
                path = Path(path)
                if not path.exists():
                    continue
                relative = path.relative_to(self.work).as_posix()
                local = ({relative: path} if path.is_file() else
                         {f.relative_to(self.work).as_posix(): f for f in sorted(path.rglob("*")) if f.is_file()})
                local = {r: f for r, f in local.items() if _sent(r)}
                there = ({relative: self._call(storage.file_size, self.root.child(relative))} if path.is_file()
                         else self.listing(relative))
                for r, f in local.items():
                    seen = [f.stat().st_size, file_hash(f)]
                    if index.get(r) != seen or there.get(r) != seen[0]:
                        sent[r] = (f, seen)
                if mirror and path.is_dir():
                    gone += sorted(set(there) - set(local))
            self._transfer([(storage.upload_file, (f, self.root.child(r)), seen[0]) for r, (f, seen) in sent.items()],
                           "upload")
            index.update({r: seen for r, (_, seen) in sent.items()})
            for r in gone:
                self._call(storage.delete_file, self.root.child(r))
                index.pop(r, None)
            if sent or gone:  # after the objects: an index entry never claims an object not sent
                self._call(storage.write_bytes, self.root.child(INDEX), json.dumps(index, indent=0).encode())
            return len(sent), sum(seen[0] for _, seen in sent.values())

    def _transfer(self, jobs: list[tuple[Callable, tuple, int]], what: str) -> None:
        """Each (a `pipeline.storage` transfer, its arguments, its bytes), `TRANSFERS` at a time; a bar when
        they are many bytes."""
        total = sum(size for _, _, size in jobs)
        with ThreadPoolExecutor(TRANSFERS) as pool, tqdm(total=total, desc=what, unit="B", unit_scale=True,
                                                         disable=total < BAR_BYTES, mininterval=1.0) as bar:
            sizes = {pool.submit(self._call, call, *args): size for call, args, size in jobs}
            for done in as_completed(sizes):
                done.result()  # the first failure stops the job (the pool finishes what is in flight)
                bar.update(sizes[done])
