"""The merging rows: models built from runs that already exist, no training, scored as the runs are.

Phase 1's final model (English, annealed) and `replay-0`'s (German, no replay) are the two models a team
holds after a shift without replay; merging them is the alternative the literature sets beside replay:
- linear interpolation, `alpha` the weight on replay-0 (1 - alpha on phase 1), at each of `merge_alphas`;
- TIES relative to the phase-1 checkpoint both continued from (phase 1's anneal is one task vector,
  replay-0's German the other), at `ties_density`, lambda 1 (the reference recipe without a validation set).
The German rows the tokenizer extension added exist in replay-0 only and are taken from it (trainer/merge.py's
rule). Each merge is scored on the windows every phase-2 run is scored on (`trainer.evaluate.score`), so its
losses sit in the same table. A merge's record (WORK_DIR/merges/NAME.json) is reused while its checkpoints are
the same files (size and modification time); it costs seconds, and no training.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch

from demo.experiment_config import ExperimentConfig
from trainer.checkpoint import CHECKPOINT_DIR, FINAL, load_checkpoint, named_checkpoint
from trainer.evaluate import score
from trainer.hf_model import from_record
from trainer.merge import MergeSpec, merge_state_dicts

MERGES_DIR = "merges"
FROM = "replay-0"  # the run merged with phase 1: German without replay


@dataclass(frozen=True)
class Merge:
    name: str
    method: str  # "linear" or "ties"
    alpha: float = 0.5  # linear: the weight on replay-0
    density: float = 1.0  # ties: the share of each task vector kept

    @property
    def about(self) -> str:
        if self.method == "linear":
            return f"linear: {1 - self.alpha:.2f} x phase 1 + {self.alpha:.2f} x {FROM}"
        return f"TIES of phase 1 and {FROM} from the phase-1 checkpoint (density {self.density:g}, lambda 1)"


@dataclass(frozen=True)
class Merged:
    merge: Merge
    losses: dict[str, float]
    seconds: float


def merges(cfg: ExperimentConfig) -> tuple[Merge, ...]:
    return (*(Merge(f"merge-linear-{alpha:g}", "linear", alpha=alpha) for alpha in cfg.merge_alphas),
            Merge(f"merge-ties-{cfg.ties_density:g}", "ties", density=cfg.ties_density))


def checkpoints(cfg: ExperimentConfig) -> dict[str, Path]:
    """The checkpoints the merges are built from: phase 1's end and start point of phase 2, replay-0's end."""
    runs = cfg.work_dir / "runs"
    return {"phase1": runs / "phase1-en" / CHECKPOINT_DIR / FINAL,
            "base": runs / "phase1-en" / CHECKPOINT_DIR / named_checkpoint(cfg.phase1_anneal_start),
            FROM: runs / FROM / CHECKPOINT_DIR / FINAL}


def _stamp(paths: Mapping[str, Path]) -> dict[str, list]:
    return {name: [str(p), p.stat().st_size, p.stat().st_mtime_ns] for name, p in paths.items()}


def build_and_score(cfg: ExperimentConfig, eval_datasets: Mapping[str, str]) -> list[Merged]:
    """Every merge's validation losses on `eval_datasets` (a phase-2 run's), from its record or made now;
    [] when the runs it is built from are not there (a run of the demo without replay-0)."""
    sources = checkpoints(cfg)
    if not all(p.is_file() for p in sources.values()):
        return []
    stamp, out = _stamp(sources), cfg.work_dir / MERGES_DIR
    settings = {"eval_datasets": dict(eval_datasets), "seq_len": cfg.seq_len, "eval_batches": cfg.eval_batches,
                "micro_batch": cfg.micro_batch}
    results, loaded = [], None
    for merge in merges(cfg):
        record = out / f"{merge.name}.json"
        if record.is_file():
            saved = json.loads(record.read_text())
            if saved.get("inputs") == stamp and saved.get("settings") == settings:
                results.append(Merged(merge, saved["losses"], saved["seconds"]))
                continue
        started = time.perf_counter()
        loaded = loaded or {name: load_checkpoint(path) for name, path in sources.items()}
        spec = MergeSpec(merge.method, (sources["phase1"], sources[FROM]),
                         base=sources["base"] if merge.method == "ties" else None,
                         weights=(1 - merge.alpha, merge.alpha) if merge.method == "linear" else (),
                         density=merge.density)
        weights = merge_state_dicts(spec, [loaded["phase1"]["model"], loaded[FROM]["model"]],
                                    base=loaded["base"]["model"] if merge.method == "ties" else None)
        model = from_record(loaded[FROM]["model_config"])  # the extended vocabulary's architecture
        model.load_state_dict(weights)
        with torch.no_grad():
            losses = score(model, eval_datasets, cfg.seq_len, cfg.eval_batches, cfg.micro_batch, cfg.device)
        seconds = time.perf_counter() - started
        out.mkdir(exist_ok=True)
        record.write_text(json.dumps({"merge": merge.__dict__, "spec": spec.record(), "inputs": stamp,
                                      "settings": settings, "losses": losses, "seconds": seconds}, indent=2))
        print(f"{merge.name}: {merge.about}: " + ", ".join(f"{k} {v:.3f}" for k, v in losses.items())
              + f" ({seconds:.1f}s)", flush=True)
        results.append(Merged(merge, losses, seconds))
    return results
