"""A run's folder (--out): what makes it hold a run, and the one rule for starting a run in one.

A folder holds a run once it has metrics.jsonl or anything under checkpoints/. Starting a run there would
truncate the one and overwrite the other, so it needs --resume (continue that run) or --overwrite (delete it,
asked for by name); without either it is refused before anything is read or written.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from trainer.checkpoint import CHECKPOINT_DIR, LATEST, latest_checkpoint
from trainer.errors import TrainerError
from trainer.metrics_log import METRICS_NAME


class RunDirError(TrainerError):
    """--out holds a run this command would destroy, or no run to resume; the message says which flag to give."""


def earlier_run(out: Path) -> list[str]:
    """The files of a run in `out`, relative to it (empty: `out` holds no run)."""
    found = [METRICS_NAME] if (out / METRICS_NAME).exists() else []
    checkpoints = out / CHECKPOINT_DIR
    if checkpoints.is_dir():
        found += sorted(f"{CHECKPOINT_DIR}/{path.name}" for path in checkpoints.iterdir())
    return found


def check_run_dir(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse what would destroy an earlier run in `out` or resume one that is not there."""
    found = earlier_run(out)
    resumable = latest_checkpoint(out) is not None
    if resume and not resumable:
        hint = ("the run there stopped before its first checkpoint: replace --resume with --overwrite to start it "
                "afresh" if found else "drop --resume to start a run there")
        raise RunDirError(f"{out / CHECKPOINT_DIR / LATEST}: nothing to resume; {hint}")
    if found and not (resume or overwrite):
        listed = ", ".join(found[:3]) + (f" and {len(found) - 3} more" if len(found) > 3 else "")
        to_resume = f"add --resume to continue it from {CHECKPOINT_DIR}/{LATEST}, " if resumable else ""
        raise RunDirError(f"{out} holds an earlier run ({listed}), which starting a run there would overwrite; "
                          f"{to_resume}add --overwrite to delete it and start afresh, or give another --out")


def delete_earlier_run(out: Path) -> None:
    """--overwrite: remove the run's metrics and checkpoints (nothing else in `out`), so no file of the old
    run is mistaken for the new one's."""
    (out / METRICS_NAME).unlink(missing_ok=True)
    shutil.rmtree(out / CHECKPOINT_DIR, ignore_errors=True)
