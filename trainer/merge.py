"""Model merging: Hugging Face folders of one architecture into a new folder that `AutoModelForCausalLM` loads.

Methods (as mergekit defines them, which follows the papers):
- `linear`: the weighted mean of the models, sum(w_i * theta_i) / sum(w_i).
- `task_arithmetic` (arXiv 2212.04089): base + lambda * sum(w_i * tau_i), tau_i = theta_i - base (the task vector).
- `ties` (arXiv 2306.01708): each task vector trimmed to its top `density` fraction of magnitudes; a sign per
  entry elected by mass, the sign of sum(w_i * trimmed tau_i); the disjoint mean, over the models whose
  trimmed entry has the elected sign only, sum(w_i * tau_i) / sum(w_i); base + lambda * that.
- `--dare` (arXiv 2311.03099): instead of trimming by magnitude, each task-vector entry is dropped with
  probability 1 - density and the survivors scaled by 1 / density (DARE-TIES with `ties`, DARE-linear with
  `task_arithmetic`), from a seeded generator.

Trimming is per tensor, as mergekit does (the TIES reference trims over the whole flattened model): a tensor's
k = int(density x its entries), at least one (mergekit's count), entries of the largest |tau| kept.

Vocabularies grown by a tokenizer extension (`pipeline.tokenizer extend`, then training with
`--extension-report`): the embedding and head rows every model shares (the base's, or for `linear` the
smallest model's) are merged as above; each row past them is the weighted mean of the models that have it
(usually one). Every tokenizer must then be a prefix of the largest one, which the output takes; the output's
config.json records the merge and where the extra rows came from under `replaymix_merge`.

Tensors are read one at a time from the safetensors files (`safe_open`), so memory holds the output and one
tensor of each model, computed in float32 and stored in the base's (or first model's) dtype. Everything is
checked before anything is written, and the folder is written beside its target and renamed into place.

`python -m trainer.merge --help`; from Python, `merge_folders(...)`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from tqdm import tqdm

from pipeline.errors import report_user_error
from trainer.errors import TrainerError
from trainer.hf_model import HFModelError, copy_tokenizer, load_tokenizer

METHODS = ("linear", "task_arithmetic", "ties")
NEEDS_BASE = ("task_arithmetic", "ties")
RECORD_KEY = "replaymix_merge"  # where the output's config.json says how it was made
# Config keys that may differ between models of one architecture without changing what a weight means.
_IGNORED_CONFIG_KEYS = {"vocab_size", "_name_or_path", "transformers_version", "dtype", "torch_dtype", "use_cache",
                        RECORD_KEY, "replaymix_growth"}
_SHAPE_KEYS = ("hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads", "num_key_value_heads")


class MergeError(TrainerError):
    """Models that cannot be merged as asked (other architectures or shapes, a bad density, weight or folder);
    the message names the folder or flag and the reason."""


# ---- the arithmetic, over tensors -------------------------------------------------------------------------


def trim(task_vector: torch.Tensor, density: float) -> torch.Tensor:
    """TIES' trim: the task vector with all but its k = int(density x entries) (at least one) largest
    magnitudes set to zero."""
    if density >= 1:
        return task_vector
    flat = task_vector.reshape(-1)
    k = max(1, int(density * flat.numel()))  # mergekit's count, so its users get its numbers
    kept = torch.zeros_like(flat)
    top = flat.abs().topk(k).indices
    kept[top] = flat[top]
    return kept.view_as(task_vector)


def dare(task_vector: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """DARE: each entry kept with probability `density` and scaled by 1 / density, so the expected task
    vector is unchanged."""
    if density >= 1:
        return task_vector
    keep = torch.rand(task_vector.shape, generator=generator) < density
    return task_vector * keep / density


def elect_sign(weighted: torch.Tensor) -> torch.Tensor:
    """TIES' sign election by mass: per entry, the sign of the sum over models (dimension 0) of the weighted
    trimmed task vectors; +1 where the sum is zero (as mergekit)."""
    return torch.where(weighted.sum(dim=0) >= 0, 1.0, -1.0)


def disjoint_mean(task_vectors: torch.Tensor, weights: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """TIES' disjoint merge: per entry, the weighted mean of the task vectors (stacked on dimension 0) whose
    entry has the elected sign; an entry no model agrees with (all trimmed away) stays zero."""
    w = weights.view(-1, *([1] * (task_vectors.dim() - 1)))
    agree = (task_vectors.sign() == sign).to(task_vectors.dtype)
    total = (w * task_vectors * agree).sum(dim=0)
    divisor = (w * agree).sum(dim=0)
    return torch.where(divisor != 0, total / torch.where(divisor != 0, divisor, 1.0), 0.0)


def ties(base: torch.Tensor, models: Sequence[torch.Tensor], weights: Sequence[float], density: float,
         lam: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """TIES-merging of one tensor: trim (or DARE-drop, given a generator), elect, disjoint mean, base + lambda x."""
    vectors = torch.stack([_sparsify(m - base, density, generator) for m in models])
    w = torch.tensor(weights, dtype=vectors.dtype)
    sign = elect_sign(w.view(-1, *([1] * base.dim())) * vectors)
    return base + lam * disjoint_mean(vectors, w, sign)


def task_arithmetic(base: torch.Tensor, models: Sequence[torch.Tensor], weights: Sequence[float], lam: float,
                    density: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """base + lambda x the weighted sum of the task vectors (DARE-dropped first, given a generator)."""
    merged = sum(w * _sparsify(m - base, density, generator) for m, w in zip(models, weights))
    return base + lam * merged


def linear(models: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """The weighted mean of the tensors."""
    return sum(w * m for m, w in zip(models, weights)) / sum(weights)


def _sparsify(task_vector: torch.Tensor, density: float, generator: torch.Generator | None) -> torch.Tensor:
    return trim(task_vector, density) if generator is None else dare(task_vector, density, generator)


# ---- what to merge ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MergeSpec:
    """One merge: `models` (with `weights`, default 1 each) merged by `method`, relative to `base` for
    task_arithmetic and ties. `density` trims (ties) or drops (--dare) task vectors; `lam` scales the
    merged task vector; `seed` draws DARE's drops."""

    method: str
    models: tuple[Path, ...]
    base: Path | None = None
    weights: tuple[float, ...] = ()
    density: float = 1.0
    lam: float = 1.0
    dare: bool = False
    seed: int = 0
    resolved_weights: tuple[float, ...] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "models", tuple(Path(m) for m in self.models))
        object.__setattr__(self, "base", None if self.base is None else Path(self.base))
        object.__setattr__(self, "resolved_weights", tuple(self.weights) or (1.0,) * len(self.models))
        self.check()

    def check(self) -> None:
        if self.method not in METHODS:
            raise MergeError(f"--method {self.method!r}: choose one of {', '.join(METHODS)}")
        if self.method in NEEDS_BASE and self.base is None:
            raise MergeError(f"--method {self.method} adds task vectors (model minus base) to a base: give --base PATH")
        if self.method == "linear" and self.base is not None:
            raise MergeError("--method linear averages the --model folders and uses no base; drop --base, or "
                             "use task_arithmetic or ties")
        fewest = 2 if self.method == "linear" else 1
        if len(self.models) < fewest:
            raise MergeError(f"--method {self.method} needs at least {fewest} --model folder(s), got {len(self.models)}")
        if self.weights and len(self.weights) != len(self.models):
            raise MergeError(f"--weights gives {len(self.weights)} weight(s) for {len(self.models)} --model "
                             "folder(s); give one per model, in the order of --model")
        if not all(math.isfinite(w) for w in self.resolved_weights) or (
                self.method == "linear" and sum(self.resolved_weights) <= 0):
            raise MergeError(f"--weights {list(self.resolved_weights)}: must be finite numbers "
                             f"{'with a positive sum ' if self.method == 'linear' else ''}")
        if not (0 < self.density <= 1) or math.isnan(self.density):
            raise MergeError(f"--density {self.density}: the share of each task vector kept must be in (0, 1] "
                             "(1 keeps all of it; the TIES paper's recipe keeps 0.2)")
        if self.density < 1 and self.method == "linear":
            raise MergeError("--density trims task vectors, which --method linear has none of; drop it")
        if self.density < 1 and self.method == "task_arithmetic" and not self.dare:
            raise MergeError("--density with --method task_arithmetic needs --dare (DARE-linear); to trim task "
                             "vectors by magnitude use --method ties")
        if self.dare and self.method == "linear":
            raise MergeError("--dare drops entries of task vectors, which --method linear has none of; drop it")
        if not math.isfinite(self.lam):
            raise MergeError(f"--lambda {self.lam}: must be a finite number")

    def record(self) -> dict[str, Any]:
        return {"method": self.method, "base": None if self.base is None else str(self.base),
                "models": [str(m) for m in self.models], "weights": list(self.resolved_weights),
                "density": self.density, "lambda": self.lam, "dare": self.dare,
                **({"seed": self.seed} if self.dare else {})}


