"""`python -m trainer.ray_launcher --num-workers N [--use-gpu] -- <trainer flags>`: the trainer under Ray Train.

Each Ray Train worker is one rank of the run, as a torchrun process would be: Ray Train's `TorchTrainer`
starts the workers, sets up their torch process group (gloo on CPUs, NCCL on GPUs) and their RANK,
WORLD_SIZE and LOCAL_RANK, and each worker runs the unchanged training loop (`trainer.train.train`), which
takes its stream rank and world size from there.

Checkpoints go through Ray Train's storage (`--storage-path`: a folder every node sees, or s3:// / gs://):
each time the loop writes checkpoints/latest.pt (or an --fsdp run's latest.dcp/), rank 0 reports it with
`ray.train.report(checkpoint=...)`, together with metrics.jsonl and a Hugging Face run's tokenizer. When a
worker dies, Ray Train restarts the group (up to `--max-failures` times); each restarted worker copies the
latest reported checkpoint back into RUN_DIR and continues with the run's flags plus --resume
(`trainer.train_config.resume_command`), so the continued run is the one `--resume` would give: the same
batches, to the bit. Named `ray_launcher`, not `ray`, so that `trainer.ray` never reads as (or, for tools
that put trainer/ on the path, shadows) the `ray` package.

Submit it to a cluster as any Ray job (`ray job submit ... -- python -m trainer.ray_launcher ...`).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from trainer.checkpoint import CHECKPOINT_DIR, TOKENIZER_DIR
from trainer.errors import TrainerError
from trainer.metrics_log import METRICS_NAME
from trainer.train import StepHook
from trainer.train_config import TrainConfig, parse_args, resume_command

# RUN_DIR/.ray-launch: the id of the launch whose workers last started there.
LAUNCH_MARKER = ".ray-launch"


@dataclass(frozen=True)
class RayConfig:
    """How Ray Train runs the trainer; the trainer's own flags travel as they were typed."""

    num_workers: int
    use_gpu: bool = False
    storage_path: str | None = None  # None: Ray's default (~/ray_results)
    name: str | None = None  # the run's name in the storage (default: RUN_DIR's name)
    max_failures: int = 3  # worker-group restarts from the latest checkpoint before the run fails
    keep_checkpoints: int = 2  # reported checkpoints kept in the storage


def check_configs(ray_config: RayConfig, config: TrainConfig) -> None:
    """Refuse, on the driver before any worker starts, what the workers would each fail on."""
    if ray_config.num_workers < 1:
        raise TrainerError(f"--num-workers {ray_config.num_workers}: give at least 1 worker")
    if ray_config.use_gpu != (config.device == "cuda"):
        raise TrainerError("--use-gpu gives each worker a GPU and --device cuda trains on it: give both or neither "
                           f"(got --use-gpu {ray_config.use_gpu}, --device {config.device})")
    if ray_config.max_failures < -1:
        raise TrainerError(f"--max-failures {ray_config.max_failures}: give -1 (no limit), 0 or more")
    if ray_config.storage_path and "://" not in ray_config.storage_path and not Path(ray_config.storage_path).is_absolute():
        raise TrainerError(f"--storage-path {ray_config.storage_path}: give an absolute path (on storage every node "
                           "mounts) or an s3:// or gs:// URI; Ray Train refuses relative ones")


def _copy(source: Path, target: Path) -> None:
    """Copy a file or folder into place whole: beside it first, then renamed (a worker killed meanwhile leaves
    the old one, never half of the new)."""
    staging = target.with_name(target.name + ".restoring")
    shutil.rmtree(staging, ignore_errors=True)
    if source.is_dir():
        shutil.copytree(source, staging)
    else:
        shutil.copyfile(source, staging)
    if target.is_dir():
        shutil.rmtree(target)
    os.replace(staging, target)


