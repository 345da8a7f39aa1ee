"""metrics.jsonl: one JSON object per logged step ("kind": "train") and per evaluation ("kind": "eval").

Steps, here as everywhere in replaymix, count optimizer updates done: step s is the model after s updates.
The update from step s to s + 1 trains on the batch the mixer (in-process or the service) numbers s, so
step numbers and the service's batch numbers are one count. A train record says `"step": s + 1` (the step
that update reached) and `"batch_step": s` (the batch it trained on: the number to compare with the
service's mix stages and /v1/batches/{step}); an eval record's `"step"` is the step whose model it measured
(0: before any update). A checkpoint of step s (checkpoints/step-00000s.pt) holds the model after s updates,
and resuming from it fetches batch s next.

Appended by rank 0 as the run goes; a resumed run first drops the records its checkpoint does not cover,
so the file always reads as one uninterrupted run. `read_metrics` is what `trainer.report` uses.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.atomic_file import write_atomically
from trainer.errors import TrainerError

METRICS_NAME = "metrics.jsonl"


class MetricsError(TrainerError):
    """A run's metrics file is missing or damaged; the message names it."""


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Records of a metrics.jsonl (or of RUN_DIR/metrics.jsonl); a torn last line from a crash is skipped."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_NAME
    if not path.is_file():
        raise MetricsError(f"{path}: no metrics; is this a RUN_DIR written by `python -m trainer`?")
    records, lines = [], path.read_text().splitlines()
    for number, line in enumerate(lines, start=1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number != len(lines):
                raise MetricsError(f"{path}:{number}: not a JSON line; the metrics file is damaged") from None
    return records


class MetricsLog:
    def __init__(self, run_dir: Path, resume_step: int | None):
        self.path = Path(run_dir) / METRICS_NAME
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("")
        elif self.path.exists():
            kept = [r for r in read_metrics(self.path) if r["step"] <= resume_step]
            self._rewrite(kept)

    def _rewrite(self, records: list[dict[str, Any]]) -> None:
        write_atomically(self.path, "".join(json.dumps(r) + "\n" for r in records))

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
