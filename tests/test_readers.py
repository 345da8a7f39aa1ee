"""Input readers: every format, file expansion, and each kind of bad input, on real files."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import zstandard

from pipeline.ray_runtime import init_ray
from pipeline.input_selection import InputError, check_split_used, expand_inputs, select_inputs
from pipeline.readers import _jsonl_rows, _jsonl_table_at_once, _rows_table, plan_reads, read_documents, read_unit

DOCS = [f"document {i}: " + "ünïcode words " * (i % 7 + 1) for i in range(40)]


def jsonl_bytes(texts, field="text") -> bytes:
    return "".join(json.dumps({field: t, "id": i}) + "\n" for i, t in enumerate(texts)).encode()


def write_arrow_stream(path: Path, table: pa.Table) -> Path:
    """What `datasets` save_to_disk writes: the Arrow IPC *stream* format, beside JSON metadata."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with pa.ipc.new_stream(path, table.schema) as writer:
        for batch in table.to_batches(max_chunksize=9):
            writer.write_batch(batch)
    (path.parent / "dataset_info.json").write_text("{}")
    (path.parent / "state.json").write_text("{}")
    return path


def write_dataset_dict(root: Path, splits: dict[str, list[str]]) -> Path:
    """A `datasets.DatasetDict.save_to_disk` folder: dataset_dict.json and a saved dataset per split."""
    for name, texts in splits.items():
        write_arrow_stream(root / name / "data-00000-of-00001.arrow", pa.table({"text": texts}))
    (root / "dataset_dict.json").write_text(json.dumps({"splits": list(splits)}))
    return root


