"""Section 4 of the stream benchmark (`benchmarks/stream.py --only store`, issue 14): the mixer reading its
token datasets from an S3 API (a moto server on 127.0.0.1) against the same tokens on local disk, and cold
against MosaicML Streaming reading the same windows from the same server. See stream.py's docstring for
what is measured and how; this file holds the object-store half so the local half needs no S3 libraries.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from benchmarks.stream_common import GLOBAL_BATCH, REPO, ROW, SEQ_LEN, WEIGHTS, BenchConfig, in_process_batches, rate, windows_of
from pipeline.dataset import TokenDataset, build_manifest, commit_dataset

STORE_BUCKET = "replaymix-bench"
STORE_ENV = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1",
             "AWS_EC2_METADATA_DISABLED": "true"}  # never ask 169.254.169.254 for a role


class MotoServer:
    """moto's S3 server on a free 127.0.0.1 port, as its own process: a server thread in this process
    would take the GIL from the reader being timed, and Mosaic's reader runs in another process anyway."""

    def __init__(self, log: Path):
        import socket

        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self._log = open(log, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                     stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise SystemExit(f"benchmarks/stream.py: moto's S3 server did not start on {self.url}; see {log}")
                time.sleep(0.1)

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.url, region_name="us-east-1",
                            aws_access_key_id=STORE_ENV["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=STORE_ENV["AWS_SECRET_ACCESS_KEY"])

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self._log.close()


def tiled_dataset(source: Path, out: Path, repeat: int) -> Path:
    """`source`'s train documents `repeat` times, one shard per copy (so a cold reader fetches `repeat`
    objects per dataset, each when it first needs it), and its val split; built once per --work (the
    folder's name carries `repeat`)."""
    if (out / "manifest.json").exists():
        return out
    from pipeline.dataset import write_shard

    ds = TokenDataset(source)
    staging = out.with_name(out.name + ".staging")
    shutil.rmtree(staging, ignore_errors=True)
    (staging / ds.tokenizer.folder).mkdir(parents=True)  # its parent, `out`'s, too
    for name in ds.tokenizer.files:  # the tokenizer copy, as it is in the source
        shutil.copy(Path(ds.root) / ds.tokenizer.folder / name, staging / ds.tokenizer.folder / name)
    documents = list(ds.train.documents())
    # Each copy's documents rotated by a different amount: the shard cache names entries by sha256, so
    # identical copies would be fetched once and the cold read would move a repeat-th of the bytes.
    rotated = [documents[i * len(documents) // repeat:] + documents[:i * len(documents) // repeat] for i in range(repeat)]
    shards = [write_shard(staging, f"train-{i:05d}", docs, ds.dtype) for i, docs in enumerate(rotated)]
    val = [write_shard(staging, "val-00000", list(ds.val.documents()), ds.dtype)]
    manifest = build_manifest(ds.tokenizer, {"train": shards, "val": val}, inputs=[f"{source} x {repeat}"])
    commit_dataset(staging, out, manifest, overwrite=True)
    return out


def upload(client, folder: Path, prefix: str) -> str:
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            client.upload_file(str(path), STORE_BUCKET, f"{prefix}/{path.relative_to(folder)}")
    return f"s3://{STORE_BUCKET}/{prefix}"


def cold_store_seconds(uris: dict[str, str], cache_folder: Path, steps: int) -> tuple[float, int]:
    """Seconds from opening the S3 datasets with an empty cache to the mixer's last of `steps` batches,
    and the shard bytes fetched."""
    from pipeline import storage
    from pipeline.shard_cache import CacheConfig, shared_cache
    from service.mix_schedule import MixSchedule
    from service.mixer import Mixer, MixerConfig

    storage._FILESYSTEMS.clear()  # a new S3 client each round, as Mosaic's reader makes its own
    started = time.perf_counter()
    cache = CacheConfig(cache_folder, 1 << 40)
    mixer = Mixer({n: TokenDataset(uris[n], cache=cache) for n in WEIGHTS}, MixerConfig(SEQ_LEN, GLOBAL_BATCH),
                  MixSchedule.constant(WEIGHTS))
    for step in range(steps):
        assert mixer.batch(step).tokens.shape == (GLOBAL_BATCH, ROW)
    return time.perf_counter() - started, shared_cache(cache).fetched_bytes


def mosaic_command(config: BenchConfig, *args: str) -> list[str]:
    # As a module from the repository root: run as a script, benchmarks/tokenize.py would shadow the
    # standard library's tokenize in that interpreter too.
    return [str(config.mosaic_python), "-m", "benchmarks.mosaic_s3", *args]


def mosaic_prepare(config: BenchConfig, local: dict[str, Path], remote: str, env: dict, shard_bytes: int) -> None:
    """Mosaic's copy: the mixer's windows of each dataset (rows of seq_len + 1 tokens, the same token
    bytes and dtype), uncompressed MDS shards of the size of ours, under `remote` on the same server."""
    staging = config.work / "store-mosaic"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    windows = []
    for name, path in local.items():
        np.save(staging / f"{name}.npy", windows_of(path))
        windows.append(f"{name}={staging / f'{name}.npy'}")
    result = subprocess.run(mosaic_command(config, "prepare", "--windows", *windows, "--remote", remote,
                                           "--staging", str(staging / "mds"), "--size-limit", str(shard_bytes)),
                            cwd=REPO, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"benchmarks/stream.py: writing Mosaic's MDS copy failed:\n{result.stderr[-3000:]}")


def mosaic_cold_seconds(config: BenchConfig, remote: str, env: dict, local: Path) -> tuple[float, int]:
    result = subprocess.run(mosaic_command(config, "read", "--remote", remote, "--local", str(local), "--weights",
                                           ",".join(f"{n}={w}" for n, w in WEIGHTS.items()),
                                           "--steps", str(config.store_steps), "--batch", str(GLOBAL_BATCH)),
                            cwd=REPO, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"benchmarks/stream.py: Mosaic's cold read failed:\n{result.stderr[-3000:]}")
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["rows"] == config.store_steps * GLOBAL_BATCH and report["tokens"] == report["rows"] * ROW
    return report["seconds"], report["fetched_bytes"]


def store_rows(config: BenchConfig, paths: dict[str, Path]) -> None:
    """Section 4: the mixer on datasets in S3, warm against local disk and cold against MosaicML Streaming."""
    import sentencepiece  # noqa: F401  (imported before any timer, as Mosaic's reader imports first)

    local = {n: tiled_dataset(paths[n], config.work / f"store-x{config.store_repeat}r" / n, config.store_repeat)
             for n in WEIGHTS}
    shard_bytes = max(s["tokens"] * TokenDataset(p).dtype.itemsize
                      for p in local.values() for s in TokenDataset(p).manifest["splits"]["train"]["shards"])
    total_bytes = sum(TokenDataset(p).train.num_tokens * TokenDataset(p).dtype.itemsize for p in local.values())
    server = MotoServer(config.work / "moto.log")
    saved = {name: os.environ.get(name) for name in (*STORE_ENV, "AWS_ENDPOINT_URL")}
    os.environ.update({**STORE_ENV, "AWS_ENDPOINT_URL": server.url})  # what our reader takes its endpoint from
    caches = config.work / "store-caches"
    shutil.rmtree(caches, ignore_errors=True)
    try:
        client = server.client()
        client.create_bucket(Bucket=STORE_BUCKET)
        uris = {n: upload(client, local[n], f"replaymix/{n}") for n in WEIGHTS}
        print(f"object storage: {len(WEIGHTS)} datasets x {config.store_repeat} shards of <= {shard_bytes / 2**20:.2f} "
              f"MiB ({total_bytes / 2**20:.1f} MiB of train tokens) in moto S3 at {server.url}")
        mosaic_env = {**os.environ, "S3_ENDPOINT_URL": server.url}
        mosaic = config.mosaic_python.exists()
        if mosaic:
            mosaic_prepare(config, local, f"s3://{STORE_BUCKET}/mosaic", mosaic_env, shard_bytes)
        else:
            print(f"MosaicML Streaming (cold S3): skipped, no --mosaic-python at {config.mosaic_python} (make one: "
                  "python3 -m venv /tmp/benchvenv && /tmp/benchvenv/bin/pip install mosaicml-streaming boto3)")
        cold: dict[str, list[float]] = {"replaymix": [], "mosaic": []}
        fetched: dict[str, int] = {}  # shard bytes each reader fetched in its last cold round
        for round_ in tqdm(range(config.store_rounds), desc="cold S3 rounds", unit="round"):
            seconds, fetched["replaymix"] = cold_store_seconds(uris, caches / f"cold-{round_}", config.store_steps)
            cold["replaymix"].append(seconds)
            if mosaic:
                seconds, fetched["mosaic"] = mosaic_cold_seconds(config, f"s3://{STORE_BUCKET}/mosaic", mosaic_env,
                                                                 caches / f"mosaic-{round_}")
                cold["mosaic"].append(seconds)
        # Warm: the last cold round's cache holds every shard; the same CacheConfig reuses its mapped shards.
        from pipeline.shard_cache import CacheConfig

        warm_cache = CacheConfig(caches / f"cold-{config.store_rounds - 1}", 1 << 40)
        readers = {"local": lambda: in_process_batches(local), "s3 warm": lambda: in_process_batches(uris, cache=warm_cache)}
        warm: dict[str, list[float]] = {name: [] for name in readers}
        for _ in tqdm(range(config.rounds), desc="warm S3 rounds", unit="round"):
            for name, make in readers.items():
                warm[name].append(rate(make, config.steps))
    finally:
        server.stop()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    tokens = config.store_steps * GLOBAL_BATCH * ROW
    local_rate, warm_rate = max(warm["local"]), max(warm["s3 warm"])
    ours = tokens / min(cold["replaymix"])
    print(f"mixer, local disk                  {local_rate / 1e6:8.2f} M tokens/s")
    print(f"mixer, S3 through a warm cache     {warm_rate / 1e6:8.2f} M tokens/s  ({warm_rate / local_rate:.2f}x local "
          f"disk; target >= 0.8)")
    print(f"mixer, S3 cold (empty cache)       {ours / 1e6:8.2f} M tokens/s  ({config.store_steps} steps in "
          f"{min(cold['replaymix']):.2f} s; rounds {', '.join(f'{t:.2f}' for t in cold['replaymix'])} s; "
          f"{fetched['replaymix'] / 2**20:.1f} MiB fetched)")
    summary = f"summary: S3 warm/local {warm_rate / local_rate:.2f}x"
    if cold["mosaic"]:
        theirs = tokens / min(cold["mosaic"])
        print(f"MosaicML Streaming, S3 cold        {theirs / 1e6:8.2f} M tokens/s  ({config.store_steps} steps in "
              f"{min(cold['mosaic']):.2f} s; rounds {', '.join(f'{t:.2f}' for t in cold['mosaic'])} s; "
              f"{fetched['mosaic'] / 2**20:.1f} MiB fetched); replaymix cold is {ours / theirs:.2f}x (target >= 2)")
        summary += f", S3 cold replaymix/Mosaic {ours / theirs:.2f}x"
    print(summary)
