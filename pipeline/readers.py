"""Input readers: the files `pipeline.input_selection` chose (JSONL, compressed JSONL, Parquet, Arrow, plain
text; local, in an object store or on the Hub) as a Ray Dataset, `read_documents`, with one row per document:

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
from pipeline.input_selection import InputError, InputFile, expand_inputs, input_format

DEFAULT_CHUNK_BYTES = 4 << 20
HUB_SHARD_BYTES = 64 << 20  # what a Hub dataset's shard (a file) is taken to hold when reads are grouped
SCHEMA = pa.schema(
    [("text", pa.string()), ("source", pa.string()), ("position", pa.int64()), ("replaced_utf8", pa.bool_())]
)


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