def stage_checkpoint(out: Path, latest: Path, folder: Path) -> None:
    """Lay out in `folder` what a restarted worker needs from RUN_DIR `out` to resume: the latest checkpoint,
    the run's metrics so far, and a Hugging Face run's tokenizer. `folder` is inside `out`, so checkpoint
    files are hard links, not copies: the trainer replaces them by rename, never in place."""
    (folder / CHECKPOINT_DIR).mkdir(parents=True)
    target = folder / CHECKPOINT_DIR / latest.name
    if latest.is_dir():
        shutil.copytree(latest, target, copy_function=os.link)
    else:
        os.link(latest, target)
    tokenizer = out / CHECKPOINT_DIR / TOKENIZER_DIR
    if tokenizer.is_dir():
        shutil.copytree(tokenizer, folder / CHECKPOINT_DIR / TOKENIZER_DIR)
    if (out / METRICS_NAME).is_file():
        shutil.copyfile(out / METRICS_NAME, folder / METRICS_NAME)  # appended to after this: a copy


def restore_checkpoint(folder: Path, out: Path) -> None:
    """Put a reported checkpoint (laid out by `stage_checkpoint`) back into RUN_DIR `out`."""
    (out / CHECKPOINT_DIR).mkdir(parents=True, exist_ok=True)
    for entry in sorted((folder / CHECKPOINT_DIR).iterdir()):
        _copy(entry, out / CHECKPOINT_DIR / entry.name)
    if (folder / METRICS_NAME).is_file():
        _copy(folder / METRICS_NAME, out / METRICS_NAME)


def _worker(loop_config: dict[str, Any]) -> None:
    """One rank: restore the latest reported checkpoint if Ray Train restarted the group, then train."""
    import ray.train
    import torch.distributed as dist

    from trainer.train import train

    context = ray.train.get_context()
    # Ray Train has set these and the process group up already; set from its context so that the loop's
    # rank and world size are Ray's by construction, whatever a future Ray leaves in the environment.
    os.environ.update(RANK=str(context.get_world_rank()), WORLD_SIZE=str(context.get_world_size()),
                      LOCAL_RANK=str(context.get_local_rank()))
    argv: list[str] = loop_config["argv"]
    config = parse_args(argv)
    marker = config.out / LAUNCH_MARKER
    restarted = marker.is_file() and marker.read_text() == loop_config["launch_id"]
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        if context.get_local_rank() == 0:  # once per node: RUN_DIR may be node-local
            with checkpoint.as_directory() as folder:
                restore_checkpoint(Path(folder), config.out)
        argv = resume_command(argv)  # the run's flags, with --resume, without --init-from / --overwrite
    elif restarted and "--resume" not in argv:
        # Restarted before any checkpoint was reported: this launch's first attempt left a run in RUN_DIR
        # that the same flags would refuse; start it again.
        argv = [*argv, "--overwrite"] if "--overwrite" not in argv else argv
    if dist.is_initialized():
        dist.barrier()  # every rank has read the marker and sees the restored files
    if context.get_world_rank() == 0:
        config.out.mkdir(parents=True, exist_ok=True)
        marker.write_text(loop_config["launch_id"])
    config = parse_args(argv)

    def report(step: int, latest: Path) -> None:
        # Every rank reports (Ray Train's report is a barrier); rank 0 alone hands over the files.
        if context.get_world_rank() != 0:
            ray.train.report({"step": step}, checkpoint=None)
            return
        # Inside RUN_DIR for the hard links; Ray may delete it itself once uploaded.
        with tempfile.TemporaryDirectory(prefix=".ray-checkpoint-", dir=config.out, ignore_cleanup_errors=True) as folder:
            stage_checkpoint(config.out, latest, Path(folder))
            ray.train.report({"step": step}, checkpoint=ray.train.Checkpoint.from_directory(folder),
                             checkpoint_dir_name=f"step-{step:06d}")
        # Ray Train registers a report when its controller next polls the workers; wait for that, so that a
        # worker dying from here on restarts from this checkpoint, not the one before.
        ray.train.get_all_reported_checkpoints()

    train(config, on_step=loop_config.get("on_step"), on_checkpoint=report)


