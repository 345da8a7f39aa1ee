"""Input readers: raw corpora (JSONL, compressed JSONL, Parquet, Arrow, plain text) as a Ray Dataset.

`select_inputs` turns files, globs and folders into the files to read (taking one split of a `datasets`
DatasetDict folder), on local disk or in an object store (`s3://bucket/raw/*.jsonl.zst`, `gs://...`:
see `pipeline.storage`; a URI stays a string, never a Path), and `read_documents` turns them into a `ray.data.Dataset` with one row per document:

    text           str    the document, valid UTF-8 (invalid bytes replaced by U+FFFD)
    source         str    the file it came from
    position       int64  where in that file: byte offset of the line (.jsonl), line index
                          (.jsonl.gz/.jsonl.zst), row index (.parquet/.arrow), 0 (.txt)
    replaced_utf8  bool   whether invalid UTF-8 had to be replaced in this document

Reading is planned on the driver into units of about `chunk_bytes` (byte ranges of a JSONL file cut at
line ends, Parquet row groups, Arrow row ranges, whole compressed or text files). The units depend only
on the files, so with Ray Data's `preserve_order` the rows arrive in the same order on any cluster. A
plain JSONL range is parsed by Arrow's JSON reader in one call; a range holding anything that reader
would treat otherwise goes line by line, which names the file and line of any error.
"""

from __future__ import annotations

import functools
import glob
import gzip
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import pyarrow as pa
import pyarrow.json as pa_json
import pyarrow.parquet as pq
import ray.data
from ray.data import Datasource, ReadTask
from ray.data.block import BlockMetadata

from pipeline import storage
from pipeline.errors import PipelineError
from pipeline.hf_inputs import is_hub_input, open_hub_input, read_hub_shard

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
DEFAULT_CHUNK_BYTES = 4 << 20
HUB_SHARD_BYTES = 64 << 20  # what a Hub dataset's shard (a file) is taken to hold when reads are grouped
SCHEMA = pa.schema(
    [("text", pa.string()), ("source", pa.string()), ("position", pa.int64()), ("replaced_utf8", pa.bool_())]
)


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


@dataclass(frozen=True)
class ReadUnit:
    """A piece of one file that one read task handles: [start, stop) in the format's own units."""

    path: str
    format: str
    start: int  # byte offset (jsonl), row group (parquet), row (arrow); 0 otherwise
    stop: int
    size_bytes: int


def _open(path: InputFile):
    """A binary file object for a local path or an object's URI (buffered: seek, read, readline)."""
    if storage.is_uri(path):
        return storage.open_input(os.fspath(path))
    return open(path, "rb")