# ---- the folders ------------------------------------------------------------------------------------------


class _Folder:
    """A Hugging Face model folder, read lazily: its config, and where each tensor is in its safetensors."""

    def __init__(self, path: Path):
        self.path = path
        if not (path / "config.json").is_file():
            raise MergeError(f"{path}: no config.json, so not a Hugging Face model folder; give folders "
                             "`save_pretrained` (or the trainer's --save-hf) wrote")
        try:
            self.config: dict[str, Any] = json.loads((path / "config.json").read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise MergeError(f"{path / 'config.json'}: not readable JSON ({e})") from e
        self.files = self._tensor_files()
        self._open: dict[Path, Any] = {}

    def _tensor_files(self) -> dict[str, Path]:
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            return {name: self.path / file for name, file in weight_map.items()}
        single = self.path / "model.safetensors"
        if not single.is_file():
            raise MergeError(f"{self.path}: no model.safetensors (or model.safetensors.index.json); merging reads "
                             "safetensors weights: save the model with save_pretrained (safetensors is its default)")
        from safetensors import safe_open

        with safe_open(single, "pt") as f:
            return {name: single for name in f.keys()}

    def _handle(self, file: Path) -> Any:
        if file not in self._open:
            from safetensors import safe_open

            self._open[file] = safe_open(file, "pt")
        return self._open[file]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(self.files[name]).get_slice(name).get_shape())

    def tensor(self, name: str) -> torch.Tensor:
        return self._handle(self.files[name]).get_tensor(name)

    @property
    def architecture(self) -> str:
        return ", ".join(self.config.get("architectures") or [self.config.get("model_type", "?")])