def write_all_formats(folder: Path, texts=DOCS) -> dict[str, Path]:
    """The same documents in every supported format; returns format -> path."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {
        "jsonl": folder / "a.jsonl",
        "jsonl.gz": folder / "b.jsonl.gz",
        "jsonl.zst": folder / "c.jsonl.zst",
        "parquet": folder / "hf" / "data" / "train-00000-of-00001.parquet",
        "arrow": folder / "saved" / "data-00000-of-00001.arrow",
    }
    paths["jsonl"].write_bytes(jsonl_bytes(texts))
    paths["jsonl.gz"].write_bytes(gzip.compress(jsonl_bytes(texts)))
    paths["jsonl.zst"].write_bytes(zstandard.ZstdCompressor().compress(jsonl_bytes(texts)))
    table = pa.table({"id": list(range(len(texts))), "text": texts})
    paths["parquet"].parent.mkdir(parents=True)
    pq.write_table(table, paths["parquet"], row_group_size=7)  # several row groups
    write_arrow_stream(paths["arrow"], table)
    return paths


def read_all(paths, field="text", chunk_bytes=256) -> list[dict]:
    rows = []
    for unit in plan_reads([Path(p) for p in paths], chunk_bytes):
        rows.extend(read_unit(unit, field).to_pylist())
    return rows


@pytest.mark.parametrize("fmt", ["jsonl", "jsonl.gz", "jsonl.zst", "parquet", "arrow"])
def test_each_format_reads_every_document_in_order(tmp_path, fmt):
    path = write_all_formats(tmp_path)[fmt]
    units = plan_reads([path], chunk_bytes=256)
    if fmt in ("jsonl", "parquet", "arrow"):
        assert len(units) > 1, "splittable formats are cut into several units"
    rows = read_all([path])
    assert [r["text"] for r in rows] == DOCS
    assert all(r["source"] == str(path) and not r["replaced_utf8"] for r in rows)
    assert len({r["position"] for r in rows}) == len(DOCS)


def test_txt_is_one_document_per_file(tmp_path):
    for i, text in enumerate(DOCS[:3]):
        (tmp_path / f"{i}.txt").write_text(text)
    rows = read_all(expand_inputs([str(tmp_path)]))
    assert [r["text"] for r in rows] == DOCS[:3]


def test_expand_inputs_files_globs_folders_and_errors(tmp_path):
    paths = write_all_formats(tmp_path)
    from_folder = expand_inputs([str(tmp_path)])
    assert set(from_folder) == {p.resolve() for p in paths.values()}  # JSON metadata passed over
    assert expand_inputs([str(tmp_path / "*.jsonl*")]) == [paths[f].resolve() for f in ("jsonl", "jsonl.gz", "jsonl.zst")]
    assert expand_inputs([str(paths["jsonl"]), str(tmp_path / "*.jsonl")]) == [paths["jsonl"].resolve()]
    with pytest.raises(InputError, match="nothing.jsonl: no such file"):
        expand_inputs([str(tmp_path / "nothing.jsonl")])
    with pytest.raises(InputError, match=r"\*\.csv: matched no input files"):
        expand_inputs([str(tmp_path / "*.csv")])
    (tmp_path / "notes.md").write_text("x")
    with pytest.raises(InputError, match="notes.md: unsupported input format"):
        expand_inputs([str(tmp_path / "notes.md")])


def test_unreadable_inputs_are_named(tmp_path):
    """Inputs no user can read, root included: each must fail naming the path, never be skipped."""
    good = tmp_path / "data" / "good.jsonl"
    good.parent.mkdir()
    good.write_bytes(jsonl_bytes(["x"]))
    broken = tmp_path / "data" / "moved.jsonl"
    broken.symlink_to(tmp_path / "elsewhere" / "moved.jsonl")
    for pattern in (broken, tmp_path / "data", tmp_path / "data" / "*.jsonl"):
        with pytest.raises(InputError, match=r"moved.jsonl: a symbolic link to .*elsewhere/moved.jsonl, which does not"):
            expand_inputs([str(pattern)])
    broken.unlink()
    fifo = tmp_path / "data" / "pipe.jsonl"
    os.mkfifo(fifo)
    for pattern in (fifo, tmp_path / "data"):
        with pytest.raises(InputError, match="pipe.jsonl: not a regular file"):
            expand_inputs([str(pattern)])
    fifo.unlink()
    assert expand_inputs([str(tmp_path / "data")]) == [good.resolve()]


def test_damaged_files_are_named(tmp_path):
    bad_gz = tmp_path / "broken.jsonl.gz"
    bad_gz.write_bytes(gzip.compress(jsonl_bytes(DOCS))[:-30])  # truncated archive
    with pytest.raises(InputError, match="broken.jsonl.gz: cannot read it as jsonl.gz"):
        read_all([bad_gz])
    bad_parquet = tmp_path / "broken.parquet"
    bad_parquet.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(InputError, match="broken.parquet: cannot read it as parquet"):
        read_all([bad_parquet])


def test_invalid_utf8_is_replaced_and_flagged(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b'{"text": "good"}\n{"text": "bad \xff\xfe bytes"}\n{"text": "lone \\ud800 surrogate"}\n')
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    rows = read_all([path, tmp_path / "latin1.txt"])
    assert [r["replaced_utf8"] for r in rows] == [False, True, True, True]
    assert rows[1]["text"] == "bad \ufffd\ufffd bytes" and rows[3]["text"] == "caf\ufffd"
    assert rows[2]["text"] == "lone \ufffd surrogate"
    for row in rows:
        row["text"].encode("utf-8")  # every text is valid UTF-8 now


TRICKY_JSONL = {
    "plain, blank and whitespace lines, CRLF":
        b'{"text": "a"}\n\n  \t\n{"id": 1, "text": "b\\n\\u00e9"}\r\n{"text": ""}',
    "escaped surrogate pair": b'{"text": "smile \\ud83d\\ude00"}\n',
    "other fields of any type": b'{"text": "a", "x": NaN, "y": [1, {"z": null}], "n": 1234567890123456789012}\n',
    "escaped lone surrogate": b'{"text": "lone \\udc00"}\n{"text": "b"}\n',
    "invalid UTF-8 in another field": b'{"text": "a", "note": "\xff"}\n',
    "byte order mark": b'\xef\xbb\xbf{"text": "a"}\n',
    "duplicate key": b'{"text": "first", "text": "last"}\n',
    "two objects on a line": b'{"text": "a"}{"text": "b"}\n',
    "number": b'{"text": 5}\n',
    "null": b'{"text": null}\n',
    "missing": b'{"body": "a"}\n',
    "not an object": b'["text"]\n',
    "raw control character": b'{"text": "tab\there"}\n',
    "not JSON": b'{"text": "a"}\n{"text": \n',
}


@pytest.mark.parametrize("case", TRICKY_JSONL)
def test_jsonl_read_at_once_gives_the_line_readers_rows_or_leaves_it_to_it(tmp_path, case):
    """The fast path (one Arrow JSON call per range) must never differ from the line reader: each case
    either gives the same table or returns None, and then `read_unit` gives the line reader's result."""
    path = tmp_path / "tricky.jsonl"
    path.write_bytes(TRICKY_JSONL[case])
    [unit] = plan_reads([path])
    try:
        expected = _rows_table(unit, _jsonl_rows(path.read_bytes(), unit, "text"))
    except InputError as e:
        expected = e
    at_once = _jsonl_table_at_once(path.read_bytes(), unit, "text")
    if isinstance(expected, InputError):
        assert at_once is None
        with pytest.raises(InputError, match="tricky.jsonl:"):
            read_unit(unit, "text")
    else:
        assert at_once is None or at_once.equals(expected)
        assert read_unit(unit, "text").equals(expected)
    fast = {"plain, blank and whitespace lines, CRLF", "escaped surrogate pair", "other fields of any type"}
    assert (at_once is not None) == (case in fast)  # the common cases do take the fast path


