"""The on-disk token dataset: writing shards, committing atomically, and reading them zero-copy.

Everything downstream of `pipeline.tokenize` (the mixer service, the trainer, the benchmarks) reads a
dataset only through `TokenDataset`. The layout is documented in `pipeline/FORMAT.md`; this module is
its single implementation. A dataset is a local folder or a prefix in an object store
(`s3://bucket/datasets/en`, see `pipeline.storage`); the shards of a remote one are read through a
bounded local cache (`pipeline.shard_cache`), and written there by the same commit rule: the manifest
last.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from pipeline.atomic_file import replace_folder, write_atomically
from pipeline import storage
from pipeline.errors import DatasetError
from pipeline.file_digest import sha256_file
from pipeline.shard_cache import CacheConfig, ShardCache, shared_cache


FORMAT_VERSION = "replaymix.tokens/2"
# Format 1 differs only in how the manifest records the tokenizer (a SentencePiece .model at the root).
READABLE_FORMATS = ("replaymix.tokens/1", FORMAT_VERSION)
MANIFEST_NAME = "manifest.json"
SPLITS = ("train", "val")
INDEX_DTYPE = np.dtype("<u8")


# The two token widths, on disk and on the wire alike: the one authority for how tokens are stored.
TOKEN_DTYPES = (np.dtype("<u2"), np.dtype("<u4"))


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits, else uint32: half the disk and page cache for vocabularies <= 65536."""
    return TOKEN_DTYPES[0] if vocab_size <= 1 << 16 else TOKEN_DTYPES[1]


@dataclass(frozen=True)
class TokenizerInfo:
    """What a dataset records of the tokenizer that made it; a copy of its files lives in the dataset.

    Written by `pipeline.tokenizer.load.TokenizerSpec.stage_copy`, the one place that knows the kinds.
    """

    kind: str  # "sentencepiece" (a .model file) or "huggingface" (a tokenizer folder)
    folder: str  # the copy's folder inside the dataset ("" in format 1: the .model at the root)
    files: dict[str, str]  # file name in `folder` -> sha256
    source_path: str  # where the tokenizer was read from when the dataset was made
    vocab_size: int
    eos_id: int
    bos_id: int  # -1 when the tokenizer has none
    add_bos: bool

    @classmethod
    def from_manifest(cls, entry: dict, format_version: str) -> "TokenizerInfo":
        if format_version == READABLE_FORMATS[0]:
            entry = dict(entry)
            files = {entry.pop("file"): entry.pop("sha256")}
            return cls(kind="sentencepiece", folder="", files=files, **entry)
        return cls(**entry)


@dataclass(frozen=True)
class ShardInfo:
    """One shard: `<name>.bin` holds the tokens, `<name>.idx` the document start offsets."""

    file: str
    index: str
    tokens: int
    documents: int
    sha256: str
    index_sha256: str


class _ShardFile:
    """One shard being written: tokens appended to `.bin`, offsets kept for `.idx`, sha256 on the fly."""

    def __init__(self, folder: Path, name: str, dtype: np.dtype):
        self.bin_path, self.idx_path = folder / f"{name}.bin", folder / f"{name}.idx"
        self.dtype = np.dtype(dtype)
        self.offsets = [0]
        self.digest = hashlib.sha256()
        self.out = open(self.bin_path, "wb")

    @property
    def tokens(self) -> int:
        return self.offsets[-1]

    def append(self, tokens: np.ndarray, lengths: Sequence[int]) -> None:
        """Append consecutive documents: `tokens` holds them back to back, `lengths` their sizes."""
        data = np.ascontiguousarray(tokens, dtype=self.dtype).tobytes()
        self.digest.update(data)
        self.out.write(data)
        self.offsets.extend((self.offsets[-1] + np.cumsum(lengths, dtype=np.int64)).tolist())

    def finish(self) -> ShardInfo:
        self.out.flush()
        os.fsync(self.out.fileno())
        self.out.close()
        index_bytes = np.asarray(self.offsets, dtype=INDEX_DTYPE).tobytes()
        with open(self.idx_path, "wb") as out:
            out.write(index_bytes)
            out.flush()
            os.fsync(out.fileno())
        return ShardInfo(
            file=self.bin_path.name,
            index=self.idx_path.name,
            tokens=self.offsets[-1],
            documents=len(self.offsets) - 1,
            sha256=self.digest.hexdigest(),
            index_sha256=hashlib.sha256(index_bytes).hexdigest(),
        )


