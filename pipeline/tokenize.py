"""The preprocessing job: raw corpora -> a packed, sharded, memory-mappable token dataset.

    python -m pipeline.tokenize --input data/en.jsonl --tokenizer tok.model --out datasets/en

The same command runs under `ray job submit --working-dir . -- python -m pipeline.tokenize ...`
(with absolute paths on storage every node mounts; see README.md, "On your own Ray cluster").
Ray Data runs one stage: each task reads its share of the input (`pipeline.readers`; up to 64 MiB) and
encodes it in one batched call (the tokenizer is loaded once per worker process): SentencePiece for a
`.model`, the Rust `tokenizers` library for a Hugging Face tokenizer folder (`pipeline.tokenizer.load`),
returning the block's tokens as one flat Arrow array with per-document offsets. Ray Data's
`preserve_order` hands the blocks to the driver in input order, and the driver writes them as shards
(`pipeline.dataset.ShardWriter`), cut by token count: the same inputs, tokenizer and seed give
byte-identical shards on any number of workers or blocks. Only the driver touches `--out`, so a cluster
needs no shared output storage. The dataset is built in a staging folder and renamed into place with its
manifest (`pipeline.dataset.staged_dataset`, `commit_dataset`: whole or absent).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import itertools
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2
from tqdm import tqdm

from pipeline import storage
from pipeline.dataset import ShardWriter, build_manifest, check_output, commit_dataset, staged_dataset, token_dtype
from pipeline.command import add_input_flags, add_ray_flags, new_parser, run_command
from pipeline.ray_runtime import init_ray
from pipeline.input_selection import InputError, check_split_used, select_inputs
from pipeline.readers import read_documents
from pipeline.tokenizer.files import fetch as fetch_tokenizer
from pipeline.tokenizer.load import SENTENCEPIECE, TokenizerSpec, load_tokenizer, make_encoder

# Blocks of at least 1 MiB and at most 64 MiB; see `_block_bytes`.
MIN_BLOCK_BYTES, MAX_BLOCK_BYTES = 1 << 20, 64 << 20
# SentencePiece BPE encodes one long string much slower than the same text in lines (German man pages,
# BPE 8k: 3.0 MB/s whole, 3.6-4.0 MB/s cut), and per-call overhead dominates for tiny strings: documents
# are cut at newlines into parts of about this many bytes where that gives the same ids (see
# `newlines_split_words`).
PART_BYTES = 2000


@dataclass
class TokenizeConfig:
    inputs: list[str]
    tokenizer: str | Path  # a .model or a tokenizer folder, local or in a store
    out: str  # a folder, or an s3:// / gs:// prefix (a string: a Path would break the URI)
    text_field: str = "text"
    split: str | None = None  # of a `datasets` DatasetDict input or an hf:// dataset
    config: str | None = None  # of an hf:// dataset
    val_fraction: float = 0.005
    seed: int = 0
    shard_tokens: int = 1 << 26  # 128 MiB shards at uint16
    chunk_bytes: int | None = None  # input per read+encode task; default: one block per worker
    batch_size: int | None = None  # documents per encode call; default: a whole block
    workers: int | None = None  # concurrent read+encode tasks; default: the cluster's CPUs
    address: str | None = None
    num_cpus: int | None = None  # CPUs of an embedded local Ray
    overwrite: bool = False


@dataclass
class TokenizeStats:
    documents: int = 0  # written, train + val
    train_documents: int = 0
    val_documents: int = 0
    tokens: int = 0
    text_bytes: int = 0  # UTF-8 bytes of the written documents' text
    skipped_empty: int = 0
    replaced_utf8: int = 0  # documents in which invalid UTF-8 was replaced by U+FFFD
    shards: int = 0
    seconds: float = 0.0  # wall time after Ray start-up; not recorded in the manifest

    @property
    def bytes_per_token(self) -> float:
        return self.text_bytes / max(self.tokens, 1)

    @property
    def mb_per_s(self) -> float:
        return self.text_bytes / 1e6 / max(self.seconds, 1e-9)

    def summary(self) -> str:
        return (
            f"tokenized {self.documents} documents ({self.train_documents} train, {self.val_documents} val) "
            f"into {self.tokens} tokens in {self.shards} shards; skipped {self.skipped_empty} empty; "
            f"replaced invalid UTF-8 in {self.replaced_utf8}; {self.bytes_per_token:.2f} bytes/token; "
            f"{self.text_bytes / 1e6:.1f} MB in {self.seconds:.1f} s = {self.mb_per_s:.2f} MB/s"
        )

    def empty_validation_warning(self, val_fraction: float) -> str | None:
        """A warning when --val-fraction held out no document: a trainer would have nothing to evaluate
        on (its default evaluation set is each dataset's val split)."""
        if self.val_documents or not self.documents or val_fraction == 0:
            return None
        # About 10 documents make a usable, if noisy, validation split.
        suggested = min(0.5, 10 / self.documents)
        return (
            f"warning: the validation split is empty: --val-fraction {val_fraction} of {self.documents} documents "
            f"held out none (about {val_fraction * self.documents:.1f} expected); pass --val-fraction "
            f"{suggested:.2g} or more to hold out about 10, or give the trainer another --eval-dataset"
        )


def is_validation(text: bytes, seed: int, val_fraction: float) -> bool:
    """A document is held out when a seeded hash of its text falls below `val_fraction`.

    Depending on the text alone keeps the split stable when inputs are appended or reordered, and puts
    exact duplicates on the same side.
    """
    digest = hashlib.blake2b(text, digest_size=8, key=seed.to_bytes(8, "little", signed=True)).digest()
    return int.from_bytes(digest, "little") < val_fraction * 2.0**64


@dataclass(frozen=True)
class EncodeSettings:
    """What an encode task needs; frozen (hashable) so that a worker process loads the tokenizer once."""

    kind: str  # pipeline.tokenizer.load's SENTENCEPIECE or HUGGINGFACE
    encoder_data: bytes  # the model proto, or the tokenizer.json text
    bos_id: int
    add_bos: bool
    eos_id: int
    dtype: str
    seed: int
    val_fraction: float


def newlines_split_words(model_proto: bytes) -> bool:
    """Whether encoding a document in parts cut at newlines gives exactly the ids of encoding it whole.

    It does for a BPE model when a newline normalizes to a space that is collapsed, every part gets the
    dummy prefix "▁" that the newline would have become, and no piece holds "▁" or a newline after its
    first character: then no merge crosses a "▁", and each word's merges happen in the same order either
    way. Unigram models are encoded whole: Viterbi adds float scores along the whole document, so cutting
    flips near-ties (measured: 27 of 1472 German man pages came out differently, same token count), and
    they gain nothing from it. A probe string checks the conclusion on the model itself.
    """
    model = sentencepiece_model_pb2.ModelProto()
    model.ParseFromString(model_proto)
    normalizer, trainer = model.normalizer_spec, model.trainer_spec
    if not (trainer.model_type == trainer.BPE and trainer.split_by_whitespace and not trainer.treat_whitespace_as_suffix
            and normalizer.add_dummy_prefix and normalizer.remove_extra_whitespaces):
        return False
    if any("\u2581" in p.piece[1:] or "\n" in p.piece for p in model.pieces):
        return False
    processor = spm.SentencePieceProcessor(model_proto=model_proto)
    if processor.normalize("a\nb") != processor.normalize("a b"):
        return False
    probe = "Der Befehl\n  liest  \n\nseine\r\nEingabe.\n"
    return processor.encode(probe) == sum(processor.encode(probe.split("\n")), [])


def cut_at_newlines(text: bytes, part_bytes: int) -> list[bytes]:
    """UTF-8 `text` in consecutive parts of at least `part_bytes` bytes (the last may be shorter), each
    cut at a newline, which is dropped. A newline byte is never inside a multi-byte character."""
    parts, start = [], 0
    while len(text) - start > part_bytes:
        cut = text.find(b"\n", start + part_bytes)
        if cut < 0:
            break
        parts.append(text[start:cut])
        start = cut + 1
    parts.append(text[start:])
    return parts


class DocumentEncoder:
    """Encodes a block of documents into one flat token array with per-document offsets."""

    def __init__(self, settings: EncodeSettings):
        self.settings = settings
        self.dtype = np.dtype(settings.dtype)
        if settings.kind == SENTENCEPIECE:
            self.processor = spm.SentencePieceProcessor(model_proto=settings.encoder_data)
            self.part_bytes = PART_BYTES if newlines_split_words(settings.encoder_data) else 0
        else:
            # Ray runs one task per CPU already: tokenizers' own thread pool on top would oversubscribe them.
            os.environ["TOKENIZERS_PARALLELISM"] = "false"
            self.encode_texts = make_encoder(settings.kind, settings.encoder_data)

    def _encode_sentencepiece(self, texts: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
        """All documents' ids, concatenated, and each document's token count."""
        parts = [cut_at_newlines(t, self.part_bytes) if self.part_bytes else [t] for t in texts]
        # One thread: Ray already runs one task per CPU. numpy output skips a Python int per token
        # (about 10% of the encode call, and the flattening after it).
        flat_parts = list(itertools.chain.from_iterable(parts))
        encoded = self.processor.encode(flat_parts, num_threads=1, out_type="numpy")
        part_lengths = np.fromiter(map(len, encoded), np.int64, len(encoded))
        part_starts = np.cumsum([0] + [len(p) for p in parts[:-1]])
        doc_lengths = np.add.reduceat(part_lengths, part_starts) if texts else part_lengths
        pieces = np.concatenate(encoded).astype(self.dtype) if encoded else np.zeros(0, self.dtype)
        return pieces, doc_lengths

    def _encode_hf(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        ids = self.encode_texts(texts)
        doc_lengths = np.fromiter(map(len, ids), np.int64, len(ids))
        pieces = np.fromiter(itertools.chain.from_iterable(ids), self.dtype, int(doc_lengths.sum()))
        return pieces, doc_lengths

    def encode(self, batch: pa.Table) -> pa.Table:
        """Columns: tokens (large_list: [BOS] + pieces + [EOS], empty when the document has no pieces),
        is_val, text_bytes, replaced_utf8; one row per input document, in order."""
        s = self.settings
        # UTF-8 bytes straight from Arrow: SentencePiece takes them as they are, and the validation hash
        # wants bytes too, so no Python string is built for SentencePiece. `tokenizers` takes str.
        texts = batch.column("text").cast(pa.binary()).to_pylist()
        if s.kind == SENTENCEPIECE:
            pieces, doc_lengths = self._encode_sentencepiece(texts)
        else:
            pieces, doc_lengths = self._encode_hf(batch.column("text").to_pylist())
        # No pieces means nothing to learn from (empty or, after normalization, blank): left empty here,
        # skipped and counted by the writer. Every other document gets its [BOS] and EOS inserted.
        kept = doc_lengths > 0
        ends = np.cumsum(doc_lengths)[kept]
        starts = ends - doc_lengths[kept]
        if s.add_bos:
            where = np.stack([starts, ends], axis=1).ravel()
            markers = np.tile(np.array([s.bos_id, s.eos_id], self.dtype), len(ends))
        else:
            where, markers = ends, np.full(len(ends), s.eos_id, self.dtype)
        tokens = np.insert(pieces, where, markers)
        offsets = np.zeros(len(texts) + 1, np.int64)
        np.cumsum(doc_lengths + kept * (1 + s.add_bos), out=offsets[1:])
        is_val = [is_validation(t, s.seed, s.val_fraction) for t in texts]
        return pa.table(
            {
                "tokens": pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(tokens)),
                "is_val": pa.array(is_val, pa.bool_()),
                "text_bytes": pc.binary_length(batch.column("text")).cast(pa.int64()),
                "replaced_utf8": batch.column("replaced_utf8"),
            }
        )


@functools.lru_cache(maxsize=1)
def _encoder(settings: EncodeSettings) -> DocumentEncoder:
    return DocumentEncoder(settings)


def encode_documents(batch: pa.Table, settings: EncodeSettings) -> pa.Table:
    """The Ray Data map function; Ray fuses it with the read, so each task reads and encodes a block."""
    return _encoder(settings).encode(batch)


def _cluster_cpus() -> int:
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def _block_bytes(total: int, workers: int) -> int:
    """One block per worker: each task costs Ray Data tens of milliseconds beside its work, and the
    driver's writing is cheap enough not to need overlapping (German man pages, 14 MB on 2 CPUs, job /
    (2 x raw encode): one block a worker 0.60-0.66, two 0.50-0.59)."""
    return int(np.clip(total // workers, MIN_BLOCK_BYTES, MAX_BLOCK_BYTES))


def tokenize(config: TokenizeConfig) -> tuple[dict, TokenizeStats]:
    """Run the job; return the committed manifest and the stats. Raises InputError / DatasetError."""
    out = storage.parse_location(config.out)
    check_output(out, config.overwrite)  # fail before any work, not after it
    if not 0.0 <= config.val_fraction < 1.0:
        raise InputError(f"--val-fraction {config.val_fraction}: must be in [0, 1)")
    with tempfile.TemporaryDirectory(prefix="replaymix-tokenizer-") as fetched:  # a tokenizer in a store
        tokenizer = load_tokenizer(fetch_tokenizer(config.tokenizer, Path(fetched)))
        return _tokenize(config, out, tokenizer)


def _tokenize(config: TokenizeConfig, out: storage.Location, tokenizer: TokenizerSpec) -> tuple[dict, TokenizeStats]:
    selection = select_inputs(config.inputs, config.split, config.config)
    check_split_used(config.split, selection)
    print(selection.describe(), flush=True)
    files = selection.files
    dtype = token_dtype(tokenizer.vocab_size)

    init_ray(config.address, config.num_cpus)
    started = time.perf_counter()
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True
    context.enable_progress_bars = False  # one tqdm bar below instead of one per operator
    workers = config.workers or _cluster_cpus()
    settings = EncodeSettings(
        kind=tokenizer.kind,
        encoder_data=tokenizer.encoder_data,
        bos_id=tokenizer.bos_id,
        add_bos=tokenizer.add_bos,
        eos_id=tokenizer.eos_id,
        dtype=dtype.str,
        seed=config.seed,
        val_fraction=config.val_fraction,
    )
    chunk_bytes = config.chunk_bytes or _block_bytes(sum(selection.sizes.values()), workers)
    documents = read_documents([str(f) for f in files], config.text_field, chunk_bytes, concurrency=workers)
    encoded = documents.map_batches(
        encode_documents,
        fn_kwargs={"settings": settings},
        batch_size=config.batch_size,
        batch_format="pyarrow",
        compute=ray.data.TaskPoolStrategy(size=workers),  # the reads' cap, so the two fuse into one task
    )

    with staged_dataset(out) as staging:
        tokenizer_info = tokenizer.stage_copy(staging, source=str(config.tokenizer))
        writers = {
            split: ShardWriter(staging, split, dtype, config.shard_tokens) for split in ("train", "val")
        }
        stats = TokenizeStats()
        with tqdm(desc="tokenize", unit="doc", dynamic_ncols=True, mininterval=1.0) as bar:
            # Blocks stream in as tasks finish; the next ones are fetched while this one is written.
            for block in encoded.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=workers):
                _write_block(block, writers, stats)
                bar.update(block.num_rows)
                bar.set_postfix(tokens=stats.tokens, MB=f"{stats.text_bytes / 1e6:.1f}", refresh=False)
        shards = {split: writer.close() for split, writer in writers.items()}
        stats.shards = sum(len(s) for s in shards.values())
        manifest = build_manifest(
            tokenizer_info,
            shards,
            inputs=[{"path": str(f), "bytes": selection.size(f)} for f in files],
            input_patterns=list(config.inputs),
            text_field=config.text_field,
            seed=config.seed,
            val_fraction=config.val_fraction,
            val_split="blake2b(utf8 text, digest_size=8, key=seed as int64 LE) / 2**64 < val_fraction",
            shard_tokens=config.shard_tokens,
            stats={k: v for k, v in asdict(stats).items() if k != "seconds"}
            | {"bytes_per_token": round(stats.bytes_per_token, 4)},
        )
        commit_dataset(staging, out.uri, manifest, overwrite=config.overwrite)
    stats.seconds = time.perf_counter() - started
    return manifest, stats


def _write_block(block: pa.Table, writers: dict[str, ShardWriter], stats: TokenizeStats) -> None:
    for batch in block.to_batches():
        tokens = batch.column("tokens")
        # `.offsets` and `.values` both ignore a slice's start, so they index each other directly.
        offsets = tokens.offsets.to_numpy()
        values = tokens.values.to_numpy()[offsets[0] : offsets[-1]]
        lengths = np.diff(offsets)
        is_val = batch.column("is_val").to_numpy(zero_copy_only=False)
        kept = lengths > 0  # empty documents (no pieces) are skipped
        token_is_val = np.repeat(is_val, lengths)
        for split, held_out in (("train", False), ("val", True)):
            # Documents keep their order within a split.
            writers[split].add(values[token_is_val == held_out], lengths[kept & (is_val == held_out)])
        stats.documents += int(kept.sum())
        stats.val_documents += int((kept & is_val).sum())
        stats.train_documents += int((kept & ~is_val).sum())
        stats.skipped_empty += int((~kept).sum())
        stats.tokens += int(lengths.sum())
        stats.text_bytes += int(batch.column("text_bytes").to_numpy()[kept].sum())
        stats.replaced_utf8 += int(batch.column("replaced_utf8").to_numpy(zero_copy_only=False).sum())


def build_parser() -> argparse.ArgumentParser:
    parser = new_parser("python -m pipeline.tokenize", __doc__.split("\n\n")[0])
    add_input_flags(parser)
    parser.add_argument("--tokenizer", required=True, metavar="PATH",
                        help="a SentencePiece .model, or a Hugging Face tokenizer folder (tokenizer.json and/or "
                             "tokenizer.model with tokenizer_config.json, as save_pretrained writes it); local or "
                             "in a store (s3://, gs://)")
    parser.add_argument("--out", required=True, metavar="PATH",
                        help="the dataset folder to create, or an s3://BUCKET/PREFIX or gs://BUCKET/PREFIX (format: "
                             "pipeline/FORMAT.md)")
    parser.add_argument("--val-fraction", type=float, default=TokenizeConfig.val_fraction,
                        help="share of documents held out as the validation split, chosen by a hash of each "
                             "text; of N documents, 10/N holds out about 10")
    parser.add_argument("--seed", type=int, default=TokenizeConfig.seed, help="seeds the validation split's hash")
    parser.add_argument("--shard-tokens", type=int, default=TokenizeConfig.shard_tokens,
                        help="start a new shard at the first document boundary past this many tokens")
    parser.add_argument("--chunk-mb", type=float, default=None,
                        help="input read and encoded per Ray task (MiB) (default: the input split evenly "
                             "across the workers, 1 to 64 MiB each)")
    parser.add_argument("--batch-size", type=int, default=TokenizeConfig.batch_size,
                        help="documents per encode call (default: a whole block)")
    parser.add_argument("--workers", type=int, default=None,
                        help="concurrent read+encode tasks (default: the cluster's CPUs)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing dataset at --out")
    add_ray_flags(parser)
    return parser


def parse_args(argv: Sequence[str] | None = None) -> tuple[TokenizeConfig, bool]:
    """The job's config and whether --debug was given."""
    args = build_parser().parse_args(argv)
    config = TokenizeConfig(
        inputs=args.inputs,
        tokenizer=args.tokenizer,
        out=args.out,
        text_field=args.text_field,
        split=args.split,
        config=args.config,
        val_fraction=args.val_fraction,
        seed=args.seed,
        shard_tokens=args.shard_tokens,
        chunk_bytes=None if args.chunk_mb is None else max(1, int(args.chunk_mb * 2**20)),
        batch_size=args.batch_size,
        workers=args.workers,
        address=args.address,
        num_cpus=args.num_cpus,
        overwrite=args.overwrite,
    )
    return config, args.debug


def main(argv: Sequence[str] | None = None) -> int:
    config, debug = parse_args(argv)

    def work() -> Path:
        _, stats = tokenize(config)
        print(stats.summary())
        warning = stats.empty_validation_warning(config.val_fraction)
        if warning:
            print(warning, file=sys.stderr)
        return config.out

    return run_command(work, {"--input": config.inputs, "--tokenizer": config.tokenizer, "--out": config.out},
                       debug)


if __name__ == "__main__":
    # Run the imported module, not this `__main__` copy: Ray pickles `_encoder` (an lru_cache) by name,
    # and workers can import `pipeline.tokenize._encoder` but not `__main__._encoder`.
    from pipeline.tokenize import main as imported_main

    sys.exit(imported_main())
