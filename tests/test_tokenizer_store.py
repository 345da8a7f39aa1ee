"""The tokenizer commands and the tokenize job with tokenizers and corpora in an object store (moto's S3
server on 127.0.0.1): the same files as a local run, the report last, no overwrite without --overwrite."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import ray

from pipeline.dataset import TokenDataset
from pipeline.ray_runtime import init_ray
from pipeline.tokenize import TokenizeConfig, tokenize
from pipeline.tokenizer.extend import ExtendConfig, extend_tokenizer
from pipeline.tokenizer.files import fetch
from pipeline.tokenizer.model_proto import TokenizerError
from pipeline.tokenizer.train import TokenizerTrainConfig, train_tokenizer
from conftest import BUCKET  # the S3 server fixtures (s3, s3_server) live in conftest

S3 = f"s3://{BUCKET}"


@pytest.fixture
def corpora(s3, tmp_path, english_lines, german_lines):  # noqa: F811
    local = {}
    for name, lines in (("en", english_lines), ("de", german_lines)):
        local[name] = tmp_path / f"{name}.jsonl"
        local[name].write_text("".join(json.dumps({"text": line}) + "\n" for line in lines))
        s3.upload_file(str(local[name]), BUCKET, f"raw/{name}.jsonl")
    init_ray(num_cpus=2)  # after the store's environment is set: the read tasks inherit it
    yield local
    ray.shutdown()


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def test_train_extend_and_tokenize_through_a_store_give_the_local_results(s3, corpora, tmp_path):  # noqa: F811
    kind = dict(kind="bpe", vocab_size=400)
    train_tokenizer(TokenizerTrainConfig(inputs=(f"{S3}/raw/en.jsonl",), out=f"{S3}/tok/en", **kind))
    train_tokenizer(TokenizerTrainConfig(inputs=(str(corpora["en"]),), out=tmp_path / "en", **kind))
    remote_base = fetch(f"{S3}/tok/en", tmp_path / "fetched-base")
    assert files_of(remote_base) == files_of(tmp_path / "en")

    extension = dict(new_pieces=40)
    extend_tokenizer(ExtendConfig(base=f"{S3}/tok/en", inputs=(f"{S3}/raw/de.jsonl",),
                                  old_inputs=(f"{S3}/raw/en.jsonl",), out=f"{S3}/tok/en+de", **extension))
    extend_tokenizer(ExtendConfig(base=tmp_path / "en", inputs=(str(corpora["de"]),), old_inputs=(str(corpora["en"]),),
                                  out=tmp_path / "en+de", **extension))
    remote = files_of(fetch(f"{S3}/tok/en+de", tmp_path / "fetched-extended"))
    local = files_of(tmp_path / "en+de")
    assert remote.keys() == local.keys() and "extension_report.json" in remote
    assert {k: v for k, v in remote.items() if k != "extension_report.json"} == \
           {k: v for k, v in local.items() if k != "extension_report.json"}
    remote_report, local_report = (json.loads(files["extension_report.json"]) for files in (remote, local))
    assert remote_report["bytes_per_token"] == local_report["bytes_per_token"]
    assert remote_report["base"]["path"] == f"{S3}/tok/en"

    with pytest.raises(TokenizerError, match="already exists; pass --overwrite"):
        extend_tokenizer(ExtendConfig(base=f"{S3}/tok/en", inputs=(f"{S3}/raw/de.jsonl",),
                                      old_inputs=(f"{S3}/raw/en.jsonl",), out=f"{S3}/tok/en+de", **extension))

    for name, tokenizer in (("remote", f"{S3}/tok/en+de"), ("local", str(tmp_path / "en+de"))):
        tokenize(TokenizeConfig(inputs=[str(corpora["de"])], tokenizer=tokenizer, out=tmp_path / f"de-{name}"))
    remote_ds, local_ds = TokenDataset(tmp_path / "de-remote"), TokenDataset(tmp_path / "de-local")
    assert remote_ds.tokenizer.source_path == f"{S3}/tok/en+de"
    assert [d.tolist() for d in remote_ds.train.documents()] == [d.tolist() for d in local_ds.train.documents()]


def test_a_missing_tokenizer_in_the_store_is_named(s3, tmp_path):  # noqa: F811
    with pytest.raises(TokenizerError, match=f"{S3}/tok/nothing: no such object"):
        fetch(f"{S3}/tok/nothing", tmp_path)
