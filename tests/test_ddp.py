"""DDP on the CPU: 2 processes with the gloo backend run the real training loop.

After every step the ranks must hold identical weights and must have trained on disjoint rows, and the
2-rank run must reproduce the losses of a 1-process run over the same global batches, also when a signal
to one rank stops the run and it is resumed.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
from pathlib import Path
from typing import Callable

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from service.launcher import free_port
from trainer.train_config import parse_args
from trainer.metrics_log import read_metrics
from trainer.stop_request import RunStopped
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


def _signal_rank_1_after_step_2(step: int, model: torch.nn.Module, batch) -> None:
    _check_ranks_agree(step, model, batch)
    if step == 2 and dist.get_rank() == 1:
        os.kill(os.getpid(), signal.SIGTERM)  # a real signal, to one rank only


def _worker(rank: int, world_size: int, port: int, flags: list[str],
            on_step: Callable = _check_ranks_agree, stopped_dir: Path | None = None) -> None:
    """One rank of a run; a rank the run stopped on writes where (and on which signal) to stopped_dir."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    try:
        train(parse_args(flags), on_step=on_step)
    except RunStopped as stopped:
        if stopped_dir is None:
            raise
        (stopped_dir / f"rank-{rank}.json").write_text(json.dumps({"step": stopped.step, "signal": stopped.signum}))
    finally:
        dist.destroy_process_group()


def _datasets(token_dataset_factory, english_model, english_lines, german_lines) -> dict[str, str]:
    english = token_dataset_factory("en", english_lines[:300], english_model, english_lines[1900:])
    german = token_dataset_factory("de", german_lines[:300], english_model, german_lines[1900:])
    return {"en": str(english.root), "de": str(german.root)}


@pytest.fixture(scope="module")
def datasets(tmp_path_factory, english_model, english_lines, german_lines) -> dict[str, str]:
    """`_datasets`, written once for a module whose runs only read them."""
    from tests.conftest import write_token_dataset  # here, not above: every rank imports this module

    folder = tmp_path_factory.mktemp("datasets")
    return _datasets(lambda name, *args: write_token_dataset(folder / name, *args), english_model, english_lines,
                     german_lines)


def _records(run_dir: Path, kind: str) -> list[dict]:
    return [r for r in read_metrics(run_dir) if r["kind"] == kind]


def _assert_same_run(ddp: Path, single: Path) -> None:
    """The 2-rank run's records equal the 1-process run's: every step once, losses up to rounding."""
    ddp_train, single_train = _records(ddp, "train"), _records(single, "train")
    assert [r["step"] for r in ddp_train] == [r["step"] for r in single_train] == [1, 2, 3, 4]
    for a, b in zip(ddp_train, single_train, strict=True):
        # Same global batch, gradients averaged over ranks instead of micro-batches: equal up to rounding.
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-4)
        assert a["source_share"] == b["source_share"]
    ddp_evals, single_evals = _records(ddp, "eval"), _records(single, "eval")
    assert [r["step"] for r in ddp_evals] == [r["step"] for r in single_evals] == [0, 2, 4]
    for a, b in zip(ddp_evals, single_evals, strict=True):
        assert a["val_loss"] == pytest.approx(b["val_loss"], abs=1e-4)


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory, datasets) -> Path:
    """The 1-process run that both 2-rank runs, the uninterrupted one and the signalled and resumed one,
    must reproduce (the same flags): trained once."""
    out = tmp_path_factory.mktemp("one-process") / "single"
    train(parse_args(_flags(datasets, out)))
    return out


@pytest.mark.timeout(300)
def test_two_gloo_ranks_train_like_one_process(tmp_path, datasets, one_process_run):
    mp.spawn(_worker, args=(2, free_port(), _flags(datasets, tmp_path / "ddp")), nprocs=2, join=True)
    _assert_same_run(tmp_path / "ddp", one_process_run)


@pytest.mark.timeout(120)  # ranks that disagree on where to stop hang in their next collective
def test_a_signal_to_one_rank_stops_every_rank_after_the_same_step(tmp_path, datasets, one_process_run):
    """Issue 18: a rank stopping alone would leave the others waiting in the next all-reduce. A SIGTERM to
    rank 1 after step 2 must stop both ranks at step 2 with one checkpoint, and the resumed run must be the
    uninterrupted one."""
    flags = _flags(datasets, tmp_path / "ddp")
    mp.spawn(_worker, args=(2, free_port(), flags, _signal_rank_1_after_step_2, tmp_path), nprocs=2, join=True)
    stops = [json.loads((tmp_path / f"rank-{rank}.json").read_text()) for rank in (0, 1)]
    assert stops == [{"step": 2, "signal": signal.SIGTERM}] * 2  # rank 0 stopped on rank 1's signal
    assert torch.load(tmp_path / "ddp" / "checkpoints" / "latest.pt", weights_only=False)["step"] == 2

    mp.spawn(_worker, args=(2, free_port(), [*flags, "--resume"]), nprocs=2, join=True)
    _assert_same_run(tmp_path / "ddp", one_process_run)
