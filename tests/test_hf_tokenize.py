"""The tokenize job on Hugging Face tokenizer folders: ids exactly as the model's own tokenizer gives them,
the manifest's record of the tokenizer, format 1 datasets still loading, bad folders refused, and a
vocabulary past 65,536 stored as uint32 and served unchanged through the mixer, the wire and the client."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import ray
from transformers import AutoTokenizer

from conftest import write_jsonl
from hf_tokenizers import gpt2_folder, llama3_folder, sentencepiece_folder, wordlevel_folder
from pipeline.dataset import READABLE_FORMATS, TokenDataset, sha256_file
from pipeline.ray_runtime import init_ray
from pipeline.tokenize import TokenizeConfig, tokenize
from pipeline.tokenizer.load import load_tokenizer
from pipeline.tokenizer.model_proto import TokenizerError
from service.client import StreamClient
from service.mixer import Mixer, MixerConfig
from service.mix_schedule import MixSchedule
from tests.test_service import READ_TOKEN, ServiceProcess, free_port, service_args

FOLDERS = {"sentencepiece": sentencepiece_folder, "gpt2": gpt2_folder, "llama3": llama3_folder}


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    init_ray(num_cpus=2)
    yield
    ray.shutdown()


@pytest.fixture(scope="module", params=sorted(FOLDERS))
def hf_folder(request, tmp_path_factory, english_lines) -> Path:
    return FOLDERS[request.param](english_lines[:1500], tmp_path_factory.mktemp("hf") / request.param)


def documents_of(tmp_path: Path, texts: list[str], tokenizer: Path, **options) -> tuple[TokenDataset, list[np.ndarray]]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    source = write_jsonl(tmp_path / "in.jsonl", texts)
    tokenize(TokenizeConfig(inputs=[str(source)], tokenizer=tokenizer, out=tmp_path / "ds", val_fraction=0.0, **options))
    ds = TokenDataset(tmp_path / "ds", verify="full")
    return ds, list(ds.train.documents())


def test_ids_are_what_the_models_own_tokenizer_gives_plus_eos(tmp_path, hf_folder, english_lines, german_lines):
    # Old and new text, accents, digits, runs of spaces and newlines: what man pages hold.
    texts = [english_lines[i] + "\n  " + german_lines[i] + " Größe 42\t ü\n\n" for i in range(60)]
    ds, documents = documents_of(tmp_path, texts, hf_folder, batch_size=7)
    auto = AutoTokenizer.from_pretrained(str(hf_folder))
    assert len(documents) == len(texts)
    for text, document in zip(texts, documents):
        expected = auto(text)["input_ids"]
        assert document.tolist() == expected + [auto.eos_token_id]
    info = ds.tokenizer
    assert ds.manifest["format"] == READABLE_FORMATS[-1] and info.kind == "huggingface"
    assert info.vocab_size == len(auto) and info.eos_id == auto.eos_token_id
    assert info.add_bos == (documents[0][0] == auto.bos_token_id and auto("a")["input_ids"][0] == auto.bos_token_id)
    assert set(info.files) >= {"tokenizer.json", "tokenizer_config.json"}
    for name, digest in info.files.items():
        assert digest == sha256_file(hf_folder / name)
    # The dataset's copy is a folder AutoTokenizer loads as the original.
    copy = AutoTokenizer.from_pretrained(str(ds.tokenizer_path))
    assert copy(texts[0])["input_ids"] == auto(texts[0])["input_ids"]


def test_a_format_1_dataset_still_loads(tmp_path, english_lines, english_model):
    ds, documents = documents_of(tmp_path, english_lines[:30], english_model)
    # Rewrite it as format 1 wrote it: the .model at the root, recorded by file and sha256.
    manifest = json.loads((ds.root / "manifest.json").read_text())
    shutil.move(ds.root / "tokenizer" / "tokenizer.model", ds.root / "tokenizer.model")
    (ds.root / "tokenizer").rmdir()
    entry = manifest["tokenizer"]
    manifest["format"] = "replaymix.tokens/1"
    manifest["tokenizer"] = {"file": "tokenizer.model", "sha256": entry["files"]["tokenizer.model"],
                             **{k: entry[k] for k in ("source_path", "vocab_size", "eos_id", "bos_id", "add_bos")}}
    (ds.root / "manifest.json").write_text(json.dumps(manifest))
    old = TokenDataset(ds.root, verify="full")
    assert old.tokenizer.kind == "sentencepiece" and old.tokenizer_path == ds.root / "tokenizer.model"
    assert [d.tolist() for d in old.train.documents()] == [d.tolist() for d in documents]


def test_bad_tokenizer_folders_are_refused_by_name(tmp_path, english_lines, english_model):
    source = write_jsonl(tmp_path / "in.jsonl", english_lines[:10])

    def run(tokenizer: Path):
        tokenize(TokenizeConfig(inputs=[str(source)], tokenizer=tokenizer, out=tmp_path / "out"))

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "tokenizer_config.json").write_text("{}")
    with pytest.raises(TokenizerError, match="neither tokenizer.json nor tokenizer.model"):
        run(empty)
    sp = sentencepiece_folder(english_lines[:1500], tmp_path / "sp")
    with pytest.raises(TokenizerError, match="pass the folder that holds it"):
        run(sp / "tokenizer.json")
    # A tokenizer.model of another tokenizer beside the tokenizer.json.
    mismatched = tmp_path / "mismatched"
    shutil.copytree(sp, mismatched)
    shutil.copyfile(english_model, mismatched / "tokenizer.model")
    with pytest.raises(TokenizerError, match="tokenizer.model and tokenizer.json disagree: id 3"):
        run(mismatched)
    assert not (tmp_path / "out").exists()


def test_a_vocabulary_past_65536_is_uint32_end_to_end(tmp_path, english_lines):
    words = [f"w{i}" for i in range(70_000)]
    folder = wordlevel_folder(words, tmp_path / "wordlevel")
    rng = np.random.default_rng(0)
    # Every document holds ids past 65,535: they would wrap in uint16.
    texts = [" ".join(rng.choice(words[60_000:], size=int(rng.integers(20, 60)))) for _ in range(40)]
    datasets = {}
    for name, part in (("old", texts[:20]), ("new", texts[20:])):
        ds, documents = documents_of(tmp_path / name, part, folder)
        assert ds.dtype == np.dtype("<u4") and ds.vocab_size == 70_003
        expected = load_tokenizer(folder).encoder()(part)
        assert [d.tolist() for d in documents] == [ids + [2] for ids in expected]
        assert max(int(d.max()) for d in documents) > 65_535
        datasets[name] = ds.root
    mixer = Mixer({name: TokenDataset(path) for name, path in datasets.items()},
                  MixerConfig(seq_len=16, global_batch=4, seed=5), MixSchedule.constant({"old": 0.5, "new": 0.5}))
    service = ServiceProcess(service_args(datasets, tmp_path / "state", None, "old=0.5,new=0.5", seq_len=16,
                                          global_batch=4), free_port()).start()
    try:
        with StreamClient(service.url, token=READ_TOKEN, stop_step=6) as client:
            assert client.info["vocab_size"] == 70_003
            batches = list(client)
    finally:
        service.stop()
    assert max(int(b.tokens.max()) for b in batches) > 65_535
    for batch in batches:
        np.testing.assert_array_equal(batch.tokens, mixer.batch(batch.step, 0, 1).tokens)
