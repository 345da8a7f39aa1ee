"""The tokenize job end to end on a real local Ray: formats, determinism, bad input, kill-and-rerun.
A `ray job submit` run against a `ray start --head` cluster is in test_readme_cluster.py."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import ray
import sentencepiece as spm

from pipeline.dataset import DatasetError, TokenDataset
from pipeline.ray_runtime import init_ray
from pipeline.tokenizer.model_proto import TokenizerError
from conftest import train_spm, write_jsonl
from pipeline.tokenize import TokenizeConfig, main, newlines_split_words, tokenize
from test_readers import write_all_formats, write_dataset_dict

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    init_ray(num_cpus=2)
    yield
    ray.shutdown()


def decode_all(ds: TokenDataset, split: str) -> list[str]:
    processor = spm.SentencePieceProcessor(model_file=str(ds.tokenizer_path))
    docs = list(ds.splits[split].documents())
    for doc in docs:
        assert doc[-1] == ds.tokenizer.eos_id
        assert (doc[0] == ds.tokenizer.bos_id) == ds.tokenizer.add_bos
    return [processor.decode(doc[int(ds.tokenizer.add_bos) : -1].tolist()) for doc in docs]


def run(tmp_path: Path, name: str, inputs, model: Path, **options) -> tuple[TokenDataset, object]:
    config = TokenizeConfig(inputs=[str(i) for i in inputs], tokenizer=model, out=tmp_path / name, **options)
    _, stats = tokenize(config)
    return TokenDataset(tmp_path / name, verify="full"), stats


def test_every_format_round_trips(tmp_path, english_lines, english_model):
    texts = english_lines[:40]
    write_all_formats(tmp_path / "in", texts)
    for i, text in enumerate(texts[:3]):
        (tmp_path / "in" / f"page{i}.txt").write_text(text)
    ds, stats = run(tmp_path, "ds", [tmp_path / "in"], english_model, val_fraction=0.1, seed=3)
    assert ds.dtype == np.dtype("<u2") and ds.tokenizer_path.read_bytes() == english_model.read_bytes()
    expected = texts * 4 + texts[:3] + texts  # sorted paths: a, b, c, hf/..., page*.txt, saved/...
    train, val = decode_all(ds, "train"), decode_all(ds, "val")
    assert sorted(train + val) == sorted(expected)
    assert train == [t for t in expected if t in set(train)]  # input order is kept
    assert 0 < len(val) < len(expected) // 4 and stats.documents == len(expected) and stats.skipped_empty == 0
    manifest = ds.manifest
    assert manifest["seed"] == 3 and manifest["val_fraction"] == 0.1 and len(manifest["inputs"]) == 8
    assert manifest["stats"]["tokens"] == ds.train.num_tokens + ds.val.num_tokens


def test_same_bytes_whatever_the_workers_and_blocks(tmp_path, english_lines, english_model):
    source = write_jsonl(tmp_path / "en.jsonl", english_lines[:600])
    one, _ = run(tmp_path, "one", [source], english_model, workers=1, chunk_bytes=1 << 20, batch_size=256,
                 shard_tokens=3000, val_fraction=0.05)
    many, _ = run(tmp_path, "many", [source], english_model, workers=2, chunk_bytes=700, batch_size=3,
                  shard_tokens=3000, val_fraction=0.05)
    assert len(one.train.shards) > 3
    assert one.manifest["splits"] == many.manifest["splits"]
    for shard in one.train.shards + one.val.shards:
        assert (one.root / shard.file).read_bytes() == (many.root / shard.file).read_bytes()


def test_tokens_are_each_whole_document_encoded(tmp_path, english_lines, english_model):
    """Long documents are encoded in parts cut at newlines, but only for models where that gives exactly
    the ids of encoding the whole document (BPE with default normalization); others are encoded whole."""
    rng = random.Random(5)
    separators = ["\n", "\n\n", " \n  ", "\r\n", "\n\t", "\n \n"]
    docs = [
        "".join(line + rng.choice(separators) for line in english_lines[i * 45 : i * 45 + rng.randint(1, 45)])
        + "caf\u00e9 \u0301x"  # a combining accent right after a space
        for i in range(40)
    ]
    source = write_jsonl(tmp_path / "lines.jsonl", docs)
    unigram = train_spm(english_lines, tmp_path / "unigram", vocab_size=150, model_type="unigram",
                        hard_vocab_limit=False)
    verbatim = train_spm(english_lines, tmp_path / "verbatim", normalization_rule_name="identity",
                         remove_extra_whitespaces=False)
    assert newlines_split_words(english_model.read_bytes())
    assert not newlines_split_words(unigram.read_bytes()) and not newlines_split_words(verbatim.read_bytes())
    for model in (english_model, unigram, verbatim):
        ds, _ = run(tmp_path, model.stem, [source], model, val_fraction=0.0)
        processor = spm.SentencePieceProcessor(model_file=str(model))
        bos = [ds.tokenizer.bos_id] if ds.tokenizer.add_bos else []
        expected = [bos + processor.encode(doc) + [ds.tokenizer.eos_id] for doc in docs]
        assert [doc.tolist() for doc in ds.train.documents()] == expected, model.stem


def test_validation_split_is_stable_when_inputs_are_appended(tmp_path, english_lines, english_model):
    first = write_jsonl(tmp_path / "a.jsonl", english_lines[:300])
    second = write_jsonl(tmp_path / "b.jsonl", english_lines[300:600])
    small, _ = run(tmp_path, "small", [first], english_model, val_fraction=0.2)
    large, _ = run(tmp_path, "large", [first, second], english_model, val_fraction=0.2)
    small_val, large_val = decode_all(small, "val"), decode_all(large, "val")
    assert small_val and large_val[: len(small_val)] == small_val
    assert decode_all(large, "train")[: small.train.num_documents] == decode_all(small, "train")


def test_bad_input_is_counted_or_named(tmp_path, english_lines, english_model, capsys):
    huge = " ".join(english_lines) * 5  # one document of about 0.5 MB
    source = tmp_path / "messy.jsonl"
    source.write_bytes(
        b'{"text": ""}\n{"text": "   \\n  "}\n{"text": "the \xff command"}\n'
        + json.dumps({"text": huge}).encode() + b"\n" + json.dumps({"text": english_lines[0]}).encode() + b"\n"
    )
    ds, stats = run(tmp_path, "messy", [source], english_model, val_fraction=0.0)
    assert (stats.skipped_empty, stats.replaced_utf8, stats.documents) == (2, 1, 3)
    decoded = decode_all(ds, "train")
    assert decoded[1] == huge and decoded[2] == english_lines[0]
    assert decoded[0].startswith("the") and decoded[0].endswith("command")
    assert ds.manifest["stats"]["skipped_empty"] == 2

    lines = [json.dumps({"text": t}) for t in english_lines[:50]]
    lines[41] = json.dumps({"body": "no text here"})
    (tmp_path / "fields.jsonl").write_text("\n".join(lines) + "\n")
    argv = ["--input", str(tmp_path / "fields.jsonl"), "--tokenizer", str(english_model), "--out", str(tmp_path / "f")]
    assert main(argv + ["--chunk-mb", "0.001"]) == 2
    error = next(line for line in capsys.readouterr().err.splitlines() if line.startswith("error: "))
    assert error.endswith("fields.jsonl:42: no 'text' field (found 'body'); choose the field with --text-field")
    assert not (tmp_path / "f").exists()
    assert not list(tmp_path.glob(".f.staging-*"))


def test_bad_input_is_one_error_line_and_debug_adds_the_traceback(tmp_path, english_lines, english_model, capsys):
    """Ray reports a task's failure at length (its traceback; its retry advice appended to the error's
    message; for some errors "please open an issue on the Ray project"): the user sees one line. Run as
    the user runs it, in a process of its own: pytest's capture would hide what Ray logs to the terminal."""
    lines = [json.dumps({"text": t}) for t in english_lines[:30]]
    lines[12] = '{"text": "unterminated'
    broken = tmp_path / "broken.jsonl"
    broken.write_text("\n".join(lines) + "\n")
    argv = ["--input", str(broken), "--tokenizer", str(english_model), "--out", str(tmp_path / "ds")]
    expected = f"error: {broken}:13: not valid JSON (Unterminated string starting at column 10); fix or remove the line"
    job = subprocess.run([sys.executable, "-m", "pipeline.tokenize", *argv, "--num-cpus", "1"], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert job.returncode == 2
    assert_one_error_line(job.stderr, expected)
    assert main(argv + ["--debug"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.rstrip("\n").rsplit("\n", 1)[-1] == expected
    assert not (tmp_path / "ds").exists()


def assert_one_error_line(stderr: str, expected: str) -> None:
    """`expected` is the last line of a command's stderr, whole, and nothing of Ray's comes before it."""
    *before, last = stderr.rstrip("\n").split("\n")
    assert last == expected, stderr[-3000:]
    assert not [line for line in before if "ray" in line.lower() and "Token authentication" not in line], \
        stderr[-3000:]  # (Ray's notice that its local instance uses token authentication may stay)
    assert "Traceback" not in stderr, stderr[-3000:]


def test_a_small_corpus_warns_that_its_validation_split_is_empty(tmp_path, english_lines, english_model, capsys):
    source = write_jsonl(tmp_path / "small.jsonl", english_lines[:120])
    out = tmp_path / "small"
    assert main(["--input", str(source), "--tokenizer", str(english_model), "--out", str(out)]) == 0
    printed = capsys.readouterr()
    assert TokenDataset(out).val.num_documents == 0  # the default --val-fraction, 0.005, of 120 documents
    assert ("warning: the validation split is empty: --val-fraction 0.005 of 120 documents held out none "
            "(about 0.6 expected); pass --val-fraction 0.083 or more to hold out about 10") in printed.err
    assert printed.out.endswith(f"output: {out.resolve()}\n")
    assert main(["--input", str(source), "--tokenizer", str(english_model), "--out", str(tmp_path / "larger"),
                 "--val-fraction", "0.083"]) == 0
    assert "warning" not in capsys.readouterr().err and TokenDataset(tmp_path / "larger").val.num_documents > 0


def test_a_dataset_dict_split_is_tokenized_alone(tmp_path, english_lines, german_lines, english_model, capsys):
    root = write_dataset_dict(tmp_path / "corpus", {"train": english_lines[:50], "test": german_lines[:20]})
    argv = ["--input", str(root), "--tokenizer", str(english_model), "--out", str(tmp_path / "ds"), "--val-fraction", "0"]
    assert main(argv) == 2
    assert "is a datasets DatasetDict with splits train, test; choose one with --split NAME" in capsys.readouterr().err
    assert main(argv + ["--split", "train"]) == 0
    assert f"reading --input {root}: split 'train' of the DatasetDict {root}" in capsys.readouterr().out
    assert decode_all(TokenDataset(tmp_path / "ds"), "train") == english_lines[:50]


def test_overwrite_is_explicit_and_never_touches_other_folders(tmp_path, english_lines, english_model):
    source = write_jsonl(tmp_path / "en.jsonl", english_lines[:20])
    run(tmp_path, "ds", [source], english_model)
    with pytest.raises(DatasetError, match="already exists here; pass --overwrite"):
        run(tmp_path, "ds", [source], english_model)
    ds, _ = run(tmp_path, "ds", [write_jsonl(source, english_lines[20:30])], english_model, overwrite=True,
                val_fraction=0.0)
    assert decode_all(ds, "train") == english_lines[20:30]
    keep = tmp_path / "mine"
    keep.mkdir()
    (keep / "notes.txt").write_text("precious")
    with pytest.raises(DatasetError, match="not a dataset"):
        run(tmp_path, "mine", [source], english_model, overwrite=True)
    assert (keep / "notes.txt").read_text() == "precious"
    with pytest.raises(TokenizerError, match="no such file"):
        run(tmp_path, "x", [source], tmp_path / "missing.model")


def test_killed_job_leaves_nothing_valid_and_rerun_succeeds(tmp_path, english_lines, english_model):
    source = write_jsonl(tmp_path / "big.jsonl", english_lines * 15)
    out = tmp_path / "ds"
    argv = ["--input", str(source), "--tokenizer", str(english_model), "--out", str(out), "--num-cpus", "1",
            "--chunk-mb", "0.05"]
    job = subprocess.Popen([sys.executable, "-m", "pipeline.tokenize", *argv], cwd=REPO, start_new_session=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    staging = tmp_path / f".ds.staging-{job.pid}"
    try:
        for _ in range(1200):  # the staging folder appears once Ray is up and encoding begins
            if staging.exists() or job.poll() is not None:
                break
            time.sleep(0.1)
        assert staging.exists() and job.poll() is None, "the job should be mid-way when it is killed"
    finally:
        os.killpg(job.pid, signal.SIGKILL)  # the job and the local Ray it started: only our process group
        job.wait()
    assert not out.exists()
    with pytest.raises(DatasetError, match="no manifest"):
        TokenDataset(out)
    ds, stats = run(tmp_path, "ds", [source], english_model)
    assert stats.documents == len(english_lines) * 15 and not staging.exists()
