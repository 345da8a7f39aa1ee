"""The recipe file: one YAML document naming the model, the corpora, the replay policy and the compute.

Every key is a field of a pydantic model below, with its default and a description; `python -m recipe
--help` and the README's key table are generated from these models (`key_table`), so they cannot drift.
Loading (`load_recipe`) turns any mistake into one `RecipeError` naming the file, the line and the key,
with the nearest valid key for a misspelt one. Relative paths are relative to the recipe file's folder.
"""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator,
                      model_validator)

from recipe.errors import RecipeError

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Corpus(Strict):
    """A corpus: a path, or a mapping with these keys."""

    path: str = Field(description="local file, folder or glob (JSONL, Parquet, Arrow, .txt), s3://..., gs://... "
                                  "or hf://datasets/ORG/NAME")
    eval: str | None = Field(None, description="held-out text of this corpus, scored whole (default: the corpus's "
                                               "own validation split, data.val_fraction of its documents)")
    weight: float = Field(1.0, gt=0, description="its part of its group's share (old corpora share the replay "
                                                 "share, new corpora the rest), relative to the group's others")
    text_field: str = Field("text", description="the JSON field or column holding the text")
    split: str | None = Field(None, description="the split of a DatasetDict folder or hf:// dataset")
    config: str | None = Field(None, description="the configuration (subset) of an hf:// dataset")

    @model_validator(mode="before")
    @classmethod
    def _path_alone(cls, value: Any) -> Any:
        return {"path": value} if isinstance(value, str) else value


class Tokenizer(Strict):
    extend: int = Field(0, ge=0, description="append up to N pieces learned from this update's new corpora "
                                             "(`pipeline.tokenizer extend`); 0 keeps the tokenizer")


class Stage(Strict):
    at: int = Field(ge=0, description="the first step of this stage")
    share: float = Field(ge=0, le=1, description="the replayed (old) share of every batch from `at` on")


class Choose(Strict):
    budget: float = Field(gt=0, description="the largest forgetting a share may show: the peak relative rise of "
                                            "any replayed corpus's validation loss over the pilot (0.05 = 5%)")
    otherwise: Literal["largest", "stop"] = Field(
        "largest", description="when no share stays within the budget: train with the largest, or stop")


class Replay(Strict):
    """Give exactly one of share, stages, budget or sweep."""

    share: float | None = Field(None, ge=0, le=1, description="a fixed replayed share of every batch "
                                                              "(default 0.05 when nothing else is given)")
    stages: list[Stage] | None = Field(None, description="shares by step: [{at: 0, share: 0.05}, {at: 500, "
                                                         "share: 0.25}]")
    budget: float | None = Field(None, gt=0, description="hold forgetting (relative rise of the old validation "
                                                         "loss) within this with the least replay: the service's "
                                                         "forgetting-budget controller")
    start_share: float = Field(0.05, ge=0, le=1, description="budget: the share the controller starts from")
    min_share: float = Field(0.0, ge=0, le=1, description="budget: the least share it may choose")
    max_share: float = Field(0.5, ge=0, le=1, description="budget: the most share it may choose")
    sweep: list[float] | None = Field(None, description="shares to try in short pilots from the same start, "
                                                        "e.g. [0, 0.01, 0.05, 0.25]")
    pilot_steps: int | None = Field(None, gt=0, description="sweep: steps of each pilot")
    choose: Choose | None = Field(None, description="sweep: the rule picking the share (smallest within budget)")
    then: Literal["fixed", "controller"] = Field(
        "fixed", description="sweep: train the full run at the chosen share, or hand it to the controller as its "
                             "start with choose.budget")
    old: str | None = Field(None, description="budget: the old corpus the controller holds (default: the only one)")

    @model_validator(mode="after")
    def _one_policy(self) -> "Replay":
        given = [k for k in ("share", "stages", "budget", "sweep") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"give one replay policy, not {' and '.join(given)}")
        if self.sweep is not None:
            if not self.sweep or any(not 0 <= s <= 1 for s in self.sweep):
                raise ValueError(f"sweep {self.sweep}: every share must be in [0, 1], e.g. [0, 0.01, 0.05, 0.25]")
            if self.choose is None:
                raise ValueError("a sweep needs its rule: choose: {budget: B} (the smallest share whose forgetting "
                                 "stays within B)")
            if self.pilot_steps is None:
                raise ValueError("a sweep needs pilot_steps: N, the length of each pilot")
        elif self.choose is not None or self.pilot_steps is not None:
            raise ValueError("choose and pilot_steps belong to a sweep: add sweep: [shares] or drop them")
        if self.stages is not None and (not self.stages or self.stages[0].at != 0):
            raise ValueError("stages start with one at: 0")
        return self

    @property
    def kind(self) -> str:
        return next((k for k in ("stages", "budget", "sweep") if getattr(self, k) is not None), "share")

    @property
    def fixed_share(self) -> float:
        return 0.05 if self.share is None else self.share


