"""Datasets and corpora in an object store, against a real S3 API server on 127.0.0.1 (moto's standalone
server, started here): reading a dataset by URI through the shard cache, the service and the mixer on
it, the tokenize job reading from and writing to the store, and every bad input the issue names.
Nothing here mocks our code, and no request leaves the machine."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from conftest import BUCKET, S3_ENV, S3Server, write_token_dataset
from pipeline import storage
from pipeline.dataset import DatasetError, TokenDataset
from pipeline.shard_cache import CacheConfig, CacheError, ShardCache
from service.app import Access, create_app
from service.mix_schedule import MixSchedule
from service.mixer import Mixer, MixerConfig

def upload_folder(client, folder: Path, prefix: str) -> str:
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            client.upload_file(str(path), BUCKET, f"{prefix}/{path.relative_to(folder)}")
    return f"s3://{BUCKET}/{prefix}"


@pytest.fixture
def local_and_remote(tmp_path, s3, english_lines, german_lines, english_model):
    """Two local datasets of several shards each, and their copies in the bucket."""
    local = {"en": write_token_dataset(tmp_path / "en", english_lines[:400], english_model, english_lines[400:420]),
             "de": write_token_dataset(tmp_path / "de", german_lines[:300], english_model)}
    remote = {name: upload_folder(s3, ds.root, f"datasets/{name}") for name, ds in local.items()}
    return local, remote


def all_tokens(ds: TokenDataset, split: str = "train") -> np.ndarray:
    return ds.splits[split].read(0, ds.splits[split].num_tokens)


def cache(tmp_path: Path, max_bytes: int = 1 << 30) -> CacheConfig:
    return CacheConfig(tmp_path / "cache", max_bytes)


# --- reading by URI --------------------------------------------------------------------------------


def test_a_dataset_read_by_uri_is_byte_identical_to_the_local_copy(tmp_path, local_and_remote, monkeypatch):
    from pipeline import shard_cache

    monkeypatch.setattr(shard_cache, "PART_BYTES", 1000)  # each shard in several ranged reads, in parallel
    local, remote = local_and_remote
    for name in local:
        ds = TokenDataset(remote[name], verify="full", cache=cache(tmp_path))
        assert ds.manifest == local[name].manifest and ds.uri == remote[name]
        for split in ("train", "val"):
            assert np.array_equal(all_tokens(ds, split), all_tokens(local[name], split))
            assert [d.tolist() for d in ds.splits[split].documents()] == \
                [d.tolist() for d in local[name].splits[split].documents()]
        assert (ds.tokenizer_path.read_bytes() == local[name].tokenizer_path.read_bytes())
    config = MixerConfig(seq_len=32, global_batch=8, seed=3)
    mixers = [Mixer(datasets, config, MixSchedule.constant({"en": 0.25, "de": 0.75}))
              for datasets in (local, {n: TokenDataset(u, cache=cache(tmp_path)) for n, u in remote.items()})]
    for step in range(40):
        a, b = (m.batch(step, rank=0, world_size=1) for m in mixers)
        assert np.array_equal(a.tokens, b.tokens) and np.array_equal(a.sources, b.sources)


def test_the_cache_stays_within_its_bound_evicting_the_least_recently_used(tmp_path, local_and_remote):
    local, remote = local_and_remote
    shard_bytes = [s["tokens"] * 2 for s in local["en"].manifest["splits"]["train"]["shards"]]
    bound = 2 * max(shard_bytes) + 1  # two shards fit, the whole split does not
    ds = TokenDataset(remote["en"], cache=cache(tmp_path, bound))
    shard_cache = ds._files.cache
    expected = all_tokens(local["en"])
    for _ in range(2):  # twice over: the second pass must fetch again what was evicted
        for start in range(0, len(expected) - 64, 50):
            assert np.array_equal(ds.train.read(start, 64), expected[start:start + 64])
            assert shard_cache.used_bytes <= bound
            assert sum(f.stat().st_size for f in (tmp_path / "cache").iterdir() if f.is_file()) <= bound
    assert shard_cache.fetched_bytes > sum(shard_bytes)  # evicted shards were fetched again


def test_a_warm_cache_is_reused_by_the_next_process_without_fetching(tmp_path, local_and_remote):
    local, remote = local_and_remote
    first = TokenDataset(remote["en"], cache=cache(tmp_path))
    all_tokens(first)
    again = ShardCache(cache(tmp_path))  # what a new process (a trainer rank) starts with
    from pipeline.dataset import _RemoteFiles

    ds = TokenDataset(remote["en"], cache=cache(tmp_path))
    ds.splits["train"]._files = _RemoteFiles(ds.location, again)
    assert np.array_equal(all_tokens(ds), all_tokens(local["en"])) and again.fetched_bytes == 0


def test_reading_survives_the_cache_folder_being_deleted(tmp_path, local_and_remote):
    local, remote = local_and_remote
    ds = TokenDataset(remote["en"], cache=cache(tmp_path))
    expected = all_tokens(local["en"])
    half = len(expected) // 2
    assert np.array_equal(ds.train.read(0, half), expected[:half])
    shutil.rmtree(tmp_path / "cache")
    assert np.array_equal(all_tokens(ds), expected)  # mapped shards still read, others fetched anew
    shutil.rmtree(tmp_path / "cache")
    assert [d.tolist() for d in ds.train.documents()] == [d.tolist() for d in local["en"].train.documents()]
    assert ds.tokenizer_path.exists()


def test_an_object_changed_under_a_reader_is_refused_naming_it(tmp_path, local_and_remote, s3):
    local, remote = local_and_remote
    ds = TokenDataset(remote["en"], cache=cache(tmp_path))
    shard = ds.manifest["splits"]["train"]["shards"][1]
    key = f"datasets/en/{shard['file']}"
    body = bytearray(s3.get_object(Bucket=BUCKET, Key=key)["Body"].read())
    body[10] ^= 0xFF  # same size: only the hash can tell
    s3.put_object(Bucket=BUCKET, Key=key, Body=bytes(body))
    with pytest.raises(DatasetError, match=rf"s3://{BUCKET}/{key}: sha256 .* differs from the manifest"):
        ds.train.shard_tokens(1)
    assert not any(p.name.endswith(".part") for p in (tmp_path / "cache").iterdir())  # nothing half kept
    assert np.array_equal(ds.train.shard_tokens(0), local["en"].train.shard_tokens(0))  # the rest still reads


def test_the_service_answers_503_naming_a_changed_object_and_stays_up(tmp_path, local_and_remote, s3):
    from service.__main__ import build_service
    from service.service_config import parse_args

    local, remote = local_and_remote
    config = parse_args([f"--dataset=en={remote['en']}", f"--dataset=de={remote['de']}", "--weights=en=0.5,de=0.5",
                         "--seq-len=32", "--global-batch=8", f"--state-dir={tmp_path / 'state'}",
                         "--allow-anonymous-reads", f"--cache-dir={tmp_path / 'cache'}", "--cache-bytes=1G"])
    assert config.datasets["en"] == remote["en"]  # the URI as given, not a mangled path
    client = TestClient(create_app(build_service(config), Access(anonymous_reads=True)))
    assert client.get("/v1/batches/0").status_code == 200
    for shard in TokenDataset(remote["de"], cache=cache(tmp_path)).manifest["splits"]["train"]["shards"]:
        s3.put_object(Bucket=BUCKET, Key=f"datasets/de/{shard['file']}", Body=b"\0" * (shard["tokens"] * 2))
    shutil.rmtree(tmp_path / "cache")  # and the service's cache is gone, so it must fetch again
    answers = [client.get(f"/v1/batches/{step}") for step in range(1, 40)]
    refused = [a for a in answers if a.status_code != 200]
    assert refused and all(a.status_code == 503 and "differs from the manifest" in a.json()["detail"]
                           and f"s3://{BUCKET}/datasets/de/" in a.json()["detail"] for a in refused)
    assert client.get("/v1/status").status_code == 200


# --- bad input -------------------------------------------------------------------------------------


def test_a_missing_bucket_object_or_dataset_is_named(tmp_path, s3):
    with pytest.raises(DatasetError, match="s3://no-such-bucket-here/ds/manifest.json: no manifest.*the bucket "
                                           "'no-such-bucket-here' does not exist"):
        TokenDataset("s3://no-such-bucket-here/ds", cache=cache(tmp_path))
    with pytest.raises(DatasetError, match=f"s3://{BUCKET}/nothing/manifest.json: no manifest"):
        TokenDataset(f"s3://{BUCKET}/nothing", cache=cache(tmp_path))


def test_a_missing_shard_object_is_named_at_open(tmp_path, local_and_remote, s3):
    local, remote = local_and_remote
    shard = local["en"].manifest["splits"]["train"]["shards"][2]["file"]
    s3.delete_object(Bucket=BUCKET, Key=f"datasets/en/{shard}")
    with pytest.raises(DatasetError, match=f"s3://{BUCKET}/datasets/en/{shard}: shard file missing"):
        TokenDataset(remote["en"], cache=cache(tmp_path))


def test_missing_credentials_are_named(tmp_path, s3, monkeypatch):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    with pytest.raises(storage.StorageError, match=f"s3://{BUCKET}/ds/manifest.json: no AWS credentials"):
        TokenDataset(f"s3://{BUCKET}/ds", cache=cache(tmp_path))


def test_a_cache_smaller_than_a_shard_is_refused_naming_the_flag(tmp_path, local_and_remote):
    _, remote = local_and_remote
    ds = TokenDataset(remote["en"], cache=cache(tmp_path, 100))
    with pytest.raises(CacheError, match="more than the whole cache .*--cache-bytes 100"):
        ds.train.read(0, 10)


def test_a_store_that_goes_down_mid_read_is_retried_then_named(tmp_path, monkeypatch, english_lines, english_model):
    server = S3Server().start()
    try:
        for name, value in {**S3_ENV, "AWS_ENDPOINT_URL": server.url}.items():
            monkeypatch.setenv(name, value)
        server.client().create_bucket(Bucket=BUCKET)
        local = write_token_dataset(tmp_path / "en", english_lines[:200], english_model)
        uri = upload_folder(server.client(), local.root, "en")
        ds = TokenDataset(uri, cache=cache(tmp_path))
        assert np.array_equal(ds.train.shard_tokens(0), local.train.shard_tokens(0))
    finally:
        server.stop()
    with pytest.raises(storage.StorageError, match=rf"{uri}/train-00001.bin: could not read it at "
                                                   rf"{server.url} .*gave up after {storage.READ_ATTEMPTS} attempts"):
        ds.train.shard_tokens(1)
    assert np.array_equal(ds.train.shard_tokens(0), local.train.shard_tokens(0))  # cached shards still serve


def test_uris_are_parsed_once_and_never_mangled():
    assert storage.parse_location("s3://b/k/x").uri == "s3://b/k/x"
    assert storage.parse_location("gcs://b/k").uri == "gs://b/k"
    assert storage.parse_location("rel/path").is_local and Path(storage.parse_location("rel").path).is_absolute()
    assert storage.is_uri("hf://datasets/org/name") and not storage.is_uri("/data/en")
    with pytest.raises(storage.StorageError, match="unsupported scheme 'ftp'"):
        storage.parse_location("ftp://host/x")
    with pytest.raises(storage.StorageError, match="no bucket"):
        storage.parse_location("s3://")


# --- the tokenize job reading from and writing to the store -----------------------------------------


@pytest.fixture(scope="module")
def local_ray():
    import ray

    from pipeline.ray_runtime import init_ray

    init_ray(num_cpus=2)
    yield
    ray.shutdown()


def bucket_objects(client, prefix: str) -> dict[str, bytes]:
    """The objects under a prefix; the empty "folder/" markers pyarrow leaves when it deletes an object
    (so that the folder still "exists") are not data and are passed over, as every listing does."""
    objects = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix + "/"):
        for item in page.get("Contents", []):
            if item["Key"].endswith("/"):
                continue
            objects[item["Key"][len(prefix) + 1:]] = client.get_object(Bucket=BUCKET, Key=item["Key"])["Body"].read()
    return objects


def folder_files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_tokenize_reads_and_writes_the_store_byte_identical_to_a_local_run(tmp_path, s3, local_ray, english_lines,
                                                                           english_model):
    import gzip

    from pipeline.tokenize import TokenizeConfig, tokenize

    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in english_lines[:150]))
    (raw / "b.jsonl.gz").write_bytes(gzip.compress("".join(json.dumps({"text": t}) + "\n"
                                                           for t in english_lines[150:300]).encode()))
    upload_folder(s3, raw, "raw")
    options = dict(tokenizer=english_model, val_fraction=0.1, shard_tokens=800, num_cpus=2)
    inputs = [f"s3://{BUCKET}/raw/*.jsonl*"]
    tokenize(TokenizeConfig(inputs=inputs, out=str(tmp_path / "local"), **options))
    tokenize(TokenizeConfig(inputs=inputs, out=f"s3://{BUCKET}/datasets/en", **options))
    local = folder_files(tmp_path / "local")
    assert len([name for name in local if name.endswith(".bin")]) > 2
    assert bucket_objects(s3, "datasets/en") == local  # every object, the manifest included
    # The same inputs on local disk give the same shards (the manifest differs only in where they were).
    tokenize(TokenizeConfig(inputs=[str(raw)], out=str(tmp_path / "from-disk"), **options))
    from_disk = folder_files(tmp_path / "from-disk")
    assert {k: v for k, v in from_disk.items() if k != "manifest.json"} == \
        {k: v for k, v in local.items() if k != "manifest.json"}
    with pytest.raises(DatasetError, match=f"s3://{BUCKET}/datasets/en: a dataset already exists here; pass "
                                           "--overwrite"):
        tokenize(TokenizeConfig(inputs=inputs, out=f"s3://{BUCKET}/datasets/en", **options))
    tokenize(TokenizeConfig(inputs=inputs, out=f"s3://{BUCKET}/datasets/en", overwrite=True, **options))
    assert bucket_objects(s3, "datasets/en") == local
    served = TokenDataset(f"s3://{BUCKET}/datasets/en", cache=cache(tmp_path))
    assert np.array_equal(all_tokens(served), all_tokens(TokenDataset(tmp_path / "local")))


def test_a_killed_store_write_leaves_no_dataset_and_the_next_run_removes_it(tmp_path, s3, local_ray, english_lines,
                                                                             english_model):
    from pipeline.dataset import WRITING_MARKER
    from pipeline.tokenize import TokenizeConfig, tokenize

    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in english_lines[:100]))
    options = dict(inputs=[str(tmp_path / "in.jsonl")], tokenizer=english_model, shard_tokens=800, num_cpus=2)
    # What a run killed mid-upload leaves: its marker and some shards, no manifest.
    for key, body in ((WRITING_MARKER, b""), ("train-00000.bin", b"partial"), ("train-00042.bin", b"stale")):
        s3.put_object(Bucket=BUCKET, Key=f"datasets/killed/{key}", Body=body)
    with pytest.raises(DatasetError, match="no manifest"):
        TokenDataset(f"s3://{BUCKET}/datasets/killed", cache=cache(tmp_path))
    tokenize(TokenizeConfig(out=f"s3://{BUCKET}/datasets/killed", **options))  # no --overwrite needed
    tokenize(TokenizeConfig(out=str(tmp_path / "local"), **options))
    assert bucket_objects(s3, "datasets/killed") == folder_files(tmp_path / "local")  # leftovers gone
    # Objects that are not a dataset and not a killed run's are never replaced, even with --overwrite.
    s3.put_object(Bucket=BUCKET, Key="datasets/theirs/notes.txt", Body=b"keep me")
    with pytest.raises(DatasetError, match=f"s3://{BUCKET}/datasets/theirs: a prefix holding 1 objects that are "
                                           "not a dataset"):
        tokenize(TokenizeConfig(out=f"s3://{BUCKET}/datasets/theirs", overwrite=True, **options))
    assert bucket_objects(s3, "datasets/theirs") == {"notes.txt": b"keep me"}


def test_the_tokenize_cli_takes_uris_and_names_a_missing_input(tmp_path, s3, local_ray, english_model, capsys):
    from pipeline.tokenize import main

    status = main(["--input", f"s3://{BUCKET}/raw/none/*.jsonl", "--tokenizer", str(english_model),
                   "--out", f"s3://{BUCKET}/datasets/x"])
    assert status == 2
    assert f"error: s3://{BUCKET}/raw/none/*.jsonl: matched no input objects" in capsys.readouterr().err


# --- Hugging Face datasets as inputs ------------------------------------------------------------------


def write_hub_repo(root: Path, splits: dict[str, list[str]], shards: int = 2) -> None:
    """A dataset repository as the Hub holds one: data/<split>-0000i-of-0000n.parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (root / "data").mkdir(parents=True)
    for split, texts in splits.items():
        per = -(-len(texts) // shards)
        for i in range(shards):
            part = texts[i * per:(i + 1) * per]
            pq.write_table(pa.table({"content": part, "id": list(range(len(part)))}),
                           root / "data" / f"{split}-{i:05d}-of-{shards:05d}.parquet")


def test_a_hub_dataset_is_an_input_with_its_splits_kept_apart(tmp_path, monkeypatch, local_ray, english_lines,
                                                               german_lines, english_model):
    import sentencepiece as spm

    from pipeline.hf_inputs import HubInputError
    from pipeline.tokenize import TokenizeConfig, tokenize

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # nothing may reach the Hub; the folder is the repository
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.chdir(tmp_path)
    write_hub_repo(tmp_path / "org" / "corpus", {"train": english_lines[:120], "test": german_lines[:60]})
    options = dict(inputs=["hf://datasets/org/corpus"], tokenizer=english_model, text_field="content",
                   val_fraction=0.0, num_cpus=2)
    with pytest.raises(HubInputError, match="hf://datasets/org/corpus: has splits train, test; choose one with --split"):
        tokenize(TokenizeConfig(out=str(tmp_path / "both"), **options))
    with pytest.raises(HubInputError, match="--split dev: no such split"):
        tokenize(TokenizeConfig(out=str(tmp_path / "dev"), split="dev", **options))
    with pytest.raises(HubInputError, match="no 'text' column"):
        tokenize(TokenizeConfig(out=str(tmp_path / "t"), split="test", **{**options, "text_field": "text"}))
    manifest, _ = tokenize(TokenizeConfig(out=str(tmp_path / "test"), split="test", **options))
    ds = TokenDataset(tmp_path / "test", verify="full")
    processor = spm.SentencePieceProcessor(model_file=str(ds.tokenizer_path))
    decoded = [processor.decode(doc[:-1].tolist()) for doc in ds.train.documents()]
    assert decoded == [processor.decode(processor.encode(t)) for t in german_lines[:60]]  # test only, in order
    assert manifest["inputs"][0]["path"].startswith("hf://datasets/org/corpus?split=test")


# What Ray does to a read task when a sibling fails: it interrupts the worker's main thread (a simulated
# SIGINT). Here the interrupt comes while `datasets` imports its loader, as it did in the flaky runs.
INTERRUPTED_LOAD = """
import _thread, signal, sys
from pipeline import hf_inputs

# As in a Ray worker, whose SIGINT cancels the task; a process started in the background (a CI job under
# `cmd &`) inherits SIGINT ignored, and an ignored interrupt is rightly never raised.
signal.signal(signal.SIGINT, signal.default_int_handler)

class InterruptMidImport:
    def find_spec(self, name, path=None, target=None):
        if name == "datasets.load":
            sys.meta_path.remove(self)
            _thread.interrupt_main()
        return None

sys.meta_path.insert(0, InterruptMidImport())
try:
    hf_inputs._load(sys.argv[1], None)
    print("not cancelled")
except KeyboardInterrupt:
    print("cancelled")
print(sorted(hf_inputs._load(sys.argv[2], None)))  # the next job's read, in the same worker
"""


def test_a_hub_read_cancelled_mid_import_leaves_the_worker_able_to_read(tmp_path):
    """The cause of the once-flaky Hub test: a read task cancelled inside its first `import datasets`
    left the package half-imported in a worker that Ray then reused ("partially initialized module
    'datasets' has no attribute 'utils'"). The load now finishes the import, then honours the
    cancellation. A fresh interpreter, since this process may have imported `datasets` already."""
    import subprocess
    import sys

    for name in ("first", "second"):
        write_hub_repo(tmp_path / name, {"train": ["one two", "three"], "test": ["four"]}, shards=1)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path / "hf-cache"), "USE_TORCH": "0"}
    result = subprocess.run([sys.executable, "-c", INTERRUPTED_LOAD, str(tmp_path / "first"), str(tmp_path / "second")],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:2] == ["cancelled", "['test', 'train']"]
