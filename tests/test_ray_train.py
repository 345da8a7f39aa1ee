"""The trainer under Ray Train on a local Ray with 2 CPU workers (gloo): the same run as under torchrun, and a
run whose worker is killed (SIGKILL) resumes from the checkpoint Ray Train stored, ending as the
uninterrupted run did, to the bit."""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_ddp import _datasets, _flags, _records
from trainer.ray_launcher import main as launcher_main

REPO = Path(__file__).resolve().parents[1]
STEPS = ["--steps", "6", "--checkpoint-every", "2"]


@pytest.fixture(scope="module")
def local_ray():
    import ray

    # Workers unpickle the fault hook below by its module, which pytest may have imported as `tests.test_ray_train`
    # or as `test_ray_train`: both must import there. One thread each.
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": f"{REPO}:{REPO / 'tests'}", "OMP_NUM_THREADS": "1"}})
    yield
    ray.shutdown()


def _kill_rank_1_once(marker: Path, at: int, step: int, model, batch) -> None:
    """SIGKILL the rank-1 worker after step `at`, the first time only, taking RUN_DIR's checkpoints with it (a
    node and its local disk lost): the restarted workers have only what Ray Train stored."""
    import shutil

    import torch.distributed as dist

    if step == at and dist.get_rank() == 1 and not marker.exists():
        marker.write_text("killed")
        shutil.rmtree(marker.parent / "killed-run" / "checkpoints")
        os.kill(os.getpid(), signal.SIGKILL)


def _without_timing(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in ("tokens_per_s", "data_wait_share")} for r in records]


def _torchrun(flags: list[str]) -> None:
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                             "--master-port", str(_port()), "-m", "trainer", *flags], cwd=REPO, capture_output=True,
                            text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]


def _port() -> int:
    from service.launcher import free_port

    return free_port()


@pytest.mark.timeout(600)
def test_ray_train_runs_the_torchrun_run_and_resumes_a_killed_worker_exactly(
        tmp_path, local_ray, token_dataset_factory, english_model, english_lines, german_lines):
    datasets = _datasets(token_dataset_factory, english_model, english_lines, german_lines)
    _torchrun([*_flags(datasets, tmp_path / "torchrun"), *STEPS])

    storage = tmp_path / "ray-storage"
    launch = ["--num-workers", "2", "--storage-path", str(storage), "--max-failures", "1", "--"]
    assert launcher_main([*launch, *_flags(datasets, tmp_path / "ray"), *STEPS]) == 0
    marker = tmp_path / "killed"
    hook = functools.partial(_kill_rank_1_once, marker, 3)
    assert launcher_main([*launch, *_flags(datasets, tmp_path / "killed-run"), *STEPS], on_step=hook) == 0
    assert marker.exists()  # the worker was killed, and the run still finished

    expected = _without_timing(_records(tmp_path / "torchrun", "train"))
    assert [r["step"] for r in expected] == list(range(1, 7))
    assert _without_timing(_records(tmp_path / "ray", "train")) == expected  # the torchrun run, to the bit
    assert _without_timing(_records(tmp_path / "killed-run", "train")) == expected  # resumed at step 2, exactly
    assert _records(tmp_path / "killed-run", "eval") == _records(tmp_path / "torchrun", "eval")
    # Ray Train's storage holds the reported checkpoints (the last two), each a resumable run folder.
    stored = sorted(p.name for p in (storage / "killed-run").glob("step-*"))
    assert stored[-1] == "step-000006" and (storage / "killed-run" / stored[-1] / "checkpoints" / "latest.pt").is_file()


def test_launcher_refuses_mismatched_flags_before_any_worker_starts(tmp_path, capsys):
    flags = ["--dataset=en=/nonexistent", "--out", str(tmp_path / "run")]
    assert launcher_main(["--num-workers", "2", "--use-gpu", "--", *flags]) == 2
    assert "--use-gpu gives each worker a GPU and --device cuda trains on it" in capsys.readouterr().err
    assert launcher_main(["--num-workers", "2", "--storage-path", "relative/dir", "--", *flags]) == 2
    assert "--storage-path relative/dir: give an absolute path" in capsys.readouterr().err