def _vocab_tensor_names(folder: _Folder) -> set[str]:
    """The names of the input embedding and output head (rows = vocabulary), from the architecture itself
    (built on the meta device: no memory); a tied head is not in the files."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder.path, local_files_only=True)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    vocab_params = {id(model.get_input_embeddings().weight), id(model.get_output_embeddings().weight)}
    return {name for name, p in model.named_parameters(remove_duplicate=False) if id(p) in vocab_params} & set(folder.files)


def check_compatible(folders: Sequence[_Folder]) -> set[str]:
    """Refuse folders that are not one architecture of one shape, naming what differs; return the names of
    the vocabulary-sized tensors (whose rows may differ)."""
    first = folders[0]
    for other in folders[1:]:
        if other.architecture != first.architecture or other.config.get("model_type") != first.config.get("model_type"):
            raise MergeError(f"{other.path} is a {other.architecture} but {first.path} is a {first.architecture}: "
                             "only models of one architecture can be merged")
        differing = sorted(k for k in (set(first.config) | set(other.config)) - _IGNORED_CONFIG_KEYS
                           if first.config.get(k) != other.config.get(k))
        if differing:
            # The sizes first: they are the usual reason (another base model).
            differing.sort(key=lambda k: (k not in _SHAPE_KEYS, k))
            listed = ", ".join(f"{k} {first.config.get(k)!r} vs {other.config.get(k)!r}" for k in differing[:4])
            raise MergeError(f"{other.path} and {first.path} differ in their configs ({listed}): only models of "
                             "one shape (the same base model, continued) can be merged")
    vocab_names = _vocab_tensor_names(first)
    for other in folders[1:]:
        if set(other.files) != set(first.files):
            only = sorted(set(other.files) ^ set(first.files))
            raise MergeError(f"{other.path} and {first.path} hold different tensors (e.g. {only[0]}): only models "
                             "of one architecture can be merged")
        for name in first.files:
            a, b = first.shape(name), other.shape(name)
            if (a[1:] if name in vocab_names else a) != (b[1:] if name in vocab_names else b):
                raise MergeError(f"{name} is {list(b)} in {other.path} but {list(a)} in {first.path}: only models "
                                 "of one shape can be merged")
    return vocab_names


def _check_tokenizers(folders: Sequence[_Folder], rows: Sequence[int]) -> _Folder:
    """The folder whose tokenizer the output takes (the one with the most rows; the first of those), after
    checking every other tokenizer is a prefix of it: each piece the same id."""
    source = folders[max(range(len(folders)), key=lambda i: (rows[i], -i))]
    target = load_tokenizer(source.path, "the tokenizer of the model with the largest vocabulary").get_vocab()
    for folder in folders:
        if folder is source or not any((folder.path / n).is_file() for n in ("tokenizer.json", "tokenizer.model")):
            continue
        vocab = load_tokenizer(folder.path, "a merged model's tokenizer").get_vocab()
        differing = [piece for piece, i in vocab.items() if target.get(piece) != i]
        if differing:
            raise MergeError(f"{folder.path}: its tokenizer is not a prefix of {source.path}'s ({len(differing)} "
                             f"pieces, e.g. {differing[0]!r}, have other ids there); the models were trained on "
                             "different tokenizers and their embedding rows mean different pieces")
    return source


def _check_out(out: Path, overwrite: bool, inputs: Sequence[Path]) -> None:
    if any(out.resolve() == p.resolve() for p in inputs):
        raise MergeError(f"--out {out}: is one of the models being merged; give a new folder")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise MergeError(f"--out {out}: exists and is not empty; give a new or empty folder (or --overwrite)")


def _merge_rows(spec: MergeSpec, tensors: list[torch.Tensor], base: torch.Tensor | None,
                generator: torch.Generator | None) -> torch.Tensor:
    w = spec.resolved_weights
    if spec.method == "linear":
        return linear(tensors, w)
    if spec.method == "task_arithmetic":
        return task_arithmetic(base, tensors, w, spec.lam, spec.density, generator)
    return ties(base, tensors, w, spec.density, spec.lam, generator)


def _merged_vocab_tensor(spec: MergeSpec, models: list[torch.Tensor], base: torch.Tensor | None, shared_rows: int,
                         generator: torch.Generator | None) -> torch.Tensor:
    """An embedding or head: the first `shared_rows` rows merged by the method; each later row the weighted
    mean of the models that have it (a plain mean where their weights sum to zero)."""
    rows = max(m.shape[0] for m in models)
    out = models[0].new_empty(rows, *models[0].shape[1:])
    out[:shared_rows] = _merge_rows(spec, [m[:shared_rows] for m in models],
                                    None if base is None else base[:shared_rows], generator)
    ends = sorted({m.shape[0] for m in models if m.shape[0] > shared_rows})
    for start, end in zip([shared_rows] + ends, ends):  # rows held by the same models: one mean
        having = [(m, w) for m, w in zip(models, spec.resolved_weights) if m.shape[0] >= end]
        total = sum(w for _, w in having)
        weights = [w / total if total else 1 / len(having) for _, w in having]
        out[start:end] = sum(w * m[start:end] for (m, _), w in zip(having, weights))
    return out


def _merge_tensor(spec: MergeSpec, stored: torch.Tensor, models: list[torch.Tensor], base: torch.Tensor | None,
                  shared_rows: int | None, generator: torch.Generator | None) -> torch.Tensor:
    """One tensor merged in float32 and stored in `stored`'s dtype; `shared_rows` is given for an embedding or
    head (its later rows come from the models that have them). An integer buffer is the same in all: kept."""
    if not stored.is_floating_point():
        return stored
    tensors = [m.float() for m in models]
    base = None if base is None else base.float()
    if shared_rows is not None:
        value = _merged_vocab_tensor(spec, tensors, base, shared_rows, generator)
    else:
        value = _merge_rows(spec, tensors, base, generator)
    return value.to(stored.dtype).contiguous()


def merge_state_dicts(spec: MergeSpec, models: Sequence[dict[str, torch.Tensor]],
                      base: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """`spec`'s merge of models already in memory (state dicts of one architecture, e.g. trainer checkpoints;
    `spec.models` only names them), by the rules `merge_folders` applies to folders. The vocabulary tensors are
    those whose rows differ between the models; their shared rows are the base's (or the smallest model's)."""
    first = models[0]
    for i, other in enumerate([*models[1:], *([base] if base is not None else [])], 1):
        if set(other) != set(first):
            raise MergeError(f"model {i} holds other tensors than model 0 (e.g. {sorted(set(other) ^ set(first))[0]}): "
                             "only models of one architecture can be merged")
    vocab_names = {name for name, tensor in first.items()
                   if any(m[name].shape != tensor.shape for m in [*models, *([base] if base else [])])}
    for name in vocab_names:
        shapes = {tuple(m[name].shape[1:]) for m in [*models, *([base] if base else [])]}
        if len(shapes) > 1:
            raise MergeError(f"{name} has shapes that differ beyond their rows ({sorted(shapes)}): only models of "
                             "one shape can be merged")
    rows = [m[name].shape[0] for m in models for name in sorted(vocab_names)[:1]]
    shared_rows = base[sorted(vocab_names)[0]].shape[0] if base is not None and vocab_names else min(rows, default=0)
    if rows and min(rows) < shared_rows:
        raise MergeError(f"a model has {min(rows)} vocabulary rows, fewer than the base's {shared_rows}: a merged "
                         "model continues the base, whose every row each model must have")
    generator = torch.Generator().manual_seed(spec.seed) if spec.dare else None
    return {name: _merge_tensor(spec, first[name], [m[name] for m in models], None if base is None else base[name],
                                shared_rows if name in vocab_names else None, generator)
            for name in sorted(first)}


def merge_folders(spec: MergeSpec, out: Path, overwrite: bool = False, progress: bool = True) -> Path:
    """Merge `spec`'s folders into the Hugging Face folder `out` (weights, config with the merge recorded,
    generation config, tokenizer) and return it. Everything is checked before anything is written."""
    out = Path(out)
    paths = ([spec.base] if spec.base is not None else []) + list(spec.models)
    for path in paths:
        if not path.is_dir():
            raise MergeError(f"{path}: no such folder; give Hugging Face model folders (save_pretrained's)")
    _check_out(out, overwrite, paths)
    folders = [_Folder(p) for p in paths]
    vocab_names = check_compatible(folders)
    base = folders[0] if spec.base is not None else None
    models = folders[1:] if base is not None else folders
    rows = [f.config.get("vocab_size") or 0 for f in folders]
    if vocab_names:
        any_vocab = sorted(vocab_names)[0]
        rows = [f.shape(any_vocab)[0] for f in folders]
    shared_rows = rows[0] if base is not None else min(rows)
    if base is not None and min(rows) < shared_rows:
        small = folders[rows.index(min(rows))]
        raise MergeError(f"{small.path} has {min(rows)} vocabulary rows, fewer than the base's {shared_rows}: a "
                         "merged model continues the base, whose every row each model must have")
    tokenizer_source = _check_tokenizers(folders, rows)

    started = time.perf_counter()
    generator = torch.Generator().manual_seed(spec.seed) if spec.dare else None
    dtype_source = folders[0]
    merged: dict[str, torch.Tensor] = {}
    parameters = 0
    for name in tqdm(sorted(dtype_source.files), desc="merge", unit="tensor", disable=not progress):
        merged[name] = _merge_tensor(spec, dtype_source.tensor(name), [m.tensor(name) for m in models],
                                     base.tensor(name) if base is not None else None,
                                     shared_rows if name in vocab_names else None, generator)
        parameters += merged[name].numel() if merged[name].is_floating_point() else 0

    extra_rows = max(rows) - shared_rows
    config = dict(dtype_source.config)
    config["vocab_size"] = max(rows)
    config[RECORD_KEY] = {
        **spec.record(),
        "vocabulary": {"shared_rows": shared_rows, "rows": max(rows),
                       "rows_past_shared_from": [str(f.path) for f, r in zip(models, rows[-len(models):])
                                                 if r > shared_rows],
                       "tokenizer_from": str(tokenizer_source.path)},
    }
    _write(out, merged, config, dtype_source.path, tokenizer_source.path)
    print(f"merged {len(models)} model(s) by {spec.method} into {out}: {len(merged)} tensors, "
          f"{parameters / 1e6:.1f}M parameters, {extra_rows} vocabulary rows past the shared {shared_rows}, "
          f"in {time.perf_counter() - started:.1f}s", flush=True)
    return out


def _write(out: Path, tensors: dict[str, torch.Tensor], config: dict[str, Any], config_source: Path,
           tokenizer_source: Path) -> None:
    """The folder written beside `out` and renamed into place, so `out` is never half a model."""
    from safetensors.torch import save_file

    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    save_file(tensors, staging / "model.safetensors", metadata={"format": "pt"})
    (staging / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if (config_source / "generation_config.json").is_file():
        shutil.copyfile(config_source / "generation_config.json", staging / "generation_config.json")
    copy_tokenizer(tokenizer_source, staging)
    if out.exists():
        shutil.rmtree(out)
    os.replace(staging, out)


# ---- the command ------------------------------------------------------------------------------------------


def _weights(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(w) for w in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--weights {text!r}: expected numbers separated by commas, e.g. 0.3,0.7") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m trainer.merge", allow_abbrev=False,
        description="Merge Hugging Face causal LM folders of one architecture (e.g. runs continued from one model "
                    "and exported with --save-hf) into a new folder that AutoModelForCausalLM and AutoTokenizer "
                    "load. Costs no training: seconds on the CPU for small models.",
        epilog="Examples: interpolate two runs, 30%% of A: --method linear --model A --model B --weights 0.7,0.3. "
               "TIES of two runs continued from BASE: --method ties --base BASE --model A --model B --density 0.2. "
               "Embedding rows past the base's (an extended tokenizer) come from the models that have them; the "
               "output's config.json records the merge under replaymix_merge.")
    p.add_argument("--method", choices=METHODS, required=True,
                   help="linear: weighted mean of the models; task_arithmetic: base + lambda x sum of weighted task "
                        "vectors (model - base); ties: task vectors trimmed to --density, signs elected by mass, "
                        "disjoint mean, base + lambda x that (required)")
    p.add_argument("--model", action="append", type=Path, default=[], required=True, metavar="PATH",
                   help="a model folder to merge; repeat for each")
    p.add_argument("--base", type=Path, metavar="PATH",
                   help="the model the others were continued from (task_arithmetic, ties; default: none)")
    p.add_argument("--weights", type=_weights, default=(), metavar="W,...",
                   help="one weight per --model, in order (default: 1 each; linear divides by their sum)")
    p.add_argument("--density", type=float, default=1.0,
                   help="share of each task vector kept, in (0, 1]: by magnitude for ties, at random with --dare "
                        "(default %(default)s: all; the TIES recipe uses 0.2)")
    p.add_argument("--lambda", dest="lam", type=float, default=1.0, metavar="LAMBDA",
                   help="scale of the merged task vector (default %(default)s)")
    p.add_argument("--dare", action="store_true",
                   help="drop task-vector entries at random (keep --density, rescale by 1/density) instead of "
                        "trimming by magnitude: DARE-TIES or DARE-linear (default: off)")
    p.add_argument("--seed", type=int, default=0, help="seed of --dare's drops (default %(default)s)")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="the merged model's folder (required)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out (default: refused)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (default: a bar)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        spec = MergeSpec(method=args.method, models=tuple(args.model), base=args.base, weights=args.weights,
                         density=args.density, lam=args.lam, dare=args.dare, seed=args.seed)
        merge_folders(spec, args.out, overwrite=args.overwrite, progress=not args.no_progress)
    except TrainerError as e:
        return report_user_error(e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