class Schedule(Strict):
    kind: Literal["cosine", "infinite", "wsd", "continue"] = Field(
        "cosine", description="cosine: re-warmed and re-decayed; infinite or wsd: the paper's schedule that needs no "
                              "re-warm later; continue: the previous update's infinite or wsd schedule at its constant rate, from its checkpoint before the final decay, not re-warmed")
    max_lr: float = Field(3e-4, gt=0, description="peak learning rate")
    min_lr: float = Field(3e-5, ge=0, description="final learning rate")
    warmup_steps: int | None = Field(None, ge=0, description="re-warm length (default 1% of the steps)")
    decay_steps: int | None = Field(None, gt=0, description="infinite/wsd/continue: final decay (default the "
                                                            "trainer's)")


class MergeOption(Strict):
    """A merge of the update's start model and its continued model, scored beside the runs (no training)."""

    method: Literal["linear", "task_arithmetic", "ties"] = Field(
        description="linear: (1 - alpha) x start + alpha x continued (WiSE-FT); task_arithmetic: start + lambda "
                    "x (continued - start); ties: the same task vector trimmed to its largest entries (density)")
    alpha: float = Field(0.5, ge=0, le=1, description="linear: the continued model's weight")
    density: float = Field(1.0, gt=0, le=1, description="ties: the share of the task vector's entries kept, by "
                                                        "magnitude (the TIES paper keeps 0.2)")
    lam: float = Field(1.0, alias="lambda", description="task_arithmetic, ties: the task vector's scale")
    name: str | None = Field(None, description="its row's name (default: merge-METHOD-VALUE, e.g. merge-linear-0.5)")

    @model_validator(mode="after")
    def _keys_of_its_method(self) -> "MergeOption":
        given = self.model_fields_set
        if "alpha" in given and self.method != "linear":
            raise ValueError(f"alpha weighs the two models of a linear merge; {self.method} adds the task vector "
                             "scaled by lambda: drop alpha or use method: linear")
        if "density" in given and self.method != "ties":
            raise ValueError(f"density trims the task vector of a ties merge; drop it for {self.method}")
        if "lam" in given and self.method == "linear":
            raise ValueError("lambda scales a task vector, which a linear merge has none of; use alpha")
        if self.name is not None and not NAME.match(self.name):
            raise ValueError(f"name {self.name!r}: use letters, digits, '.', '_' or '-'")
        return self

    @property
    def label(self) -> str:
        value = {"linear": self.alpha, "ties": self.density, "task_arithmetic": self.lam}[self.method]
        return self.name or f"merge-{self.method}-{value:g}"


