"""DDP on the CPU: 2 processes with the gloo backend run the real training loop.

After every step the ranks must hold identical weights and must have trained on disjoint rows, and the
2-rank run must reproduce the losses of a 1-process run over the same global batches.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from service.launcher import free_port
from trainer.train_config import parse_args
from trainer.metrics_log import read_metrics
from trainer.train import train

torch.set_num_threads(1)


def _flags(datasets: dict[str, str], out: Path) -> list[str]:
    return [f"--dataset={name}={path}" for name, path in datasets.items()] + [
        "--model", "test", "--seq-len", "32", "--global-batch", "8", "--micro-batch", "2", "--steps", "4",
        "--eval-every", "2", "--eval-batches", "2", "--max-lr", "2e-3", "--no-progress", "--out", str(out),
    ]


def _check_ranks_agree(step: int, model: torch.nn.Module, batch) -> None:
    digest = hashlib.sha256()
    for param in model.parameters():
        digest.update(param.detach().cpu().numpy().tobytes())
    rows = [row.tobytes() for row in batch.tokens]
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (digest.hexdigest(), rows))
    hashes = {h for h, _ in gathered}
    assert len(hashes) == 1, f"step {step}: ranks hold different weights"
    all_rows = [r for _, rank_rows in gathered for r in rank_rows]
    assert len(set(all_rows)) == len(all_rows) == 8, f"step {step}: ranks saw overlapping rows"


def _worker(rank: int, world_size: int, port: int, flags: list[str]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    try:
        train(parse_args(flags), on_step=_check_ranks_agree)
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(300)
def test_two_gloo_ranks_train_like_one_process(tmp_path, token_dataset_factory, english_model, english_lines,
                                               german_lines):
    english = token_dataset_factory("en", english_lines[:300], english_model, english_lines[1900:])
    german = token_dataset_factory("de", german_lines[:300], english_model, german_lines[1900:])
    datasets = {"en": str(english.root), "de": str(german.root)}

    mp.spawn(_worker, args=(2, free_port(), _flags(datasets, tmp_path / "ddp")), nprocs=2, join=True)
    train(parse_args(_flags(datasets, tmp_path / "single")))

    def records(run: str, kind: str) -> list[dict]:
        return [r for r in read_metrics(tmp_path / run) if r["kind"] == kind]

    ddp, single = records("ddp", "train"), records("single", "train")
    assert [r["step"] for r in ddp] == [r["step"] for r in single] == [1, 2, 3, 4]
    for a, b in zip(ddp, single, strict=True):
        # Same global batch, gradients averaged over ranks instead of micro-batches: equal up to rounding.
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-4)
        assert a["source_share"] == b["source_share"]
    ddp_evals, single_evals = records("ddp", "eval"), records("single", "eval")
    assert [r["step"] for r in ddp_evals] == [r["step"] for r in single_evals] == [0, 2, 4]
    for a, b in zip(ddp_evals, single_evals, strict=True):
        assert a["val_loss"] == pytest.approx(b["val_loss"], abs=1e-4)