def launch(ray_config: RayConfig, trainer_argv: Sequence[str], on_step: StepHook | None = None) -> Any:
    """Run the trainer with `trainer_argv` on Ray Train; returns Ray's `Result`. `on_step` is passed to
    every worker's loop (tests inject faults with it)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    config = parse_args(list(trainer_argv))  # flag mistakes now, once, not in every worker
    check_configs(ray_config, config)
    trainer = TorchTrainer(
        _worker,
        # launch_id tells a restarted worker group (same id in RUN_DIR) from a new launch on an old RUN_DIR.
        train_loop_config={"argv": list(trainer_argv), "on_step": on_step, "launch_id": uuid.uuid4().hex},
        torch_config=TorchConfig(backend="nccl" if ray_config.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=ray_config.num_workers, use_gpu=ray_config.use_gpu),
        run_config=RunConfig(
            name=ray_config.name or config.out.resolve().name,
            storage_path=ray_config.storage_path,
            failure_config=FailureConfig(max_failures=ray_config.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=ray_config.keep_checkpoints),
        ),
    )
    return trainer.fit()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m trainer.ray_launcher",
        description="Run `python -m trainer` on Ray Train: one rank per worker, checkpoints in Ray's storage, "
                    "restarts from the latest after a worker dies. Trainer flags follow `--`.",
        allow_abbrev=False,
        epilog="Example: python -m trainer.ray_launcher --num-workers 8 --use-gpu --storage-path s3://bucket/runs "
               "-- --stream http://mixer:8000 --stream-token-file read.token --device cuda --out /shared/runs/de",
    )
    p.add_argument("--num-workers", type=int, required=True, metavar="N",
                   help="workers (ranks) of the run (required)")
    p.add_argument("--use-gpu", action="store_true",
                   help="one GPU per worker, NCCL between them; the trainer flags must say --device cuda "
                        "(default: CPU workers, gloo)")
    p.add_argument("--storage-path", metavar="PATH|URI",
                   help="where Ray Train keeps reported checkpoints: an absolute path every node mounts, or "
                        "s3:// / gs:// (default: Ray's, ~/ray_results on the driver's node)")
    p.add_argument("--name", help="the run's name under --storage-path (default: the trainer's --out folder name)")
    p.add_argument("--max-failures", type=int, default=RayConfig.max_failures, metavar="K",
                   help="restart the workers from the latest checkpoint up to K times after a failure; -1: no "
                        "limit (default %(default)s)")
    p.add_argument("--keep-checkpoints", type=int, default=RayConfig.keep_checkpoints, metavar="K",
                   help="reported checkpoints kept in the storage (default %(default)s)")
    return p


def parse(argv: Sequence[str]) -> tuple[RayConfig, list[str]]:
    """(launcher config, the trainer's flags): the launcher's flags come before `--`, the trainer's after."""
    argv = list(argv)
    parser = build_parser()
    split = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:split])  # first: --help prints the usage and exits 0 without trainer flags
    if split == len(argv):
        parser.error("give the trainer's flags after `--`, e.g. -- --dataset en=datasets/en --out runs/en")
    return RayConfig(num_workers=args.num_workers, use_gpu=args.use_gpu, storage_path=args.storage_path,
                     name=args.name, max_failures=args.max_failures, keep_checkpoints=args.keep_checkpoints), argv[split + 1:]


def _training_failed() -> tuple[type, ...]:
    """Ray Train's "the run failed" errors (Train v2 raises its own class, v1 the base trainer's)."""
    import ray.train
    from ray.train.base_trainer import TrainingFailedError

    return (ray.train.TrainingFailedError, TrainingFailedError)


def main(argv: Sequence[str] | None = None, on_step: Callable | None = None) -> int:
    from pipeline.errors import report_user_error
    from trainer.__main__ import USER_ERRORS

    ray_config, trainer_argv = parse(sys.argv[1:] if argv is None else argv)
    try:
        result = launch(ray_config, trainer_argv, on_step)
    except USER_ERRORS as e:
        return report_user_error(e)
    except _training_failed() as e:  # the run failed more than --max-failures times; anything else is a bug
        print(f"error: the run failed on Ray Train: {type(e).__name__}: {e}",
              file=sys.stderr, flush=True)
        return 1
    checkpoint = result.checkpoint
    print(f"ray train run finished; latest checkpoint in Ray's storage: {checkpoint.path if checkpoint else 'none'}",
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
