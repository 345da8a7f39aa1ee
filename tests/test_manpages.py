"""The man page corpus: real installed pages rendered by `man` in Ray tasks, written as JSONL."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import ray

from pipeline.corpora.manpages import MAN_ROOT, find_pages, main, page_name

pytestmark = pytest.mark.skipif(not (MAN_ROOT / "man1").is_dir(), reason="man pages are not installed")


def test_page_names_and_aliases_are_passed_over():
    assert page_name(Path("/usr/share/man/man1/ls.1.gz")) == ("ls", "1")
    assert page_name(Path("/usr/share/man/man3/printf.3p.gz")) == ("printf", "3p")
    pages = find_pages("en", limit=50)
    assert len(pages) == 50 and all(not p.is_symlink() for p in pages) and pages == sorted(pages)
    with pytest.raises(FileNotFoundError, match="no man\\*/ folders for --lang xx"):
        find_pages("xx")


def test_renders_pages_to_jsonl(tmp_path, capsys, monkeypatch):
    out = tmp_path / "en.jsonl"
    monkeypatch.chdir(tmp_path)  # a relative --out is fine outside a Ray job, and reported absolute
    try:
        assert main(["--lang", "en", "--out", "en.jsonl", "--limit", "4", "--num-cpus", "2"]) == 0
    finally:
        ray.shutdown()
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    expected = find_pages("en", limit=4)
    assert [r["path"] for r in rows] == [str(p) for p in expected]  # sorted page order, whatever the tasks
    for row in rows:
        assert row["lang"] == "en" and (row["name"], row["section"]) == page_name(Path(row["path"]))
        assert len(row["text"]) > 200 and "\x08" not in row["text"]  # rendered, without overstrike
    printed = capsys.readouterr().out
    assert "rendered 4 of 4 en man pages" in printed and printed.endswith(f"output: {out}\n")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".") or ".partial" in p.name]  # no temp files left
