"""Where the tokenizer commands read a tokenizer from and write one to: the local disk or an object store.

A tokenizer is a `.model` file or a Hugging Face folder. `fetch` brings one in a store (`s3://`, `gs://`)
to a local folder first, since SentencePiece, `tokenizers` and transformers all read local files.
`write` puts a finished tokenizer at `--out`: locally atomically (a file replaced in one rename, a
folder moved into place whole); in a store file by file, with the file that makes the folder usable last
(the extension report, or for a trained folder its tokenizer.json / tokenizer.model), so a reader that
finds that file finds the rest. `refuse_existing` is the one check that an output is not overwritten
without --overwrite, wherever it is.
"""

from __future__ import annotations

import os
from pathlib import Path

from pipeline import storage
from pipeline.atomic_file import replace_folder, write_atomically
from pipeline.tokenizer.load import HF_TOKENIZER_FILES
from pipeline.tokenizer.model_proto import TokenizerError

# Uploaded last, in this order of preference: the file whose presence says a folder is complete.
COMPLETING_FILES = ("extension_report.json", "tokenizer.json", "tokenizer.model")


def fetch(path: str | os.PathLike, scratch: Path) -> Path:
    """`path` itself when local; a tokenizer in a store downloaded under `scratch` (a folder keeps only
    its tokenizer files and extension report)."""
    location = storage.parse_location(path)
    if location.is_local:
        return Path(path)
    target = scratch / "fetched" / location.name
    size = storage.file_size(location)
    if size is not None:  # one object: a .model
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(storage.read_bytes(location))
        return target
    wanted = [name for name in storage.list_files(location) if name in (*HF_TOKENIZER_FILES, COMPLETING_FILES[0])]
    if not wanted:
        raise TokenizerError(
            f"{location.uri}: no such object, and no tokenizer files under that prefix; pass a .model object or a "
            "prefix holding a Hugging Face tokenizer folder"
        )
    target.mkdir(parents=True)
    for name in wanted:
        (target / name).write_bytes(storage.read_bytes(location.child(name)))
    return target


def refuse_existing(out: str | os.PathLike, overwrite: bool) -> None:
    """Refuse to replace an output without --overwrite. Checked before the work (so a refusal costs
    nothing) and again just before writing (it may have appeared while training ran)."""
    location = storage.parse_location(out)
    exists = (location.local_path.exists() if location.is_local
              else storage.file_size(location) is not None or bool(storage.list_files(location)))
    if exists and not overwrite:
        raise TokenizerError(f"{out}: already exists; pass --overwrite to replace it or choose another --out")


def write(staged: Path, out: str | os.PathLike) -> None:
    """Put the finished tokenizer `staged` (a file or a folder) at `out`."""
    location = storage.parse_location(out)
    if location.is_local:
        if staged.is_dir():
            replace_folder(staged, location.local_path)
        else:
            write_atomically(location.local_path, staged.read_bytes())
        return
    if staged.is_file():
        storage.upload_file(staged, location)
        return
    names = sorted(p.name for p in staged.iterdir() if p.is_file())
    last = next((name for name in COMPLETING_FILES if name in names), None)
    for name in [n for n in names if n != last] + ([last] if last else []):
        storage.upload_file(staged / name, location.child(name))
