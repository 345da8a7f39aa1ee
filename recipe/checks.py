"""Everything checked before a step starts (and by `--dry-run`): paths, the model/tokenizer fit, the
batch geometry, the Ray address, and whether the output folder is this recipe's. Each failure is one
RecipeError naming the key, and nothing has been written when it is raised."""

from __future__ import annotations

import glob
import json
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from pipeline.storage import is_uri
from recipe.errors import RecipeError
from recipe.schema import Recipe
from trainer.model import MODEL_SIZES

LOCK = "recipe.lock.json"


def check_readable(path: str, key: str) -> None:
    """A local file, folder or glob that exists and can be read; remote paths are read by the step itself."""
    if is_uri(path):
        return
    matches = glob.glob(path) if any(ch in path for ch in "*?[") else [path] if os.path.exists(path) else []
    if not matches:
        raise RecipeError(f"{key}: {path}: no such file or folder; fix the path (relative paths are relative "
                          "to the recipe file)")
    for match in matches:
        if not os.access(match, os.R_OK):
            raise RecipeError(f"{key}: {match}: not readable by this user; fix its permissions")


def check_recipe(recipe: Recipe, name: str) -> None:
    """Refuse, before anything starts, what would fail later."""
    if recipe.is_hf:
        check_model_folder(Path(recipe.model[3:]))
    elif recipe.model not in MODEL_SIZES:
        raise RecipeError(f"model: {recipe.model!r}: give hf:PATH (a save_pretrained folder) or a fresh size "
                          f"({', '.join(MODEL_SIZES)})")
    if recipe.tokenizer:
        check_readable(recipe.tokenizer, "tokenizer")
    for corpus_name, corpus in recipe.old.items():
        check_readable(corpus.path, f"old.{corpus_name}.path")
        if corpus.eval:
            check_readable(corpus.eval, f"old.{corpus_name}.eval")
    for index, update in enumerate(recipe.updates):
        for corpus_name, corpus in update.new.items():
            check_readable(corpus.path, f"updates.{index}.new.{corpus_name}.path")
            if corpus.eval:
                check_readable(corpus.eval, f"updates.{index}.new.{corpus_name}.eval")
    check_fit(recipe)
    data, compute = recipe.data, recipe.compute
    ranks = compute.workers if compute.launcher != "process" else 1
    if data.global_batch % (ranks * data.micro_batch):
        raise RecipeError(f"data.global_batch: {data.global_batch} is not a multiple of data.micro_batch "
                          f"({data.micro_batch}) x {ranks} rank(s); change one of them")
    if compute.fsdp and ranks < 2:
        raise RecipeError("compute.fsdp: sharding needs 2+ ranks: set compute.launcher to torchrun or ray and "
                          "compute.workers to 2 or more, or drop fsdp")
    if compute.launcher == "process" and compute.workers != 1:
        raise RecipeError("compute.workers: one process has one rank; set compute.launcher to torchrun or ray")
    if recipe.output_in_store:
        check_output_store(recipe.output, recipe.work_folder(name), name)
    check_output(recipe.work_folder(name), name, "compute.work_dir" if recipe.output_in_store else "output")
    check_ray_address(compute.ray_address or os.environ.get("RAY_ADDRESS"),
                      "compute.ray_address" if compute.ray_address else "$RAY_ADDRESS")


def check_model_folder(folder: Path) -> None:
    if not (folder / "config.json").is_file():
        raise RecipeError(f"model: hf:{folder}: no config.json there; give a folder `save_pretrained` wrote "
                          "(with its tokenizer)")
    if not os.access(folder / "config.json", os.R_OK):
        raise RecipeError(f"model: hf:{folder}/config.json: not readable by this user; fix its permissions")


def check_fit(recipe: Recipe) -> None:
    """The model's embeddings hold every id of its tokenizer (rows may outnumber pieces, never the reverse)."""
    if not recipe.is_hf:
        return
    folder = Path(recipe.model[3:])
    config = json.loads((folder / "config.json").read_text())
    rows = config.get("vocab_size") or config.get("text_config", {}).get("vocab_size")
    tokenizer = Path(recipe.tokenizer) if recipe.tokenizer else folder
    pieces = tokenizer_size(tokenizer)
    if rows is not None and pieces is not None and pieces > rows:
        key = "tokenizer" if recipe.tokenizer else "model"
        raise RecipeError(f"{key}: the tokenizer ({tokenizer}) has {pieces} pieces but the model's embeddings have "
                          f"{rows} rows; give the tokenizer the model was trained with (an extension is the "
                          "recipe's own step: updates[].tokenizer.extend)")


def tokenizer_size(folder: Path) -> int | None:
    """Pieces of a Hugging Face tokenizer folder, as AutoTokenizer counts them (None: not a folder)."""
    if not folder.is_dir():
        return None
    from transformers import AutoTokenizer

    try:
        return len(AutoTokenizer.from_pretrained(str(folder), local_files_only=True))
    except Exception as e:  # noqa: BLE001 - any loader failure is the user's folder, said in one line
        raise RecipeError(f"tokenizer: {folder}: AutoTokenizer cannot load it ({type(e).__name__}: {e}); give "
                          "the folder save_pretrained wrote") from None


def check_output(out: Path, name: str, key: str = "output") -> None:
    """An output folder (or an object-store output's working copy) is empty, absent, or this recipe's."""
    if not out.exists():
        return
    if not out.is_dir():
        raise RecipeError(f"{key}: {out}: exists and is not a folder; choose another folder")
    lock = out / LOCK
    check_owner(str(out), json.loads(lock.read_text()) if lock.is_file() else None, any(out.iterdir()), name, key)


def check_output_store(uri: str, work: Path, name: str) -> None:
    """An object-store output is reachable with these credentials and empty or this recipe's (by the lock
    it holds): read only, before anything starts."""
    from recipe.store import OutputStore  # here: recipe.store imports this module (through recipe.hashing)

    store = OutputStore(uri, work)
    store.check_reachable()
    lock = store.read(LOCK)
    check_owner(uri, json.loads(lock) if lock else None, bool(store.listing()), name)
    made_in = lock and json.loads(lock).get("work_dir")
    if made_in and Path(made_in) != work:
        raise RecipeError(f"compute.work_dir: the results in {uri} were made in a working copy at {made_in} (its "
                          f"step records and checkpoints name paths there), not {work}; set compute.work_dir: "
                          f"{made_in} to continue them")


def check_owner(where: str, lock: dict | None, holds_anything: bool, name: str, key: str = "output") -> None:
    """The one rule of an output (and of a working copy): it holds nothing, or the results of the recipe
    its lock names."""
    if lock is not None:
        held = lock.get("name")
        if held != name:
            raise RecipeError(f"{key}: {where} holds the results of another recipe ({held!r}, this one is "
                              f"{name!r}); choose another {key}, or give this recipe that name to continue it")
    elif holds_anything:
        raise RecipeError(f"{key}: {where}: not empty and holds no recipe's results (no {LOCK}); choose "
                          f"another {key} or empty it yourself")


def check_ray_address(address: str | None, key: str) -> None:
    """A given Ray address answers (a TCP connect to its host and port)."""
    if not address or address in ("auto", "local"):
        return
    parsed = urlparse(address if "://" in address else f"tcp://{address}")
    host, port = parsed.hostname, parsed.port or (10001 if parsed.scheme == "ray" else 6379)
    try:
        with socket.create_connection((host, port), timeout=3):
            return
    except OSError as e:
        raise RecipeError(f"{key}: the Ray cluster at {address} does not answer ({e.strerror or e}); start it, "
                          "fix the address, or leave it unset to run on a local Ray") from None