class Update(Strict):
    name: str = Field(description="this update's name: its runs go to OUTPUT/runs/NAME")
    new: dict[str, Corpus] = Field(description="the new corpora, by name: {de: data/de.jsonl}")
    tokenizer: Tokenizer = Field(Tokenizer(), description="keep the tokenizer, or extend it from the new corpora")
    replay: Replay = Field(Replay(), description="how much of every earlier corpus each batch replays")
    steps: int = Field(gt=0, description="optimizer updates of the full run")
    schedule: Schedule = Field(Schedule(), description="the learning-rate schedule")
    grow: str | None = Field(None, description="grow the model at this update's start (its pilots too), so that it "
                                               "computes what it did: blocks:N inserts N identity blocks (LLaMA "
                                               "Pro), experts:E,top_k:K upcycles every MLP into a Mixtral of E "
                                               "experts; later updates continue the grown model")
    train: Literal["all", "new-blocks"] = Field(
        "all", description="which parameters train: all, or new-blocks (only the blocks grow: blocks:N inserts, "
                           "and the rows of tokens an extension added)")
    merges: list[MergeOption] = Field([], description="merges of the start and continued models to score beside "
                                                      "the runs, e.g. [{method: linear, alpha: 0.5}, {method: ties, "
                                                      "density: 0.2}]")

    @field_validator("grow")
    @classmethod
    def _parsable(cls, grow: str | None) -> str | None:
        if grow is None:
            return None
        from trainer.growth import GrowSpec, GrowthError  # torch and transformers: only when a recipe grows

        try:
            return str(GrowSpec.parse(grow))
        except GrowthError as e:
            raise ValueError(str(e).replace("--grow ", "", 1)) from None

    @field_validator("train")
    @classmethod
    def _blocks_to_train(cls, train: str, info: ValidationInfo) -> str:
        grow = info.data.get("grow")
        if train == "new-blocks" and not (grow or "").startswith("blocks:"):
            raise ValueError("new-blocks trains the blocks that grow: blocks:N inserts; add grow: blocks:N to this "
                             "update, or train: all")
        return train

    @model_validator(mode="after")
    def _merges(self) -> "Update":
        labels = [m.label for m in self.merges]
        twice = sorted({label for label in labels if labels.count(label) > 1})
        if twice:
            raise ValueError(f"merges: two are named {twice[0]}; give each its own name")
        return self


class Data(Strict):
    seq_len: int = Field(256, gt=0, description="tokens per training sequence")
    global_batch: int = Field(32, gt=0, description="sequences per step over all ranks")
    micro_batch: int = Field(8, gt=0, description="sequences per forward pass on one rank")
    val_fraction: float = Field(0.05, ge=0, lt=1, description="documents of each corpus held out as its "
                                                              "validation split (by a hash of their text)")
    seed: int = Field(0, description="which samples make each batch (the service's seed)")


class Evaluation(Strict):
    every: int = Field(50, gt=0, description="evaluate every N steps (and at the first and last)")
    batches: int = Field(4, gt=0, description="micro-batches of each validation set per evaluation")


class Training(Strict):
    checkpoint_every: int = Field(50, gt=0, description="checkpoint every N steps: a killed job resumes there")
    seed: int = Field(0, description="a fresh model's initialisation")
    dtype: Literal["float32", "bfloat16"] = Field("float32", description="the weights' and optimizer's dtype")
    compile: bool = Field(False, description="torch.compile the model")


class Compute(Strict):
    launcher: Literal["process", "torchrun", "ray"] = Field(
        "process", description="the trainer as one process, torchrun ranks, or Ray Train workers")
    workers: int = Field(1, gt=0, description="torchrun ranks or Ray Train workers")
    device: Literal["cpu", "cuda"] = Field("cpu", description="where to train")
    fsdp: bool = Field(False, description="shard weights and optimizer state over the ranks (FSDP2)")
    ray_address: str | None = Field(None, description="the Ray cluster for the pipeline steps (default: "
                                                      "$RAY_ADDRESS, set by `ray job submit`; else a local Ray "
                                                      "started by the job)")
    cpus: int | None = Field(None, gt=0, description="CPUs of the local Ray (default: all)")
    threads: int | None = Field(None, gt=0, description="torch threads of each trainer process (default: torch's)")
    work_dir: str | None = Field(None, description="an output in an object store only: the local working copy "
                                                   "the steps write, uploaded as they finish (default: "
                                                   "~/.cache/replaymix/recipes/NAME, NAME the recipe's); give "
                                                   "it the same path on every machine that continues the recipe")


