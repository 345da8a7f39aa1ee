"""Checkpoints: model, optimizer, step, RNG and the run's first evaluation, written atomically.

Layout under RUN_DIR/checkpoints/: `latest.pt` (rewritten every --checkpoint-every steps and at the end;
what --resume reads), `step-NNNNNN.pt` for each --save-at step, `final.pt` at the end. Each also records
the run's config (which --resume holds the flags to) and its learning-rate schedule fully resolved (which
--resume and --continue-schedule follow, whatever phase lengths their own flags would derive).
An --fsdp run writes each as a folder of shards instead, `latest.dcp/` and so on: what such a folder is
named and holds besides the shards (`trainer.pt`), and how to find a whole one, are here; writing and
loading the shards is `trainer/fsdp.py`'s.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from pipeline.atomic_file import atomic_writer
from trainer.errors import TrainerError

if TYPE_CHECKING:
    from trainer.hf_model import HFCausalLM

CHECKPOINT_DIR = "checkpoints"
LATEST = "latest.pt"
FINAL = "final.pt"
SHARDED_SUFFIX = ".dcp"  # an --fsdp run's checkpoints: folders of shards (trainer/fsdp.py)
# What a sharded checkpoint holds besides the shards (written by rank 0).
TRAINER_STATE = "trainer.pt"
# A Hugging Face model's tokenizer, copied here at the run's first checkpoint: the run carries what it trains with.
TOKENIZER_DIR = "tokenizer"


class CheckpointError(TrainerError):
    """A checkpoint is missing, unreadable, or does not fit the run; the message names the file."""


def named_checkpoint(step: int) -> str:
    return f"step-{step:06d}.pt"


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def trainer_state(model: HFCausalLM, step: int, first_eval: dict[str, float] | None,
                  run_config: dict[str, Any], schedule: dict[str, Any] | None) -> dict[str, Any]:
    """Everything a checkpoint holds besides the weights and optimizer state (which a sharded checkpoint
    keeps in shards beside it)."""
    return {
        "model_config": model.record(),  # what rebuilds the architecture: a Hugging Face config
        "step": step,
        "rng": rng_state(),
        "first_eval": first_eval,
        "run_config": run_config,
        "schedule": schedule,
    }


def save_checkpoint(
    path: Path,
    model: HFCausalLM,
    optimizer: torch.optim.Optimizer,
    step: int,
    first_eval: dict[str, float] | None,
    run_config: dict[str, Any],
    schedule: dict[str, Any] | None = None,
) -> None:
    """Write atomically and durably (`pipeline.atomic_file`): a crash mid-write never leaves a half
    checkpoint, and one written survives a power loss, since a run resumes from it.

    `schedule` is the run's `RunSchedule.record()`; without it the checkpoint can seed a new run with its own
    schedule but cannot be resumed or continued with --continue-schedule."""
    payload = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
               **trainer_state(model, step, first_eval, run_config, schedule)}
    with atomic_writer(path) as f:
        torch.save(payload, f)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A `.pt` checkpoint's payload; for a sharded checkpoint folder, everything but the model's and
    optimizer's shards, which only a sharded model can take (`trainer.fsdp.load_sharded`)."""
    path = Path(path)
    if path.is_dir():
        return _load_trainer_state(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint; check --init-from, or drop --resume to start afresh")
    try:
        # Our own files: the RNG states are numpy objects, which weights_only loading rejects.
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # torch raises several types for truncated or foreign files
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(e).__name__}: {e})") from e
    missing = {"model_config", "model", "optimizer", "step"} - set(payload)
    if missing:
        raise CheckpointError(f"{path}: not a replaymix trainer checkpoint (missing {sorted(missing)})")
    return payload


def latest_checkpoint(run_dir: Path) -> Path | None:
    """checkpoints/latest.pt, or an --fsdp run's checkpoints/latest.dcp/ (None: neither is there)."""
    path = Path(run_dir) / CHECKPOINT_DIR / LATEST
    if path.is_file():
        return path
    return _sharded_in_place(path.with_name(sharded_name(LATEST)))


def is_sharded_checkpoint(path: Path) -> bool:
    """A folder of shards (an --fsdp run's), not a `.pt` file."""
    return Path(path).is_dir()


def sharded_name(name: str) -> str:
    """latest.pt -> latest.dcp: the folder a sharded run writes where a plain run writes the file."""
    return name.removesuffix(".pt") + SHARDED_SUFFIX


def _sharded_in_place(path: Path) -> Path | None:
    """The complete sharded checkpoint named `path`: itself, or the one a crash left set aside mid-replace."""
    for candidate in (path, path.with_name(path.name + ".old")):
        if (candidate / TRAINER_STATE).is_file() and (candidate / ".metadata").is_file():
            return candidate
    return None


def _load_trainer_state(path: Path) -> dict[str, Any]:
    """What a sharded checkpoint holds besides the shards, as a `.pt` checkpoint's payload without "model"
    and "optimizer" (those are loaded into the sharded model by `load_sharded`)."""
    try:
        # Our own file: the RNG states are numpy objects, which weights_only loading rejects.
        return torch.load(path / TRAINER_STATE, map_location="cpu", weights_only=False)
    except Exception as e:  # torch raises several types for truncated or foreign files
        raise CheckpointError(f"{path / TRAINER_STATE}: not a readable sharded checkpoint ({type(e).__name__}: {e})") from e
