"""A real corpus from the machine itself: installed Debian man pages rendered to plain text, as JSONL.

    python -m pipeline.corpora.manpages --lang de --out data/manpages-de.jsonl [--limit N]

One page is one document: {"text", "name", "section", "lang", "path"}. English pages live in
/usr/share/man/man*/, other languages in /usr/share/man/<lang>/man*/ (Debian packages manpages,
manpages-dev, manpages-de, manpages-de-dev). Symlinked aliases and `.so` redirect stubs are passed
over so that each page is rendered once. Pages render in parallel Ray tasks; the file is written in
sorted page order, to a temporary name first, so the same installed pages give the same bytes.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import pyarrow as pa
import ray
from tqdm import tqdm

from pipeline.atomic_file import atomic_writer
from pipeline.command import add_ray_flags, new_parser, run_command
from pipeline.errors import PipelineError
from pipeline.ray_runtime import init_ray

MAN_ROOT = Path("/usr/share/man")


class NoPagesError(PipelineError, FileNotFoundError):
    """No man pages are installed for the language asked for; the message says which package has them."""


@dataclass
class ManpagesConfig:
    lang: str
    out: Path
    limit: int | None = None
    man_root: Path = MAN_ROOT
    address: str | None = None
    num_cpus: int | None = None


def page_folders(lang: str, man_root: Path = MAN_ROOT) -> list[Path]:
    """The man*/ section folders of a language ("en" is the untranslated root)."""
    base = man_root if lang == "en" else man_root / lang
    return sorted(p for p in base.glob("man*") if p.is_dir())


def _is_redirect(path: Path) -> bool:
    """`.so other.1` stubs only point at another page, which is rendered under its own name."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            return f.read(4) == b".so "
    except OSError:
        return False  # a damaged page is reported by the renderer, not skipped here


def find_pages(lang: str, man_root: Path = MAN_ROOT, limit: int | None = None) -> list[Path]:
    folders = page_folders(lang, man_root)
    if not folders:
        base = man_root if lang == "en" else man_root / lang
        raise NoPagesError(
            f"{base}: no man*/ folders for --lang {lang}; install the pages "
            f"(apt-get install manpages{'' if lang == 'en' else '-' + lang}) or pick another language"
        )
    pages = [p for folder in folders for p in sorted(folder.iterdir()) if p.is_file() and not p.is_symlink()]
    pages = [p for p in pages if not _is_redirect(p)]
    return pages[:limit] if limit is not None else pages


def page_name(path: Path) -> tuple[str, str]:
    """("ls", "1") for .../man1/ls.1.gz; ("printf", "3p") for printf.3p.gz."""
    stem = path.name[: -len(".gz")] if path.name.endswith(".gz") else path.name
    name, _, section = stem.rpartition(".")
    return (name, section) if name else (stem, path.parent.name.removeprefix("man"))


def render_page(path: Path) -> tuple[str, str]:
    """(plain text, error message): the page as `man` shows it on a very wide terminal, without overstrike."""
    env = {**os.environ, "MANWIDTH": "1000", "MAN_KEEP_FORMATTING": "", "LC_ALL": "C.UTF-8"}
    man = subprocess.run(
        ["man", "--nh", "--nj", "-l", "-Tutf8", str(path)], capture_output=True, env=env, timeout=120
    )
    if man.returncode != 0:
        return "", man.stderr.decode("utf-8", errors="replace").strip()[:500] or f"man exited {man.returncode}"
    col = subprocess.run(["col", "-bx"], input=man.stdout, capture_output=True, env=env, timeout=120)
    text = col.stdout.decode("utf-8", errors="replace")
    # Rendered pages pad sections with runs of blank lines; one blank line keeps the structure.
    lines = [line.rstrip() for line in text.splitlines()]
    kept = [line for i, line in enumerate(lines) if line or (i > 0 and lines[i - 1])]
    return "\n".join(kept).strip() + "\n", ""


def _render_batch(batch: pa.Table, lang: str) -> pa.Table:
    rows = {"text": [], "name": [], "section": [], "lang": [], "path": [], "error": []}
    for path in map(Path, batch.column("path").to_pylist()):
        text, error = render_page(path)
        name, section = page_name(path)
        for key, value in zip(rows, (text, name, section, lang, str(path), error)):
            rows[key].append(value)
    return pa.table(rows)


def build_corpus(config: ManpagesConfig) -> dict:
    """Render the pages and write the JSONL; return the counts (pages, written, failed, empty, bytes)."""
    pages = find_pages(config.lang, config.man_root, config.limit)
    init_ray(config.address, config.num_cpus)
    started = time.perf_counter()
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True
    context.enable_progress_bars = False
    rendered = ray.data.from_items(
        [{"path": str(p)} for p in pages], override_num_blocks=max(1, min(len(pages) // 16, 256))
    ).map_batches(_render_batch, fn_kwargs={"lang": config.lang}, batch_size=16, batch_format="pyarrow")

    counts = {"pages": len(pages), "written": 0, "failed": 0, "empty": 0, "bytes": 0}
    failures: list[str] = []
    # Streamed into a temporary file that replaces `out` only once every page is in it.
    with (
        atomic_writer(config.out, "w", encoding="utf-8") as f,
        tqdm(total=len(pages), desc="render", unit="page") as bar,
    ):
        for batch in rendered.iter_batches(batch_size=None, batch_format="pyarrow"):
            for row in batch.to_pylist():
                error = row.pop("error")
                if error:
                    counts["failed"] += 1
                    failures.append(f"{row['path']}: {error}")
                elif not row["text"].strip():
                    counts["empty"] += 1
                else:
                    line = json.dumps(row, ensure_ascii=False)
                    f.write(line + "\n")
                    counts["written"] += 1
                    counts["bytes"] += len(row["text"].encode("utf-8"))
            bar.update(batch.num_rows)
    for failure in failures[:10]:
        print(f"warning: could not render {failure}", file=sys.stderr)
    counts["seconds"] = round(time.perf_counter() - started, 1)
    return counts


def build_parser() -> argparse.ArgumentParser:
    parser = new_parser("python -m pipeline.corpora.manpages", __doc__.split("\n\n")[0])
    parser.add_argument("--lang", required=True,
                        help="en, de, ...: a folder under --man-root holding man*/ folders (en: the root itself)")
    parser.add_argument("--out", type=Path, required=True, metavar="PATH", help="the JSONL file to write")
    parser.add_argument("--limit", type=int, default=None,
                        help="render only the first N pages in sorted order (default: every page)")
    parser.add_argument("--man-root", type=Path, default=MAN_ROOT, metavar="PATH",
                        help="where the man pages are installed")
    add_ray_flags(parser)
    return parser


def parse_args(argv: Sequence[str] | None = None) -> tuple[ManpagesConfig, bool]:
    """The command's config and whether --debug was given."""
    args = build_parser().parse_args(argv)
    return ManpagesConfig(args.lang, args.out, args.limit, args.man_root, args.address, args.num_cpus), args.debug


def main(argv: Sequence[str] | None = None) -> int:
    config, debug = parse_args(argv)

    def work() -> Path:
        counts = build_corpus(config)
        print(
            f"rendered {counts['written']} of {counts['pages']} {config.lang} man pages "
            f"({counts['failed']} failed, {counts['empty']} empty) = {counts['bytes'] / 1e6:.1f} MB of text "
            f"in {counts['seconds']} s"
        )
        return config.out

    return run_command(work, {"--out": config.out, "--man-root": config.man_root}, debug)


if __name__ == "__main__":
    sys.exit(main())