class Recipe(Strict):
    name: str | None = Field(None, description="the recipe's name (default: the file's stem); an output folder "
                                               "holds one recipe's results")
    model: str = Field(description="hf:PATH (a save_pretrained folder with its tokenizer) or a fresh Llama's size "
                                   "(test, tiny, 125m, 350m)")
    tokenizer: str | None = Field(None, description="the model's tokenizer folder or .model (default: the hf: "
                                                    "folder's own; required for a fresh size)")
    old: dict[str, Corpus] = Field(description="the corpora the model was trained on (replay sources), by name: "
                                               "{en: data/en-sample.jsonl}")
    updates: list[Update] = Field(min_length=1, description="the updates in order, each continuing the last "
                                                            "one's model")
    data: Data = Field(Data(), description="batch geometry and held-out split")
    evaluation: Evaluation = Field(Evaluation(), description="how often and how much to evaluate")
    training: Training = Field(Training(), description="checkpoints, seed, dtype")
    compute: Compute = Field(Compute(), description="processes, devices and the Ray cluster")
    output: str = Field(description="the folder every result goes to, or s3://BUCKET/PREFIX or gs://BUCKET/PREFIX: "
                                    "the output of record, the job working in compute.work_dir")

    @model_validator(mode="after")
    def _names(self) -> "Recipe":
        seen: set[str] = set()
        for where, names in (("old", self.old), *((f"updates.{u.name}.new", u.new) for u in self.updates)):
            for name in names:
                if not NAME.match(name) or name.endswith("-base"):
                    raise ValueError(f"{where}: corpus name {name!r}: use letters, digits, '.', '_' or '-' "
                                     "(not ending in -base, which names a corpus in the base encoding)")
                if name in seen:
                    raise ValueError(f"{where}: corpus name {name!r} is used twice; corpus names are unique")
                seen.add(name)
        if len({u.name for u in self.updates}) != len(self.updates):
            raise ValueError("two updates share a name; give each its own")
        return self

    @property
    def is_hf(self) -> bool:
        return self.model.startswith("hf:")

    @property
    def output_in_store(self) -> bool:
        return "://" in self.output

    def work_folder(self, name: str) -> Path:
        """Where the steps write: the output folder, or the local working copy of an object-store output."""
        if not self.output_in_store:
            return Path(self.output)
        return Path(self.compute.work_dir or f"~/.cache/replaymix/recipes/{name}").expanduser()


# ---------------------------------------------------------------------------------------------- loading


def load_recipe(path: Path) -> tuple[Recipe, str]:
    """The recipe in `path` and its name, paths made absolute against the file's folder."""
    try:
        text = path.read_text()
    except OSError as e:
        raise RecipeError(f"{path}: cannot read the recipe ({e.strerror}); give a YAML file") from None
    try:
        raw = yaml.safe_load(text)
        tree = yaml.compose(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise RecipeError(f"{path}{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: a recipe is a YAML mapping of keys (model, old, updates, output, ...)")
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as e:
        raise RecipeError(describe(e.errors()[0], path, tree)) from None
    return absolute(recipe, path.parent.resolve()), recipe.name or path.stem


def describe(error: dict, path: Path, tree: yaml.Node | None) -> str:
    """One line for pydantic's first error: file, line, key, what was wrong and what to do."""
    loc = [part for part in error["loc"]]
    key = ".".join(str(p) for p in loc) or "(top level)"
    line = line_of(tree, loc)
    where = f"{path} line {line}" if line else str(path)
    if error["type"] == "extra_forbidden":
        valid = list(model_at(loc[:-1]).model_fields)
        near = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.5)
        hint = f"did you mean {near[0]!r}?" if near else f"valid keys here: {', '.join(valid)}"
        return f"{where}: {key}: unknown key; {hint}"
    if error["type"] == "missing":
        return f"{where}: {key}: required key missing; add it (see `python -m recipe --help`)"
    message = re.sub(r"^Value error, ", "", error["msg"])
    if str(loc[-1:][0] if loc else "") in ("share", "start_share", "min_share", "max_share") or "share" in key:
        message += " (a share is the replayed fraction of each batch, in [0, 1])"
    return f"{where}: {key}: {message}"