def write_shard(folder: Path, name: str, documents: Iterable[np.ndarray], dtype: np.dtype) -> ShardInfo:
    """Write documents (token arrays, already ending in EOS) as one shard; return its manifest entry."""
    shard = _ShardFile(Path(folder), name, dtype)
    for doc in documents:
        shard.append(doc, [len(doc)])
    return shard.finish()


class ShardWriter:
    """Append documents in order to `<prefix>-00000`, `<prefix>-00001`, ... shards.

    A shard is closed at the first document boundary at or past `max_tokens`, so shard boundaries
    depend only on the document order and sizes (a document longer than `max_tokens` gets a shard to
    itself). No files are created until the first document arrives.
    """

    def __init__(self, folder: Path, prefix: str, dtype: np.dtype, max_tokens: int):
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        self.folder, self.prefix, self.dtype, self.max_tokens = Path(folder), prefix, dtype, max_tokens
        self.shards: list[ShardInfo] = []
        self._current: _ShardFile | None = None

    def add(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append consecutive documents (`tokens` back to back, `lengths` > 0 each), written a shard's
        worth at a time: one write and one hash update per shard touched, not one per document."""
        lengths = np.asarray(lengths, dtype=np.int64)
        ends = np.cumsum(lengths)  # where each document ends in `tokens`
        first = 0  # the first document not written yet
        while first < len(lengths):
            if self._current is None:
                self._current = _ShardFile(self.folder, f"{self.prefix}-{len(self.shards):05d}", self.dtype)
            written = int(ends[first - 1]) if first else 0
            # Documents up to and including the first that fills the shard to max_tokens go into it.
            room = self.max_tokens - self._current.tokens
            last = min(int(np.searchsorted(ends, written + room)), len(lengths) - 1)
            self._current.append(tokens[written : ends[last]], lengths[first : last + 1])
            first = last + 1
            if self._current.tokens >= self.max_tokens:
                self.shards.append(self._current.finish())
                self._current = None

    def close(self) -> list[ShardInfo]:
        """Finish the open shard; return every shard's manifest entry in order."""
        if self._current is not None:
            self.shards.append(self._current.finish())
            self._current = None
        return self.shards


def build_manifest(
    tokenizer: TokenizerInfo,
    shards: dict[str, Sequence[ShardInfo]],
    **fields: object,
) -> dict:
    """The manifest dict: tokenizer, per-split shard lists with totals, plus any extra fields
    (inputs, seed, val_fraction, stats) the writer wants to record."""
    splits = {}
    for split in SPLITS:
        entries = list(shards.get(split, []))
        splits[split] = {
            "tokens": sum(s.tokens for s in entries),
            "documents": sum(s.documents for s in entries),
            "shards": [asdict(s) for s in entries],
        }
    return {
        "format": FORMAT_VERSION,
        "dtype": token_dtype(tokenizer.vocab_size).name,
        "tokenizer": asdict(tokenizer),
        "splits": splits,
        **fields,
    }


# On a store, the marker of a dataset being written under its prefix: what lets the next run tell a killed
# run's leftovers (removed) from someone else's objects (never touched).
WRITING_MARKER = ".replaymix-writing"


@contextmanager
def staged_dataset(out: storage.Location) -> Iterator[Path]:
    """A fresh folder to build the dataset for `out` in, then handed to `commit_dataset`; removed however the
    job ends (after a commit it is gone already). For a local `out`, a folder beside it (so the commit is a
    rename) named by this process's id, so that the next job removes a killed one's leftovers; for a store,
    a local temporary folder (the upload at the commit is the store's staging)."""
    if out.is_local:
        folder = out.local_path
        for stale in folder.parent.glob(f".{folder.name}.staging-*"):
            pid = stale.name.rsplit("-", 1)[-1]
            if pid.isdigit() and not _pid_alive(int(pid)):
                shutil.rmtree(stale, ignore_errors=True)
        staging = folder.parent / f".{folder.name}.staging-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    else:
        staging = Path(tempfile.mkdtemp(prefix=f"replaymix-{out.name}.staging-"))
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def commit_dataset(staging: Path, out: str | os.PathLike, manifest: dict, overwrite: bool = False) -> None:
    """Make the finished `staging` folder the dataset at `out` (a folder, or s3:// / gs:// prefix),
    writing the manifest last: a dataset exists if and only if its manifest does, so a job killed
    before this point, or during it, leaves nothing that looks valid. An existing valid dataset is
    replaced only when `overwrite` is set.

    On local disk the manifest is written into the staging folder (fsync), which is then renamed onto
    `out`. A store has no rename: the marker `WRITING_MARKER` goes up first, then the old manifest goes
    (from here the old dataset no longer exists), every other object under the prefix is removed (the
    old dataset's, or a killed run's), the staged files are uploaded, the manifest last, and the marker
    is removed.
    """
    location = storage.parse_location(out)
    check_output(location, overwrite)
    manifest_text = json.dumps(manifest, indent=2, sort_keys=True)
    if location.is_local:
        write_atomically(Path(staging) / MANIFEST_NAME, manifest_text)
        replace_folder(staging, location.local_path)
        return
    staged = {str(p.relative_to(staging)): p for p in sorted(Path(staging).rglob("*")) if p.is_file()}
    storage.write_bytes(location.child(WRITING_MARKER), b"")
    storage.delete_file(location.child(MANIFEST_NAME))
    for name in storage.list_files(location):
        if name not in staged and name != WRITING_MARKER:
            storage.delete_file(location.child(name))
    for name, path in staged.items():
        storage.upload_file(path, location.child(name))
    storage.write_bytes(location.child(MANIFEST_NAME), manifest_text.encode("utf-8"))
    storage.delete_file(location.child(WRITING_MARKER))


def check_output(out: str | os.PathLike | storage.Location, overwrite: bool = False) -> None:
    """Refuse to replace a valid dataset without `overwrite`, and never replace anything else.

    A non-empty folder (or prefix) without a manifest is not ours (a killed job never leaves one at a
    local `out`, and on a store it leaves its marker), so it is left alone whatever `overwrite` says.
    """
    location = out if isinstance(out, storage.Location) else storage.parse_location(out)
    if location.is_local:
        check_output_folder(location.local_path, overwrite)
        return
    objects = storage.list_files(location)
    if MANIFEST_NAME in objects and not overwrite:
        raise DatasetError(f"{location.uri}: a dataset already exists here; pass --overwrite to replace it or "
                           "choose another --out")
    if objects and MANIFEST_NAME not in objects and WRITING_MARKER not in objects:
        raise DatasetError(
            f"{location.uri}: a prefix holding {len(objects)} objects that are not a dataset (no {MANIFEST_NAME}); "
            "it is not replaced even with --overwrite; choose another --out or empty it yourself"
        )


def check_output_folder(out: Path, overwrite: bool = False) -> None:
    """Refuse to replace a valid dataset without `overwrite`, and never replace anything else.

    A non-empty folder without a manifest is not ours (a killed job never leaves one at `out`, only in
    its staging folder), so it is left alone whatever `overwrite` says.
    """
    out = Path(out)
    if not out.exists():
        return
    if not out.is_dir():
        raise DatasetError(f"{out}: exists and is not a folder; choose another --out")
    if (out / MANIFEST_NAME).exists():
        if not overwrite:
            raise DatasetError(
                f"{out}: a dataset already exists here; pass --overwrite to replace it or choose another --out"
            )
    elif any(out.iterdir()):
        raise DatasetError(
            f"{out}: a non-empty folder that is not a dataset (no {MANIFEST_NAME}); it is not replaced even "
            "with --overwrite; choose another --out or empty it yourself"
        )


class _LocalFiles:
    """A local dataset's files: shards memory-mapped once, in place."""

    def __init__(self, root: Path):
        self.root = root
        self._maps: dict[str, np.ndarray] = {}

    def tokens(self, name: str, size: int, sha256: str, dtype: np.dtype) -> np.ndarray:
        if name not in self._maps:
            self._maps[name] = np.memmap(self.root / name, dtype=dtype, mode="r", shape=(size // dtype.itemsize,))
        return self._maps[name]

    def path(self, name: str, size: int, sha256: str) -> Path:
        return self.root / name


class _RemoteFiles:
    """A remote dataset's files, through the local shard cache: fetched on first use, sha256 checked."""

    def __init__(self, location: storage.Location, cache: ShardCache):
        self.location, self.cache = location, cache

    def tokens(self, name: str, size: int, sha256: str, dtype: np.dtype) -> np.ndarray:
        return self.cache.tokens(self.location.child(name), size, sha256, dtype)

    def path(self, name: str, size: int, sha256: str) -> Path:
        return self.cache.path(self.location.child(name), size, sha256)


class TokenSplit:
    """One split (train or val) of a dataset: its shards memory-mapped, addressed as one token stream."""

    def __init__(self, root: Path | str, shards: Sequence[dict], dtype: np.dtype,
                 files: _LocalFiles | _RemoteFiles | None = None):
        self.root = root
        self.dtype = dtype
        self.shards = [ShardInfo(**s) for s in shards]
        self._files = files or _LocalFiles(Path(root))
        self._starts = np.cumsum([0] + [s.tokens for s in self.shards], dtype=np.int64)

    @property
    def num_tokens(self) -> int:
        return int(self._starts[-1])

    @property
    def num_documents(self) -> int:
        return sum(s.documents for s in self.shards)

    def shard_tokens(self, i: int) -> np.ndarray:
        """Shard i's tokens, mapped (a remote shard is fetched into the cache by its first use)."""
        s = self.shards[i]
        if s.tokens == 0:
            return np.zeros(0, dtype=self.dtype)
        return self._files.tokens(s.file, s.tokens * self.dtype.itemsize, s.sha256, self.dtype)

    def document_offsets(self, i: int) -> np.ndarray:
        """Start offsets of shard i's documents within that shard, plus its token count at the end."""
        s = self.shards[i]
        size = (s.documents + 1) * INDEX_DTYPE.itemsize
        return np.fromfile(self._files.path(s.index, size, s.index_sha256), dtype=INDEX_DTYPE, count=s.documents + 1)

    def locate(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For token positions of the split's stream: the shard holding each (an empty shard never does),
        and the position's offset within that shard."""
        shard = np.searchsorted(self._starts, positions, side="right") - 1
        return shard, positions - self._starts[shard]

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) of the split's stream, crossing shard boundaries as needed."""
        if start < 0 or length < 0 or start + length > self.num_tokens:
            raise IndexError(f"tokens [{start}, {start + length}) outside the split's {self.num_tokens} tokens")
        if length == 0:
            return np.zeros(0, dtype=self.dtype)
        shard, offset = map(int, self.locate(np.int64(start)))
        first = self.shard_tokens(shard)[offset : offset + length]
        if len(first) == length:
            return first
        parts, remaining = [first], length - len(first)
        while remaining:
            shard += 1
            part = self.shard_tokens(shard)[:remaining]
            parts.append(part)
            remaining -= len(part)
        return np.concatenate(parts)

    def documents(self) -> Iterable[np.ndarray]:
        """Every document in order (views into the memory map)."""
        for i in range(len(self.shards)):
            offsets, tokens = self.document_offsets(i), self.shard_tokens(i)
            for a, b in zip(offsets[:-1], offsets[1:]):
                yield tokens[a:b]


class TokenDataset:
    """A dataset written by `pipeline.tokenize` (see FORMAT.md), opened read-only: a local folder, or a
    prefix in an object store (`s3://bucket/datasets/en`) whose shards come through a local cache.

    `verify="size"` (the default) checks that every file exists with the size the manifest gives;
    `verify="full"` also recomputes each local shard's sha256. Either raises `DatasetError` naming the
    file. A remote shard's sha256 is checked whenever it is fetched, whatever `verify` says, so "full"
    does not download a remote dataset up front. `cache` (default: `CacheConfig.default()`) is where
    remote shards are kept; every dataset opened with the same one shares its bound.
    """

    def __init__(self, path: str | os.PathLike, verify: str = "size", cache: CacheConfig | None = None):
        self.location = storage.parse_location(path)
        manifest_location = self.location.child(MANIFEST_NAME)
        if self.location.is_local:
            self.root: Path | str = Path(path)
            self._files: _LocalFiles | _RemoteFiles = _LocalFiles(self.root)
        else:
            self.root = self.location.uri
            self._files = _RemoteFiles(self.location, shared_cache(cache or CacheConfig.default()))
        try:
            self.manifest_bytes = storage.read_bytes(manifest_location)
        except (FileNotFoundError, NotADirectoryError, storage.MissingObject) as e:
            raise DatasetError(
                f"{manifest_location}: no manifest, so {self.root} is not a finished dataset "
                "(a job that did not complete leaves none); run `python -m pipeline.tokenize` to make it"
                + (f" ({e})" if isinstance(e, storage.MissingObject) and "bucket" in str(e) else "")
            ) from e
        try:
            self.manifest = json.loads(self.manifest_bytes)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DatasetError(f"{manifest_location}: not valid JSON ({e}); re-run the tokenize job") from e
        if self.manifest.get("format") not in READABLE_FORMATS:
            raise DatasetError(
                f"{manifest_location}: format {self.manifest.get('format')!r}, expected one of {READABLE_FORMATS}; "
                "re-run the tokenize job with this version of replaymix"
            )
        try:
            self.tokenizer = TokenizerInfo.from_manifest(self.manifest["tokenizer"], self.manifest["format"])
        except (KeyError, TypeError) as e:
            raise DatasetError(f"{manifest_location}: the tokenizer entry is malformed ({e}); re-run the tokenize job") from e
        self.dtype = np.dtype(self.manifest["dtype"]).newbyteorder("<")
        if verify != "none":
            self.verify(full=verify == "full")
        self.splits = {
            name: TokenSplit(self.root, self.manifest["splits"][name]["shards"], self.dtype, self._files)
            for name in SPLITS
        }

    @property
    def uri(self) -> str:
        """Where the dataset is: its absolute local path, or its URI."""
        return str(Path(self.root).resolve()) if self.location.is_local else self.location.uri

    @property
    def train(self) -> TokenSplit:
        return self.splits["train"]

    @property
    def val(self) -> TokenSplit:
        return self.splits["val"]

    @property
    def tokenizer_path(self) -> Path:
        """What `pipeline.tokenizer.load.load_tokenizer` opens: the .model file, or the tokenizer folder
        (of a remote dataset, a copy fetched into the cache, each file checked against its sha256)."""
        folder = self.root / self.tokenizer.folder if self.location.is_local else self._fetch_tokenizer()
        return folder / next(iter(self.tokenizer.files)) if self.tokenizer.kind == "sentencepiece" else folder

    def _fetch_tokenizer(self) -> Path:
        """The remote tokenizer copy as a local folder, named by its files' hashes (so shared and reused)."""
        key = hashlib.sha256(json.dumps(self.tokenizer.files, sort_keys=True).encode()).hexdigest()
        folder = self._files.cache.folder / "tokenizers" / key
        for name, sha256 in self.tokenizer.files.items():
            if (folder / name).is_file():
                continue
            location = self.location.child(*filter(None, [self.tokenizer.folder, name]))
            data = storage.read_bytes(location)
            if hashlib.sha256(data).hexdigest() != sha256:
                shutil.rmtree(folder, ignore_errors=True)
                raise DatasetError(f"{location.uri}: sha256 differs from the manifest; the dataset's tokenizer "
                                   "copy changed or is damaged; re-run the tokenize job")
            write_atomically(folder / name, data)
        return folder

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def verify(self, full: bool = False) -> None:
        """Check files against the manifest; raise DatasetError naming the first bad file. A remote
        dataset is listed once and its sizes checked; its sha256s are checked as shards are fetched."""
        sizes = self._file_sizes()
        for name, sha256 in self.tokenizer.files.items():  # the manifest records no size of these
            relative = f"{self.tokenizer.folder}/{name}" if self.tokenizer.folder else name
            self._verify_file(relative, None, sha256, full, sizes, what="tokenizer file")
        for split in SPLITS:
            entry = self.manifest["splits"][split]
            shards = entry["shards"]
            if sum(s["tokens"] for s in shards) != entry["tokens"]:
                raise DatasetError(
                    f"{self.location.child(MANIFEST_NAME)}: splits.{split}.tokens = {entry['tokens']} but its "
                    f"shards add up to {sum(s['tokens'] for s in shards)}; the manifest is inconsistent"
                )
            for s in shards:
                self._verify_file(s["file"], s["tokens"] * self.dtype.itemsize, s["sha256"], full, sizes)
                self._verify_file(
                    s["index"], (s["documents"] + 1) * INDEX_DTYPE.itemsize, s["index_sha256"], full, sizes
                )

    def _file_sizes(self):
        """name -> size (None when missing): a stat per local file, one listing of a remote prefix."""
        if self.location.is_local:
            return lambda name: (self.root / name).stat().st_size if (self.root / name).is_file() else None
        return storage.list_files(self.location).get

    def _verify_file(self, name: str, size: int | None, sha256: str, full: bool, sizes, what: str = "shard file") -> None:
        """One file against the manifest: there, of `size` bytes (None: not recorded), and with `full` (local
        files only) of its sha256."""
        path = self.location.child(name).uri
        actual = sizes(name)
        if actual is None:
            raise DatasetError(f"{path}: {what} missing; re-run the tokenize job")
        if size is not None and actual != size:
            raise DatasetError(
                f"{path}: {actual} bytes on disk but the manifest implies {size}; the {what} is truncated "
                "or the manifest is wrong; re-run the tokenize job"
            )
        if full and self.location.is_local and sha256_file(Path(path)) != sha256:
            raise DatasetError(f"{path}: sha256 differs from the manifest; the {what} is damaged")

    def __repr__(self) -> str:
        return (
            f"TokenDataset({str(self.root)!r}, train={self.train.num_tokens} tokens, "
            f"val={self.val.num_tokens} tokens, vocab={self.vocab_size})"
        )
