"""pipeline.atomic_file: a file is replaced whole or not at all, and nothing is left beside it."""

from __future__ import annotations

import os
import stat

import pytest

from pipeline.atomic_file import atomic_writer, write_atomically


def test_replaces_the_file_whole_and_leaves_nothing_beside_it(tmp_path):
    target = tmp_path / "deep" / "state.json"
    write_atomically(target, "first")
    write_atomically(target, b"second \xff")
    assert target.read_bytes() == b"second \xff"
    assert [p.name for p in target.parent.iterdir()] == ["state.json"]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask  # not a private temp file's 0600


def test_a_failed_write_keeps_the_old_file_and_removes_its_temporary_one(tmp_path):
    target = tmp_path / "corpus.jsonl"
    write_atomically(target, "old\n")
    with pytest.raises(RuntimeError, match="render failed"):
        with atomic_writer(target, "w", encoding="utf-8") as f:
            f.write("half of the new\n")
            raise RuntimeError("render failed")
    assert target.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["corpus.jsonl"]
