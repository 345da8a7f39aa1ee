"""A recipe's merges: the alternative to replay that costs no training, built and scored beside the runs.

After an update's full run, its start model (the Hugging Face folder or checkpoint it continued, grown as
the run grew it when the update grows the model) and its continued model (the run's final checkpoint) are
merged in memory by `trainer.merge.merge_state_dicts` (linear: WiSE-FT's interpolation; task arithmetic and
TIES: the task vector continued minus start, scaled by lambda, TIES trimmed to its largest entries). The rows
an extended tokenizer added exist in the continued model only and are taken from it (trainer/merge.py's
rule); the merged model has the continued one's architecture. It is scored on the full run's validation
windows (`trainer.evaluate.score`), so its losses sit in the run table, and its record,
OUTPUT/merges/UPDATE/NAME.json, is reused while its inputs and settings are unchanged (the runner's
one rule, `StepRecords`).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from recipe.plan import MergeStep
from trainer.checkpoint import load_checkpoint
from trainer.evaluate import score
from trainer.growth import GrowSpec, grow
from trainer.hf_model import from_record, load_hf_model
from trainer.merge import merge_state_dicts


@dataclass(frozen=True)
class Merged:
    name: str
    about: str
    losses: dict[str, float]
    seconds: float


def describe(step: MergeStep) -> str:
    o = step.option
    if o.method == "linear":
        return f"linear: {1 - o.alpha:g} x start + {o.alpha:g} x continued"
    trimmed = f", density {o.density:g}" if o.method == "ties" else ""
    return f"{o.method}: start + {o.lam:g} x (continued - start){trimmed}"


def start_weights(step: MergeStep) -> dict[str, torch.Tensor]:
    """The update's start model's state dict (as the trainer's wrapper names it), from a checkpoint or a Hugging
    Face folder; grown as the update's run grew it (same spec and seed: identity blocks, or experts behind the
    same router), so that it has the continued model's shape and still computes what the start did."""
    if step.start.is_dir():
        model = load_hf_model(str(step.start), "float32")
    else:
        payload = load_checkpoint(step.start)
        model = from_record(payload["model_config"])
        model.load_state_dict(payload["model"])
    if step.grow is not None:
        model = grow(model, GrowSpec.parse(step.grow), seed=step.seed)
    return model.state_dict()


def build_and_score(step: MergeStep) -> Merged:
    """`step`'s merge made and scored, its record written (renamed into place)."""
    started = time.perf_counter()
    spec = step.spec()
    continued = load_checkpoint(step.continued)
    start = start_weights(step)
    if spec.method == "linear":
        weights = merge_state_dicts(spec, [start, continued["model"]])
    else:
        weights = merge_state_dicts(spec, [continued["model"]], base=start)
    model = from_record(continued["model_config"])  # the continued model's architecture (its vocabulary)
    model.load_state_dict(weights)
    with torch.no_grad():
        losses = score(model, step.eval_datasets, step.seq_len, step.eval_batches, step.micro_batch, step.device)
    merged = Merged(step.name, describe(step), losses, time.perf_counter() - started)
    step.record.parent.mkdir(parents=True, exist_ok=True)
    partial = step.record.with_suffix(".partial")
    partial.write_text(json.dumps({**merged.__dict__, **step.settings()}, indent=2))
    partial.rename(step.record)
    return merged


def read(step: MergeStep) -> Merged | None:
    """The merge's record, or None before it is made."""
    if not step.record.is_file():
        return None
    saved = json.loads(step.record.read_text())
    return Merged(saved["name"], saved["about"], saved["losses"], saved["seconds"])