def test_missing_field_and_bad_json_name_file_and_line(tmp_path):
    path = tmp_path / "fields.jsonl"
    lines = [json.dumps({"text": f"doc {i}"}) for i in range(30)]
    lines[22] = json.dumps({"content": "wrong field"})
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(InputError, match=r"fields.jsonl:23: no 'text' field \(found 'content'\)"):
        read_all([path], chunk_bytes=64)  # the error is in a later unit: the line number still counts from 1
    path.write_text('{"text": "ok"}\n{"text": "unterminated\n')
    with pytest.raises(InputError) as error:
        read_all([path])
    assert str(error.value) == (f"{path}:2: not valid JSON (Unterminated string starting at column 10); "
                                "fix or remove the line")
    path.write_text('{"text": "ok"}\n{"text" "no colon"}\n')
    with pytest.raises(InputError, match=r"fields.jsonl:2: not valid JSON \(Expecting ':' delimiter at column 9\)"):
        read_all([path])
    table = pa.table({"body": ["a", None]})
    pq.write_table(table, tmp_path / "nulls.parquet")
    with pytest.raises(InputError, match=r"nulls.parquet: no 'text' column \(columns: body\)"):
        read_all([tmp_path / "nulls.parquet"])
    with pytest.raises(InputError, match=r"nulls.parquet: row 1 has a null 'body'"):
        read_all([tmp_path / "nulls.parquet"], field="body")


def test_read_documents_on_ray_keeps_input_order(tmp_path):
    paths = write_all_formats(tmp_path)
    init_ray(num_cpus=2)
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True
        rows = read_documents([str(tmp_path)], chunk_bytes=256).take_all()
    finally:
        ray.shutdown()
    assert [r["text"] for r in rows] == DOCS * len(paths)
    assert [r["source"] for r in rows[:: len(DOCS)]] == [str(p) for p in expand_inputs([str(tmp_path)])]


def test_a_dataset_dict_is_read_one_split_at_a_time(tmp_path):
    """A DatasetDict folder keeps its splits apart: read as a plain folder it would merge them, test first."""
    root = write_dataset_dict(tmp_path / "corpus", {"train": DOCS[:30], "test": DOCS[30:]})
    (tmp_path / "other.jsonl").write_bytes(jsonl_bytes(DOCS[:2]))
    for pattern in (root, tmp_path, tmp_path / "corpus" / "*" / "*.arrow"):
        with pytest.raises(InputError, match=rf"{root} is a datasets DatasetDict with splits train, test; "
                                             r"choose one with --split NAME"):
            expand_inputs([str(pattern)])
    selection = select_inputs([str(root)], split="train")
    assert [r["text"] for r in read_all(selection.files)] == DOCS[:30]
    assert selection.describe() == (f"reading --input {root}: split 'train' of the DatasetDict {root} "
                                    "(splits: train, test), 1 file, 0.0 MB")
    assert [r["text"] for r in read_all(expand_inputs([str(tmp_path)], split="test"))] == DOCS[30:] + DOCS[:2]
    with pytest.raises(InputError, match=r"--split validation: .*corpus has no such split \(its splits: train, "
                                         r"test\); choose one of them"):
        expand_inputs([str(root)], split="validation")
    # A file named directly is read whatever folder it is in; --split then chooses nothing, and says so.
    direct = select_inputs([str(root / "test" / "data-00000-of-00001.arrow")], split="test")
    assert [r["text"] for r in read_all(direct.files)] == DOCS[30:]
    with pytest.raises(InputError, match=r"--split test: no input is a datasets DatasetDict folder"):
        check_split_used("test", direct)
    check_split_used("test", direct, select_inputs([str(root)], split="test"))
    check_split_used(None, direct)
