"""Which files input patterns name: paths, globs (`**` allowed) and folders on local disk, objects in a
store (`s3://bucket/raw/*.jsonl.zst`, `gs://...`, see `pipeline.storage`; a URI stays a string, never a
Path) and Hugging Face Hub datasets (`hf://`, see `pipeline.hf_inputs`), in a stable order, with one split
of a `datasets` DatasetDict folder. What is in them is `pipeline.readers`' business.
"""

from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from pipeline import storage
from pipeline.errors import PipelineError
from pipeline.hf_inputs import is_hub_input, open_hub_input

# Longest suffix first, so that "x.jsonl.gz" is JSONL-gzip and not an unknown ".gz".
FORMATS = {
    ".jsonl.gz": "jsonl.gz",
    ".jsonl.zst": "jsonl.zst",
    ".jsonl": "jsonl",
    ".parquet": "parquet",
    ".arrow": "arrow",  # what `datasets.Dataset.save_to_disk` writes
    ".txt": "txt",
}
# `datasets.DatasetDict.save_to_disk` writes this index ({"splits": [...]}) beside a folder per split.
DATASET_DICT_INDEX = "dataset_dict.json"


class InputError(PipelineError, ValueError):
    """An input file is missing, unreadable or malformed; the message names the file (and line or row)."""


# An input file: a local Path, or an object's URI (a string: a Path would turn s3://b/k into s3:/b/k).
InputFile = Path | str


def input_format(path: InputFile) -> str | None:
    """The reader format for a file name, or None when it is not a document file we read."""
    name = os.fspath(path).rstrip("/").rsplit("/", 1)[-1].lower()
    return next((fmt for suffix, fmt in FORMATS.items() if name.endswith(suffix)), None)


@dataclass(frozen=True)
class InputSelection:
    """The files that input patterns name, in order, and a line per pattern saying what it gave."""

    files: list[InputFile]
    read: list[str]
    split_used: bool  # whether some pattern was a DatasetDict folder whose split was chosen
    sizes: dict[str, int]  # str(file) -> bytes

    def size(self, file: InputFile) -> int:
        return self.sizes[str(file)]

    def describe(self, flag: str = "--input") -> str:
        return "\n".join(f"reading {flag} {line}" for line in self.read)


def select_inputs(patterns: Sequence[str], split: str | None = None, config: str | None = None) -> InputSelection:
    """Files named by paths, globs (`**` allowed) and folders (searched recursively), in a stable order.

    Folders and globs contribute only files with a known suffix (so a `save_to_disk` folder's JSON
    metadata is passed over), and of a `datasets` DatasetDict folder only the files of `split` (see
    `_take_split`); a file named directly must have a known suffix and is read whatever folder it is in.
    Raises InputError for a pattern that matches nothing and for an input that cannot be read: one left
    out instead would silently shrink the corpus.
    """
    if not patterns:
        raise InputError("no --input given; pass files, globs or folders of .jsonl/.parquet/.arrow/.txt")
    files: list[InputFile] = []
    read: list[str] = []
    sizes: dict[str, int] = {}
    split_used = False
    for pattern in patterns:
        named_directly = False
        if is_hub_input(pattern):  # a Hub dataset: one source naming its split (pipeline/hf_inputs.py)
            hub = open_hub_input(pattern, config, split)
            files.append(hub.source)
            sizes[hub.source] = 0  # unknown before reading; the job plans one read per shard instead
            split_used = split_used or split is not None
            read.append(f"{pattern}: split {hub.split!r}{f' of config {hub.config!r}' if hub.config else ''}, "
                        f"{hub.num_shards} shard{'s' if hub.num_shards != 1 else ''}, streamed with datasets")
            continue
        if storage.is_uri(pattern):
            found_sizes = _select_objects(pattern)
            files.extend(found_sizes)
            sizes.update(found_sizes)
            read.append(f"{pattern}: {len(found_sizes)} object{'s' if len(found_sizes) != 1 else ''}, "
                        f"{sum(found_sizes.values()) / 1e6:.1f} MB")
            continue
        if glob.has_magic(pattern):
            matches = [Path(p) for p in sorted(glob.glob(pattern, recursive=True))]
            found = [p for p in matches if input_format(p) and not p.is_dir()]
        elif Path(pattern).is_dir():
            found = sorted(p for p in Path(pattern).rglob("*") if input_format(p) and not p.is_dir())
        elif Path(pattern).exists() or Path(pattern).is_symlink():
            if input_format(Path(pattern)) is None:
                raise InputError(f"{pattern}: unsupported input format; expected one of {', '.join(FORMATS)}")
            found, named_directly = [Path(pattern)], True
        else:
            raise InputError(f"{pattern}: no such file or folder")
        if not found:
            raise InputError(
                f"{pattern}: matched no input files (looked for {', '.join(FORMATS)}); check the path or glob"
            )
        chosen: list[str] = []
        if not named_directly:
            found, chosen = _take_split(pattern, found, split)
            split_used = split_used or bool(chosen)
        for path in found:
            check_readable(path)
        found = [path.resolve() for path in found]
        files.extend(found)
        sizes.update((str(path), path.stat().st_size) for path in found)
        size = sum(sizes[str(path)] for path in found)
        read.append(f"{pattern}: {''.join(chosen)}{len(found)} file{'s' if len(found) != 1 else ''}, "
                    f"{size / 1e6:.1f} MB")
    return InputSelection(list(dict.fromkeys(files)), read, split_used, sizes)