def plan_reads(files: Sequence[InputFile], chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> list[ReadUnit]:
    """Cut the files into units of about `chunk_bytes`, in file order. Opens each file's header only."""
    units: list[ReadUnit] = []
    for path in files:
        if is_hub_input(path):
            count = open_hub_input(path, None, None).num_shards
            units.extend(ReadUnit(path, "hf", shard, shard + 1, HUB_SHARD_BYTES) for shard in range(count))
            continue
        fmt = input_format(path)
        try:
            if fmt == "jsonl":
                units.extend(_plan_jsonl(path, chunk_bytes))
            elif fmt == "parquet":
                units.extend(_plan_parquet(path, chunk_bytes))
            elif fmt == "arrow":
                units.extend(_plan_arrow(path, chunk_bytes))
            else:
                size = _size(path)
                units.append(ReadUnit(str(path), fmt, 0, size, size))
        except (OSError, pa.ArrowException) as e:
            raise InputError(f"{path}: cannot read it as {fmt} ({e})") from e
    return units


def _size(path: InputFile) -> int:
    return storage.file_size(storage.parse_location(path)) if storage.is_uri(path) else Path(path).stat().st_size


def _plan_jsonl(path: InputFile, chunk_bytes: int) -> Iterator[ReadUnit]:
    size = _size(path)
    start = 0
    with _open(path) as f:
        while start < size:
            f.seek(min(start + chunk_bytes, size))
            f.readline()  # finish the line the cut landed in
            stop = min(max(f.tell(), start + 1), size)
            yield ReadUnit(str(path), "jsonl", start, stop, stop - start)
            start = stop


def _plan_parquet(path: InputFile, chunk_bytes: int) -> Iterator[ReadUnit]:
    with _open(path) as f:
        meta = pq.ParquetFile(f).metadata
    first, size = 0, 0
    for group in range(meta.num_row_groups):
        size += meta.row_group(group).total_byte_size
        if size >= chunk_bytes or group == meta.num_row_groups - 1:
            yield ReadUnit(str(path), "parquet", first, group + 1, size)
            first, size = group + 1, 0


def _open_arrow(path: InputFile) -> pa.Table:
    """A memory-mapped Arrow table (zero-copy; an object is read whole); `save_to_disk` writes the IPC
    stream format."""
    if storage.is_uri(path):
        source = pa.BufferReader(storage.read_bytes(storage.parse_location(path)))
    else:
        source = pa.memory_map(str(path))
    try:
        return pa.ipc.open_file(source).read_all()
    except pa.ArrowInvalid:
        source.seek(0)
        return pa.ipc.open_stream(source).read_all()


def _plan_arrow(path: InputFile, chunk_bytes: int) -> Iterator[ReadUnit]:
    table = _open_arrow(path)
    rows_per_unit = max(1, int(table.num_rows * chunk_bytes / max(table.nbytes, 1)))
    for start in range(0, table.num_rows, rows_per_unit):
        stop = min(start + rows_per_unit, table.num_rows)
        yield ReadUnit(str(path), "arrow", start, stop, table.nbytes * (stop - start) // table.num_rows)


def _decode(raw: bytes) -> tuple[str, bool]:
    """UTF-8 text, replacing invalid bytes with U+FFFD; the flag says whether any were replaced."""
    try:
        return raw.decode("utf-8"), False
    except UnicodeDecodeError:
        return raw.decode("utf-8", errors="replace"), True


def _valid_text(text: str) -> tuple[str, bool]:
    """JSON may escape lone surrogates (\\ud800) that no UTF-8 encoder accepts: replace them too."""
    try:
        text.encode("utf-8")
        return text, False
    except UnicodeEncodeError:
        return "".join("\ufffd" if "\ud800" <= c <= "\udfff" else c for c in text), True


def _line_number(path: str, offset: int) -> int:
    """1-based line number of a byte offset; only computed to report an error."""
    with _open(path) as f:
        return f.read(offset).count(b"\n") + 1


def _text_from_json(line: str, field: str, where: str) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        # Some of json's messages end in "at" already ("Unterminated string starting at").
        at = "" if e.msg.endswith(" at") else " at"
        raise InputError(f"{where}: not valid JSON ({e.msg}{at} column {e.colno}); fix or remove the line") from e
    if not isinstance(record, dict) or field not in record:
        keys = ", ".join(map(repr, record)) if isinstance(record, dict) else type(record).__name__
        raise InputError(f"{where}: no {field!r} field (found {keys}); choose the field with --text-field")
    text = record[field]
    if not isinstance(text, str):
        raise InputError(f"{where}: field {field!r} is {type(text).__name__}, expected a string")
    return text


def _jsonl_lines(data: bytes, start: int) -> Iterator[tuple[bytes, int]]:
    """The non-blank lines of a JSONL byte range that begins at file offset `start`, with their offsets."""
    offset = start
    for raw in data.split(b"\n"):
        if raw.strip():
            yield raw, offset
        offset += len(raw) + 1


def _jsonl_rows(data: bytes, unit: ReadUnit, field: str) -> Iterator[tuple[str, int, bool]]:
    """The line reader: the reference for what a JSONL range holds, and the one that names bad lines."""
    for raw, position in _jsonl_lines(data, unit.start):
        line, replaced = _decode(raw)
        try:
            text = _text_from_json(line, field, unit.path)
        except InputError as e:
            where = f"{unit.path}:{_line_number(unit.path, position)}"
            raise InputError(str(e).replace(unit.path, where, 1)) from None
        yield text, position, replaced


def _jsonl_table_at_once(data: bytes, unit: ReadUnit, field: str) -> pa.Table | None:
    """The range parsed by Arrow's JSON reader in one call, about 3x faster than the line reader.

    Returns None whenever the range holds anything the line reader treats specially or would report:
    invalid UTF-8 (replaced and counted there), a JSON error, a missing, null or non-string field,
    duplicate keys, an escaped lone surrogate, a byte order mark, a line holding other than one object,
    or no document at all. The line reader then reads it, so both give the same rows and errors.
    """
    if data.startswith(b"\xef\xbb\xbf") or b"\n\xef\xbb\xbf" in data:
        return None
    try:
        pa.array([data], pa.binary()).cast(pa.string())  # validates UTF-8; Arrow's JSON reader does not
        table = pa_json.read_json(
            pa.BufferReader(data),
            read_options=pa_json.ReadOptions(use_threads=False, block_size=len(data) + 1),
            parse_options=pa_json.ParseOptions(
                explicit_schema=pa.schema([(field, pa.string())]), unexpected_field_behavior="ignore"
            ),
        )
    except pa.ArrowInvalid:
        return None
    texts = table.column(field).combine_chunks()
    positions = [position for _, position in _jsonl_lines(data, unit.start)]
    if texts.null_count or len(texts) != len(positions):
        return None
    return pa.table(
        {
            "text": texts,
            "source": pa.repeat(pa.scalar(unit.path), len(texts)),
            "position": pa.array(positions, pa.int64()),
            "replaced_utf8": pa.repeat(pa.scalar(False), len(texts)),
        },
        schema=SCHEMA,
    )


def _read_jsonl_range(unit: ReadUnit, field: str) -> pa.Table:
    with _open(unit.path) as f:
        f.seek(unit.start)
        data = f.read(unit.stop - unit.start)
    table = _jsonl_table_at_once(data, unit, field)
    return table if table is not None else _rows_table(unit, _jsonl_rows(data, unit, field))


def _read_jsonl_stream(unit: ReadUnit, field: str) -> Iterator[tuple[str, int, bool]]:
    if unit.format == "jsonl.gz":
        stream = gzip.open(_open(unit.path), "rb")
    else:
        import zstandard

        stream = zstandard.ZstdDecompressor().stream_reader(_open(unit.path), closefd=True)
    with io.BufferedReader(stream) as lines:
        for index, raw in enumerate(lines):
            if not raw.strip():
                continue
            line, replaced = _decode(raw.rstrip(b"\r\n"))
            yield _text_from_json(line, field, f"{unit.path}:{index + 1}"), index, replaced


def _read_columnar(unit: ReadUnit, field: str) -> Iterator[tuple[str, int, bool]]:
    if unit.format == "parquet":
        parquet = pq.ParquetFile(_open(unit.path))
        first_row = sum(parquet.metadata.row_group(g).num_rows for g in range(unit.start))
        names = parquet.schema_arrow.names
        column = None if field not in names else parquet.read_row_groups(range(unit.start, unit.stop), [field])
    else:
        table = _open_arrow(unit.path)
        first_row, names = unit.start, table.column_names
        column = None if field not in names else table.select([field]).slice(unit.start, unit.stop - unit.start)
    if column is None:
        raise InputError(
            f"{unit.path}: no {field!r} column (columns: {', '.join(names)}); choose one with --text-field"
        )
    values = column.column(0)
    if not (pa.types.is_string(values.type) or pa.types.is_large_string(values.type)):
        raise InputError(f"{unit.path}: column {field!r} has type {values.type}, expected strings")
    # Arrow does not validate UTF-8 on read: take bytes and decode them ourselves.
    binary = values.cast(pa.large_binary() if pa.types.is_large_string(values.type) else pa.binary())
    for row, raw in enumerate(binary.to_pylist()):
        if raw is None:
            raise InputError(f"{unit.path}: row {first_row + row} has a null {field!r}; drop or fill it")
        text, replaced = _decode(raw)
        yield text, first_row + row, replaced


def _read_text_file(unit: ReadUnit, field: str) -> Iterator[tuple[str, int, bool]]:
    with _open(unit.path) as f:
        text, replaced = _decode(f.read())
    yield text, 0, replaced


def _rows_table(unit: ReadUnit, rows: Iterator[tuple[str, int, bool]]) -> pa.Table:
    """A table with SCHEMA from a reader's (text, position, replaced) rows; lone surrogates replaced."""
    texts, positions, replaced = [], [], []
    for text, position, bad_bytes in rows:
        text, bad_surrogates = _valid_text(text)
        texts.append(text)
        positions.append(position)
        replaced.append(bad_bytes or bad_surrogates)
    return pa.table(
        {"text": texts, "source": [unit.path] * len(texts), "position": positions, "replaced_utf8": replaced},
        schema=SCHEMA,
    )


def _read_hub(unit: ReadUnit, field: str) -> Iterator[tuple[str, int, bool]]:
    return read_hub_shard(unit.path, unit.start, field)


def _by_row(read_rows):
    """A table reader from a reader of (text, position, replaced) rows."""
    return lambda unit, field: _rows_table(unit, read_rows(unit, field))


READERS = {
    "jsonl": _read_jsonl_range,
    "jsonl.gz": _by_row(_read_jsonl_stream),
    "jsonl.zst": _by_row(_read_jsonl_stream),
    "parquet": _by_row(_read_columnar),
    "arrow": _by_row(_read_columnar),
    "txt": _by_row(_read_text_file),
    "hf": _by_row(_read_hub),
}


def read_unit(unit: ReadUnit, text_field: str) -> pa.Table:
    """One unit's documents as a table with SCHEMA; InputError names the file on any failure."""
    try:
        return READERS[unit.format](unit, text_field)
    except PipelineError:  # already names the input (an InputError, a store's or the Hub's error)
        raise
    except (OSError, EOFError, pa.ArrowException, ValueError) as e:
        # Damaged archives (bad gzip/zstd data, truncated files) and I/O errors surface here.
        raise InputError(f"{unit.path}: cannot read it as {unit.format} ({type(e).__name__}: {e})") from e


def _read_units(units: Sequence[ReadUnit], text_field: str) -> Iterator[pa.Table]:
    for unit in units:
        yield read_unit(unit, text_field)


class DocumentDatasource(Datasource):
    """A Ray Data source with one read task per group of units (about `chunk_bytes` each)."""

    def __init__(self, units: Sequence[ReadUnit], text_field: str, chunk_bytes: int):
        self._text_field = text_field
        self._groups: list[list[ReadUnit]] = []
        size = chunk_bytes
        for unit in units:  # pack small units (e.g. many .txt files) together, keeping their order
            if size + unit.size_bytes > chunk_bytes:
                self._groups.append([])
                size = 0
            self._groups[-1].append(unit)
            size += unit.size_bytes

    @property
    def num_tasks(self) -> int:
        return len(self._groups)

    def estimate_inmemory_data_size(self) -> int:
        return sum(u.size_bytes for group in self._groups for u in group)

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None, data_context=None):
        return [
            ReadTask(
                functools.partial(_read_units, group, self._text_field),
                BlockMetadata(
                    num_rows=None,
                    size_bytes=sum(u.size_bytes for u in group),
                    input_files=tuple(dict.fromkeys(u.path for u in group)),
                    exec_stats=None,
                ),
                schema=SCHEMA,
            )
            for group in self._groups
        ]


def read_documents(
    inputs: Sequence[str],
    text_field: str = "text",
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    num_cpus: float | None = None,
    concurrency: int | None = None,
) -> ray.data.Dataset:
    """The documents of every input as a Ray Dataset (columns: see the module docstring).

    Files are checked and planned here, on the driver, so a missing or unreadable file fails before any
    work starts; malformed content (bad JSON, missing field) fails in the read task naming file and line.
    `num_cpus` is what each read task asks Ray for (default 1); a job that runs heavier stages beside the
    reads gives them less so that both fit. `concurrency` caps the read tasks running at once; a map
    stage with the same cap fuses with the reads (one task reads and transforms each block).
    """
    units = plan_reads(expand_inputs(inputs), chunk_bytes)
    source = DocumentDatasource(units, text_field, chunk_bytes)
    remote = any(storage.is_uri(unit.path) for unit in units)  # hf:// too: its token, endpoint, offline mode
    runtime_env: dict = {"env_vars": storage.store_environment()}
    if any(is_hub_input(unit.path) for unit in units):
        # Reading text needs no torch, which `datasets` would otherwise import in every read worker.
        # (A task-level runtime_env cannot pre-import `datasets`: Ray honours `worker_process_setup_hook`
        # only in ray.init's. How its import is kept whole: `pipeline.hf_inputs._interrupts_deferred`.)
        runtime_env["env_vars"]["USE_TORCH"] = "0"
    return ray.data.read_datasource(
        source, override_num_blocks=max(1, source.num_tasks), num_cpus=num_cpus, concurrency=concurrency,
        runtime_env=runtime_env if remote else None,
    )
