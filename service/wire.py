"""A batch, the one type that carries one rank's rows of one step from the mixer to the trainer, and
its binary layout on the wire (`application/x-replaymix-batch`) and JSON form.

All integers little-endian. One body holds one rank's rows of one step:

    offset  size             field
    0       4                magic b"RMXB"
    4       2                version (1), uint16
    6       1                token width in bytes: 2 (vocab <= 65536) or 4, uint8 (pipeline.dataset.token_dtype)
    7       1                number of datasets N, uint8
    8       8                step, uint64
    16      4                rank, uint32
    20      4                world_size, uint32
    24      4                rows R, uint32
    28      4                row length L = seq_len + 1, uint32
    32      4                names length M in bytes, uint32
    36      M                the N dataset names, UTF-8, joined by "\\n"
    36+M    R                source of each row: index into the names, uint8
    36+M+R  R * L * width    tokens, row-major, uint16 or uint32

The header is 36 bytes; the rest is the payload at 2 bytes per token for vocabularies up to 65536.

A range response (`GET /v1/batches?start=S&count=N...`) is the N bodies of its steps, each exactly as
above, back to back in step order, with nothing between or around them. Each body's size follows from
its own header (36 + M + R + R * L * width), so a reader walks the range body by body; the total is
checked against the Content-Length. One request then carries N steps for one request's overhead.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from pipeline.dataset import TOKEN_DTYPES, token_dtype
from service.errors import ServiceError

MEDIA_TYPE = "application/x-replaymix-batch"
MAGIC = b"RMXB"
VERSION = 1
_HEADER = struct.Struct("<4sHBBQIIIII")
MAX_RANGE_STEPS = 1024  # steps one range request may ask for (the service refuses more)


class WireError(ServiceError, ValueError):
    """A body that is not a batch in this layout; the message says which field is wrong."""


@dataclass(frozen=True)
class Batch:
    """One rank's rows of one step, as numpy arrays; the trainer makes torch tensors of them on its device."""

    step: int
    rank: int
    world_size: int
    tokens: np.ndarray  # (rows, seq_len + 1), int64 unless asked otherwise: inputs [:, :-1], targets [:, 1:]
    sources: np.ndarray  # (rows,) uint8, index into dataset_names
    dataset_names: tuple[str, ...]


def _pieces(batch: Batch, dtype: np.dtype) -> list:
    names = "\n".join(batch.dataset_names).encode()
    rows, row_len = batch.tokens.shape
    header = _HEADER.pack(
        MAGIC, VERSION, dtype.itemsize, len(batch.dataset_names), batch.step, batch.rank, batch.world_size, rows,
        row_len, len(names)
    )
    tokens = np.ascontiguousarray(batch.tokens.astype(dtype, copy=False))
    sources = np.ascontiguousarray(batch.sources.astype(np.uint8, copy=False))
    return [header, names, memoryview(sources).cast("B"), memoryview(tokens).cast("B")]


def encode_batches(batches: Sequence[Batch], vocab_size: int) -> bytes:
    """The bodies of `batches` back to back (a range response), built with one copy of the tokens."""
    dtype = token_dtype(vocab_size)
    return b"".join(piece for batch in batches for piece in _pieces(batch, dtype))


def _decode_at(body: bytes | bytearray | memoryview, start: int) -> tuple[Batch, int]:
    """The batch whose body starts at byte `start`, and where the next one starts."""
    if len(body) - start < _HEADER.size:
        raise WireError(f"{len(body) - start} bytes at offset {start} are shorter than the {_HEADER.size}-byte header")
    magic, version, width, count, step, rank, world_size, rows, row_len, names_len = _HEADER.unpack_from(body, start)
    if magic != MAGIC or version != VERSION:
        raise WireError(
            f"magic/version {magic!r}/{version} at offset {start}; expected {MAGIC!r}/{VERSION}: not a replaymix batch"
        )
    widths = {dtype.itemsize: dtype for dtype in TOKEN_DTYPES}
    if width not in widths:
        raise WireError(f"token width {width} at offset {start}; expected one of {sorted(widths)}")
    start += _HEADER.size
    end = start + names_len + rows + rows * row_len * width
    if len(body) < end:
        raise WireError(f"body is {len(body)} bytes; the header of step {step} implies {end} (truncated transfer?)")
    names = tuple(bytes(body[start : start + names_len]).decode().split("\n")) if count else ()
    if len(names) != count:
        raise WireError(f"header of step {step} says {count} datasets but the names field holds {len(names)}")
    start += names_len
    sources = np.frombuffer(body, dtype=np.uint8, count=rows, offset=start)
    start += rows
    tokens = np.frombuffer(body, dtype=widths[width], count=rows * row_len, offset=start)
    batch = Batch(step, rank, world_size, tokens.reshape(rows, row_len).astype(np.int64), sources.copy(), names)
    return batch, end


def decode_batches(body: bytes | bytearray | memoryview) -> list[Batch]:
    """The Batches of a range body (or of a single-step body); tokens come back as int64."""
    batches, start = [], 0
    while start < len(body):
        batch, start = _decode_at(body, start)
        batches.append(batch)
    return batches


def decode_batch(body: bytes | bytearray | memoryview) -> Batch:
    """The Batch in a single-step body; tokens come back as int64 (what embedding lookups take)."""
    batch, end = _decode_at(body, 0)
    if end != len(body):
        raise WireError(f"body is {len(body)} bytes; the header implies {end}")
    return batch


def batch_to_json(batch: Batch) -> dict:
    return {
        "step": batch.step,
        "rank": batch.rank,
        "world_size": batch.world_size,
        "dataset_names": list(batch.dataset_names),
        "sources": batch.sources.tolist(),
        "tokens": batch.tokens.tolist(),
    }
