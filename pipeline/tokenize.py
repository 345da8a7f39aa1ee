"""The preprocessing job: raw corpora -> a packed, sharded, memory-mappable token dataset.

    python -m pipeline.tokenize --input data/en.jsonl --tokenizer tok.model --out datasets/en

The same command runs under `ray job submit --working-dir . -- python -m pipeline.tokenize ...`.
Ray Data reads the inputs (`pipeline.readers`) and encodes them on a pool of actors, each loading the
SentencePiece model once. Ray Data's `preserve_order` hands the encoded documents to the driver in input
order, and the driver writes them as shards (`pipeline.dataset.ShardWriter`), cut by token count: the
same inputs, tokenizer and seed give byte-identical shards on any number of workers or blocks. Only the
driver touches `--out`, so a cluster needs no shared output storage. The dataset is built in a staging
folder and renamed into place with its manifest (`pipeline.dataset.commit_dataset`).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa
import ray
import sentencepiece as spm
from tqdm import tqdm

from pipeline.dataset import (
    TOKENIZER_NAME,
    DatasetError,
    ShardWriter,
    build_manifest,
    check_output_folder,
    commit_dataset,
    describe_tokenizer,
    token_dtype,
)
from pipeline.ray_runtime import init_ray
from pipeline.readers import DEFAULT_CHUNK_BYTES, InputError, expand_inputs, read_documents

# Reading and parsing costs a few percent of encoding, so read tasks ask for a sliver of a CPU and the
# encoder actors can take the rest without starving them.
READ_CPUS = 0.25


@dataclass
class TokenizeConfig:
    inputs: list[str]
    tokenizer: Path
    out: Path
    text_field: str = "text"
    val_fraction: float = 0.005
    seed: int = 0
    shard_tokens: int = 1 << 26  # 128 MiB shards at uint16
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    batch_size: int = 64  # documents per encoder call
    workers: int | None = None  # encoder actors; default: the cluster's CPUs
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

    def summary(self, out: Path) -> str:
        return (
            f"tokenized {self.documents} documents ({self.train_documents} train, {self.val_documents} val) "
            f"into {self.tokens} tokens in {self.shards} shards; skipped {self.skipped_empty} empty; "
            f"replaced invalid UTF-8 in {self.replaced_utf8}; {self.bytes_per_token:.2f} bytes/token; "
            f"{self.text_bytes / 1e6:.1f} MB in {self.seconds:.1f} s = {self.mb_per_s:.2f} MB/s -> {out}"
        )


def is_validation(text: bytes, seed: int, val_fraction: float) -> bool:
    """A document is held out when a seeded hash of its text falls below `val_fraction`.

    Depending on the text alone keeps the split stable when inputs are appended or reordered, and puts
    exact duplicates on the same side.
    """
    digest = hashlib.blake2b(text, digest_size=8, key=seed.to_bytes(8, "little", signed=True)).digest()
    return int.from_bytes(digest, "little") < val_fraction * 2.0**64


class Encoder:
    """A Ray Data actor: loads the SentencePiece model once, then encodes batches of documents."""

    def __init__(self, model_proto: bytes, bos_id: int, add_bos: bool, eos_id: int, dtype: str, seed: int,
                 val_fraction: float):
        self.processor = spm.SentencePieceProcessor(model_proto=model_proto)
        self.prefix = [bos_id] if add_bos else []
        self.eos_id, self.dtype = eos_id, np.dtype(dtype)
        self.seed, self.val_fraction = seed, val_fraction

    def __call__(self, batch: pa.Table) -> pa.Table:
        texts = batch.column("text").to_pylist()
        encoded = self.processor.encode(texts, num_threads=1)  # Ray owns parallelism: one thread per actor
        tokens, counts, is_val, text_bytes = [], [], [], []
        for text, ids in zip(texts, encoded):
            data = text.encode("utf-8")
            # No pieces means nothing to learn from (empty or, after normalization, blank): skipped, counted.
            doc = np.array(self.prefix + ids + [self.eos_id], dtype=self.dtype) if ids else None
            tokens.append(b"" if doc is None else doc.tobytes())
            counts.append(0 if doc is None else len(doc))
            is_val.append(is_validation(data, self.seed, self.val_fraction))
            text_bytes.append(len(data))
        return pa.table(
            {
                "tokens": pa.array(tokens, pa.large_binary()),
                "num_tokens": pa.array(counts, pa.int64()),
                "is_val": pa.array(is_val, pa.bool_()),
                "text_bytes": pa.array(text_bytes, pa.int64()),
                "replaced_utf8": batch.column("replaced_utf8"),
            }
        )


def _cluster_cpus() -> int:
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def _staging_folder(out: Path) -> Path:
    """A fresh staging folder beside `out`; leftovers of killed runs (dead pids) are removed first."""
    for stale in out.parent.glob(f".{out.name}.staging-*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    staging = out.parent / f".{out.name}.staging-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    return staging


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def tokenize(config: TokenizeConfig) -> tuple[dict, TokenizeStats]:
    """Run the job; return the committed manifest and the stats. Raises InputError / DatasetError."""
    out = Path(config.out).resolve()
    check_output_folder(out, config.overwrite)  # fail before any work, not after it
    if not 0.0 <= config.val_fraction < 1.0:
        raise InputError(f"--val-fraction {config.val_fraction}: must be in [0, 1)")
    if not Path(config.tokenizer).is_file():
        raise InputError(f"--tokenizer {config.tokenizer}: no such file; pass a SentencePiece .model")
    try:
        tokenizer = describe_tokenizer(config.tokenizer)
    except (RuntimeError, OSError) as e:
        raise InputError(f"--tokenizer {config.tokenizer}: not a SentencePiece model ({e})") from e
    files = expand_inputs(config.inputs)
    dtype = token_dtype(tokenizer.vocab_size)

    init_ray(config.address, config.num_cpus)
    started = time.perf_counter()
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True
    context.enable_progress_bars = False  # one tqdm bar below instead of one per operator
    workers = config.workers or _cluster_cpus()
    encoded = read_documents([str(f) for f in files], config.text_field, config.chunk_bytes, READ_CPUS).map_batches(
        Encoder,
        fn_constructor_kwargs=dict(
            model_proto=Path(config.tokenizer).read_bytes(),
            bos_id=tokenizer.bos_id,
            add_bos=tokenizer.add_bos,
            eos_id=tokenizer.eos_id,
            dtype=dtype.str,
            seed=config.seed,
            val_fraction=config.val_fraction,
        ),
        batch_size=config.batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=workers),
        num_cpus=1 - READ_CPUS / workers,
    )

    staging = _staging_folder(out)
    try:
        shutil.copyfile(config.tokenizer, staging / TOKENIZER_NAME)
        writers = {
            split: ShardWriter(staging, split, dtype, config.shard_tokens) for split in ("train", "val")
        }
        stats = TokenizeStats()
        with tqdm(desc="tokenize", unit="doc", dynamic_ncols=True, mininterval=1.0) as bar:
            for batch in encoded.iter_batches(batch_size=None, batch_format="pyarrow"):
                _write_batch(batch, writers, dtype, stats)
                bar.update(batch.num_rows)
                bar.set_postfix(tokens=stats.tokens, MB=f"{stats.text_bytes / 1e6:.1f}", refresh=False)
        shards = {split: writer.close() for split, writer in writers.items()}
        stats.shards = sum(len(s) for s in shards.values())
        manifest = build_manifest(
            tokenizer,
            shards,
            inputs=[{"path": str(f), "bytes": f.stat().st_size} for f in files],
            input_patterns=list(config.inputs),
            text_field=config.text_field,
            seed=config.seed,
            val_fraction=config.val_fraction,
            val_split="blake2b(utf8 text, digest_size=8, key=seed as int64 LE) / 2**64 < val_fraction",
            shard_tokens=config.shard_tokens,
            stats={k: v for k, v in asdict(stats).items() if k != "seconds"}
            | {"bytes_per_token": round(stats.bytes_per_token, 4)},
        )
        commit_dataset(staging, out, manifest, overwrite=config.overwrite)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already after a successful commit
    stats.seconds = time.perf_counter() - started
    return manifest, stats


def _write_batch(batch: pa.Table, writers: dict[str, ShardWriter], dtype: np.dtype, stats: TokenizeStats) -> None:
    columns = {name: batch.column(name).to_pylist() for name in ("num_tokens", "is_val", "text_bytes", "replaced_utf8")}
    tokens = batch.column("tokens")
    for i, count in enumerate(columns["num_tokens"]):
        stats.replaced_utf8 += columns["replaced_utf8"][i]
        if count == 0:
            stats.skipped_empty += 1
            continue
        split = "val" if columns["is_val"][i] else "train"
        writers[split].add(np.frombuffer(tokens[i].as_py(), dtype=dtype))
        stats.documents += 1
        stats.val_documents += split == "val"
        stats.train_documents += split == "train"
        stats.tokens += count
        stats.text_bytes += columns["text_bytes"][i]


def find_user_error(error: BaseException) -> InputError | DatasetError | None:
    """The InputError/DatasetError behind an exception, also when Ray wrapped it in a task error."""
    ours = (InputError, DatasetError)
    seen = set()
    while error is not None and id(error) not in seen:
        # A RayTaskError is also an instance of the error it wraps, but its message carries the
        # remote traceback; `.cause` is the original exception with the plain message.
        if isinstance(getattr(error, "cause", None), ours):
            return error.cause
        if isinstance(error, ours) and not isinstance(error, ray.exceptions.RayError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def parse_args(argv: Sequence[str] | None = None) -> TokenizeConfig:
    parser = argparse.ArgumentParser(prog="python -m pipeline.tokenize", description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", action="append", required=True, dest="inputs",
                        help="a file, glob or folder of .jsonl[.gz|.zst], .parquet, .arrow or .txt (repeatable)")
    parser.add_argument("--tokenizer", type=Path, required=True, help="a SentencePiece .model")
    parser.add_argument("--out", type=Path, required=True, help="the dataset folder to create")
    parser.add_argument("--text-field", default="text", help="JSON field / column holding the text")
    parser.add_argument("--val-fraction", type=float, default=0.005, help="held-out fraction of documents")
    parser.add_argument("--seed", type=int, default=0, help="seeds the validation split's hash")
    parser.add_argument("--shard-tokens", type=int, default=TokenizeConfig.shard_tokens,
                        help="start a new shard at the first document boundary past this many tokens")
    parser.add_argument("--chunk-mb", type=float, default=DEFAULT_CHUNK_BYTES / 2**20,
                        help="input read per Ray task (MiB); smaller means more parallel blocks")
    parser.add_argument("--batch-size", type=int, default=TokenizeConfig.batch_size,
                        help="documents per encoder call")
    parser.add_argument("--workers", type=int, default=None, help="encoder actors (default: the cluster's CPUs)")
    parser.add_argument("--address", default=None, help="Ray cluster to join (default: $RAY_ADDRESS or local)")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs for an embedded local Ray")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing dataset at --out")
    args = parser.parse_args(argv)
    return TokenizeConfig(
        inputs=args.inputs,
        tokenizer=args.tokenizer,
        out=args.out,
        text_field=args.text_field,
        val_fraction=args.val_fraction,
        seed=args.seed,
        shard_tokens=args.shard_tokens,
        chunk_bytes=max(1, int(args.chunk_mb * 2**20)),
        batch_size=args.batch_size,
        workers=args.workers,
        address=args.address,
        num_cpus=args.num_cpus,
        overwrite=args.overwrite,
    )


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_args(argv)
    try:
        _, stats = tokenize(config)
    except Exception as e:  # noqa: BLE001 - report our own errors plainly, re-raise anything else
        user_error = find_user_error(e)
        if user_error is None:
            raise
        print(f"error: {user_error}", file=sys.stderr)
        return 2
    print(stats.summary(Path(config.out)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