def _select_objects(pattern: str) -> dict[str, int]:
    """The objects a URI names ({uri: size}, sorted): one object, a glob, or every input under a prefix."""
    location = storage.parse_location(pattern)
    if glob.has_magic(location.path):
        found = storage.glob_files(location)
    else:
        size = storage.file_size(location)
        if size is not None:
            if input_format(pattern) is None:
                raise InputError(f"{pattern}: unsupported input format; expected one of {', '.join(FORMATS)}")
            return {location.uri: size}
        found = {location.child(name).uri: size for name, size in storage.list_files(location).items()}
        if not found:
            raise InputError(f"{pattern}: no such object or prefix; check the bucket and path")
    found = {uri: size for uri, size in found.items() if input_format(uri)}
    if not found:
        raise InputError(f"{pattern}: matched no input objects (looked for {', '.join(FORMATS)}); check the URI")
    return found


def expand_inputs(patterns: Sequence[str], split: str | None = None) -> list[InputFile]:
    """The files of `select_inputs`."""
    return select_inputs(patterns, split).files


def dataset_dict_splits(folder: Path) -> list[str] | None:
    """The split names of a folder that `datasets.DatasetDict.save_to_disk` wrote, or None if it is not one."""
    index = folder / DATASET_DICT_INDEX
    if not index.is_file():
        return None
    try:
        splits = json.loads(index.read_text(encoding="utf-8"))["splits"]
        if not (isinstance(splits, list) and all(isinstance(name, str) for name in splits)):
            raise ValueError("'splits' is not a list of names")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InputError(f"{index}: not a DatasetDict index ({e}); it should hold {{\"splits\": [...]}}") from e
    return splits


def _take_split(pattern: str, found: list[Path], split: str | None) -> tuple[list[Path], list[str]]:
    """The files of a folder or glob, of each DatasetDict among them only those of `split`; and a note
    per DatasetDict of what was taken.

    A DatasetDict keeps its splits in folders (root/train/data-00000-of-00001.arrow, root/test/...);
    read as plain folders they would be merged into one corpus, test first. So a DatasetDict needs
    --split, and the split must be one of its own.
    """
    kept: list[Path] = []
    notes: dict[Path, str] = {}
    for path in found:
        root = path.parent.parent
        splits = dataset_dict_splits(root)
        if splits is None or path.parent.name not in splits:
            kept.append(path)
            continue
        if split is None:
            raise InputError(f"{pattern}: {root} is a datasets DatasetDict with splits {', '.join(splits)}; "
                             "choose one with --split NAME")
        if split not in splits:
            raise InputError(f"{pattern}: --split {split}: {root} has no such split (its splits: "
                             f"{', '.join(splits)}); choose one of them")
        notes[root] = f"split {split!r} of the DatasetDict {root} (splits: {', '.join(splits)}), "
        if path.parent.name == split:
            kept.append(path)
    return kept, list(notes.values())


def check_split_used(split: str | None, *selections: InputSelection) -> None:
    """Refuse a --split that chose nothing: none of the inputs was a DatasetDict folder."""
    if split is not None and not any(selection.split_used for selection in selections):
        raise InputError(f"--split {split}: no input is a datasets DatasetDict folder (one with "
                         f"{DATASET_DICT_INDEX}), so there is no split to choose; drop --split")


def check_readable(path: Path) -> None:
    """Raise InputError unless `path` is a regular file this process can open.

    Opening it asks exactly what a read task will ask, for this user (root included); a FIFO or device
    is refused first, since opening or reading one can block forever.
    """
    if path.is_symlink() and not path.exists():
        raise InputError(
            f"{path}: a symbolic link to {os.readlink(path)}, which does not exist; fix or remove the link"
        )
    if not path.is_file():
        raise InputError(f"{path}: not a regular file (a FIFO, socket or device); inputs must be files")
    try:
        with open(path, "rb"):
            pass
    except OSError as e:
        raise InputError(f"{path}: not readable ({e.strerror}); fix its permissions or drop it") from e
