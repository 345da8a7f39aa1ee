"""Dashboards beside metrics.jsonl (`--log-to tensorboard,wandb`): every record the run writes, as charts.

Each metrics.jsonl record becomes scalars at its step, under these names in both loggers:

    train/loss, train/lr, train/grad_norm, train/tokens_per_s, train/data_wait_share, train/max_memory_gib
    replay/share/NAME         the share of the step's rows that came from dataset NAME (the batch's sources):
                              the replay share in force at each step, whatever decided it
    eval/loss/NAME, eval/forgetting/NAME, eval/adaptation/NAME
    downstream/TASK/METRIC    with --downstream-tasks (trainer/downstream.py)

and with --stream, each change of the service's mix as it is learnt of (a stage an operator or the service's
controller added; the controller's reason included): mix/weight/NAME, mix/start_step, and a text line
"mix/change". So the share in force, the changes that set it and the forgetting they cause are on one
time axis, the trainer's step.

TensorBoard: event files in RUN_DIR/tensorboard (a resumed run drops the events past its checkpoint, as
metrics.jsonl does). Weights & Biases: offline by default (`WANDB_MODE`, if set, decides: `online` where a
network and a key exist), files under RUN_DIR/wandb, one W&B run per replaymix run (its id kept in
RUN_DIR/wandb/run-id, so a resume continues it); `wandb sync RUN_DIR/wandb/offline-run-*` uploads them.
Both are optional packages (the `dashboards` extra); rank 0 alone writes.
"""

from __future__ import annotations

import importlib.util
import os
import uuid
from pathlib import Path
from typing import Any, Iterable, Mapping

from trainer.errors import TrainerError

# --log-to name -> (the module it imports, the pip package that provides it)
LOGGERS = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb")}
EXTRA = "dashboards"


def parse_loggers(text: str) -> tuple[str, ...]:
    """--log-to's comma list, checked against the known loggers and their installed packages."""
    names = tuple(dict.fromkeys(name.strip() for name in text.split(",") if name.strip()))
    unknown = [name for name in names if name not in LOGGERS]
    if unknown or not names:
        raise TrainerError(f"--log-to {text!r}: {'unknown logger ' + ', '.join(unknown) if unknown else 'no logger'}; "
                           f"choose from {', '.join(LOGGERS)} (comma-separated)")
    for name in names:
        module, package = LOGGERS[name]
        if importlib.util.find_spec(module) is None:
            raise TrainerError(f"--log-to {name}: the {package} package is not installed; install the {EXTRA} extra "
                               f"(pip install 'replaymix[{EXTRA}]', or pip install {package})")
    return names


def scalars(record: Mapping[str, Any]) -> dict[str, float]:
    """The charted values of one metrics.jsonl record, by chart name."""
    out: dict[str, float] = {}
    if record["kind"] == "train":
        for key in ("loss", "lr", "grad_norm", "tokens_per_s", "data_wait_share", "max_memory_gib"):
            if key in record:
                out[f"train/{key}"] = float(record[key])
        out.update({f"replay/share/{name}": float(share) for name, share in record["source_share"].items()})
    elif record["kind"] == "downstream":
        out.update({f"downstream/{task}/{metric}": float(value) for task, metrics in record["scores"].items()
                    for metric, value in metrics.items()})
    elif record["kind"] == "eval":
        for key, chart in (("val_loss", "eval/loss"), ("forgetting", "eval/forgetting"),
                           ("adaptation", "eval/adaptation")):
            out.update({f"{chart}/{name}": float(value) for name, value in record.get(key, {}).items()})
    return out


def mix_change_text(entry: Mapping[str, Any]) -> str:
    """One line for a change of the service's mix log."""
    stage = entry.get("stage") or {}
    weights = ", ".join(f"{name}={weight:g}" for name, weight in stage.get("weights", {}).items())
    reason = f" ({entry['reason']})" if entry.get("reason") else ""
    return f"{entry.get('by', '?')}: {entry['op']} {weights} from step {stage.get('start_step')}{reason}"


class Dashboards:
    """The loggers --log-to names, open for the run in `run_dir`."""

    def __init__(self, names: Iterable[str], run_dir: Path, config: Mapping[str, Any], resume_step: int | None):
        self.names = tuple(names)
        self._tensorboard = self._wandb = None
        if "tensorboard" in self.names:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: the events past the checkpoint a resumed run goes on from are dropped.
            self._tensorboard = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=resume_step)
        if "wandb" in self.names:
            self._wandb = _open_wandb(run_dir, config, resume_step is not None)

    def record(self, record: Mapping[str, Any]) -> None:
        """A metrics.jsonl record, as charts at its step."""
        self._log(scalars(record), record["step"])

    def mix_changes(self, step: int, entries: Iterable[Mapping[str, Any]]) -> None:
        """Changes of the mix, learnt of at `step`: the weights and start step of the last stage among them,
        and a line of text for each."""
        entries = list(entries)
        if not entries:
            return
        values: dict[str, float] = {}
        for entry in entries:
            stage = entry.get("stage") or {}
            values.update({f"mix/weight/{name}": float(w) for name, w in stage.get("weights", {}).items()})
            if stage.get("start_step") is not None:
                values["mix/start_step"] = float(stage["start_step"])
        self._log(values, step)
        text = "\n".join(mix_change_text(entry) for entry in entries)
        if self._tensorboard is not None:
            self._tensorboard.add_text("mix/change", text, step)
        if self._wandb is not None:
            self._wandb.log({"mix/change": text}, step=step)

    def _log(self, values: Mapping[str, float], step: int) -> None:
        if self._tensorboard is not None:
            for name, value in values.items():
                self._tensorboard.add_scalar(name, value, step)
        if self._wandb is not None and values:
            # W&B's steps only grow: a record at the step already logged joins it.
            self._wandb.log(dict(values), step=step)

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()
        if self._wandb is not None:
            self._wandb.finish()


def _open_wandb(run_dir: Path, config: Mapping[str, Any], resume: bool) -> Any:
    import wandb

    folder = run_dir / "wandb"
    folder.mkdir(parents=True, exist_ok=True)
    id_file = folder / "run-id"
    run_id = id_file.read_text().strip() if resume and id_file.is_file() else uuid.uuid4().hex[:12]
    id_file.write_text(run_id + "\n")
    return wandb.init(project=os.environ.get("WANDB_PROJECT", "replaymix"), name=run_dir.name, id=run_id,
                      dir=str(run_dir), config=dict(config), resume="allow",
                      mode=os.environ.get("WANDB_MODE", "offline"), settings=wandb.Settings(quiet=True))