def model_at(loc: list) -> type[BaseModel]:
    """The pydantic model that holds the key at `loc` (dict keys and list indices skipped)."""
    model: Any = Recipe
    for part in loc:
        if isinstance(part, int) or not (isinstance(model, type) and issubclass(model, BaseModel)):
            continue
        if part not in model.model_fields:
            continue  # a corpus name: the dict's value type follows
        annotation = model.model_fields[part].annotation
        model = _inner_model(annotation) or model
    return model


def _inner_model(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _inner_model(arg)
        if found:
            return found
    return None


def line_of(tree: yaml.Node | None, loc: list) -> int | None:
    """The 1-based line of the key (or item) at `loc` in the composed YAML, or the nearest enclosing one."""
    node, line = tree, None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            match = next(((k, v) for k, v in node.value if k.value == str(part)), None)
            if match is None:
                break
            line, node = match[0].start_mark.line + 1, match[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            break
    return line


def _absolute_path(value: str, base: Path) -> str:
    if "://" in value or value.startswith("hf:") or Path(value).is_absolute():
        return value
    return str(base / value)


def absolute(recipe: Recipe, base: Path) -> Recipe:
    """Every local path of the recipe made absolute against `base` (the recipe file's folder)."""
    def corpus(c: Corpus) -> Corpus:
        return c.model_copy(update={"path": _absolute_path(c.path, base),
                                    "eval": c.eval and _absolute_path(c.eval, base)})

    model = recipe.model
    if model.startswith("hf:"):
        model = "hf:" + _absolute_path(model[3:], base)
    return recipe.model_copy(update={
        "model": model,
        "tokenizer": recipe.tokenizer and _absolute_path(recipe.tokenizer, base),
        "old": {n: corpus(c) for n, c in recipe.old.items()},
        "updates": [u.model_copy(update={"new": {n: corpus(c) for n, c in u.new.items()}}) for u in recipe.updates],
        "output": _absolute_path(recipe.output, base),
        "compute": recipe.compute.model_copy(update={
            "work_dir": recipe.compute.work_dir and os.path.normpath(
                _absolute_path(os.path.expanduser(recipe.compute.work_dir), base))}),
    })


# ---------------------------------------------------------------------------------------------- documentation


def key_table(model: type[BaseModel] = Recipe, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default, description) of every key, nested keys dotted: what --help and the README list."""
    rows = []
    for name, field in model.model_fields.items():
        key = prefix + (field.alias or name)
        inner = _inner_model(field.annotation)
        shape = next((a for a in getattr(field.annotation, "__args__", ()) if a is not type(None)), None)
        origin = getattr(field.annotation, "__origin__", None) or getattr(shape, "__origin__", None)
        is_map, is_list = origin is dict, origin is list
        default = "required" if field.is_required() else ("-" if inner and field.default is not None else
                                                          repr(field.default) if field.default is not None else "none")
        if inner and not is_map and not is_list and field.default is not None:
            default = "-"
        rows.append((key, default, field.description or ""))
        if inner:
            sub = f"{key}.NAME." if is_map else f"{key}[]." if is_list else f"{key}."
            rows += key_table(inner, sub)
    return rows
