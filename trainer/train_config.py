"""The trainer's configuration: plain dataclasses, and the one place that turns CLI flags into them."""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from service.mix_schedule import ScheduleError, check_weight_names
from trainer.model import MODEL_SIZES
from trainer.lr_schedules import SCHEDULES, ScheduleConfig


@dataclass(frozen=True)
class DataConfig:
    """Where batches come from: datasets mixed in-process at constant weights, or a mixer service."""

    datasets: dict[str, str] = field(default_factory=dict)  # name -> dataset folder
    weights: dict[str, float] = field(default_factory=dict)
    stream_url: str | None = None
    stream_read_ahead: int | None = None  # steps per request and decoded queue; None: the client's default
    stream_token_file: Path | None = None  # the service's read token (None: it allows anonymous reads)
    seq_len: int = 256
    global_batch: int = 32  # sequences per step over all ranks
    micro_batch: int = 8  # sequences per forward pass on one rank; the rest is gradient accumulation
    seed: int = 0
    eval_datasets: dict[str, str] = field(default_factory=dict)  # default: the training datasets
    eval_batches: int = 4  # micro-batches of each validation set per evaluation


@dataclass(frozen=True)
class OptimConfig:
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0


@dataclass(frozen=True)
class TrainConfig:
    out: Path
    data: DataConfig
    schedule: ScheduleConfig
    optim: OptimConfig = OptimConfig()
    model: str = "test"
    untied: bool = False
    steps: int = 100
    eval_every: int = 50
    log_every: int = 1
    checkpoint_every: int = 100
    save_at: tuple[int, ...] = ()
    init_from: Path | None = None
    reset_optimizer: bool = False
    extension_report: Path | None = None
    resume: bool = False
    seed: int = 0  # model initialisation
    device: str = "cpu"
    compile: bool = False
    progress: bool = True


# The flag that sets each TrainConfig field (dotted through the nested configs) where it is not simply the
# field's name in kebab case; the Adam betas have no flag.
_FLAG_NAMES = {
    "data.datasets": "--dataset", "data.stream_url": "--stream", "data.seed": "--data-seed",
    "data.eval_datasets": "--eval-dataset", "schedule.name": "--lr-schedule", "schedule.continued": "--continue-schedule",
    "progress": "--no-progress",
}
# What --resume lets change: how long, how often and how visibly the run goes on, and on what hardware,
# but not what it computes (the micro-batch only splits the same global batch).
RESUMABLE_FLAGS = ("--steps", "--eval-every", "--log-every", "--checkpoint-every", "--save-at", "--no-progress",
                   "--device", "--compile", "--micro-batch", "--stream", "--stream-read-ahead",
                   "--stream-token-file")
# How a run began; a resumed run takes what they made from its checkpoint instead.
_START_FLAGS = ("--out", "--resume", "--init-from", "--reset-optimizer", "--extension-report")


def flag_of(path: str) -> str:
    """The CLI flag of a dotted TrainConfig field, e.g. "data.seq_len" -> "--seq-len"."""
    return _FLAG_NAMES.get(path, "--" + path.rpartition(".")[2].replace("_", "-"))


def _dest(path: str) -> str:
    return flag_of(path)[2:].replace("-", "_")


def _leaves(config: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    for f in fields(config):
        value = getattr(config, f.name)
        if is_dataclass(value):
            yield from _leaves(value, f"{prefix}{f.name}.")
        else:
            yield prefix + f.name, value


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return str(value) if isinstance(value, Path) else value


def config_record(config: TrainConfig) -> dict[str, Any]:
    """The config as plain JSON-able values (paths as strings, tuples as lists): what checkpoints store."""
    return _jsonable(asdict(config))


def resume_differences(recorded: Mapping[str, Any], config: TrainConfig) -> list[tuple[str, Any, Any]]:
    """(flag, checkpoint's value, given value) for each flag that defines the run and differs from the
    `config_record` a checkpoint stored; a value the checkpoint lacks reads as None."""
    differences = []
    for path, value in _leaves(config):
        flag = flag_of(path)
        if flag in RESUMABLE_FLAGS or flag in _START_FLAGS:
            continue
        stored: Any = recorded
        for part in path.split("."):
            stored = stored.get(part) if isinstance(stored, Mapping) else None
        if stored != _jsonable(value):
            differences.append((flag, stored, _jsonable(value)))
    return differences


def _pairs(text: str, flag: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name or not value:
        raise argparse.ArgumentTypeError(f"{flag} {text!r}: expected NAME=VALUE")
    return name, value


def _weights(text: str) -> dict[str, float]:
    weights = {}
    for item in text.split(","):
        name, value = _pairs(item, "--weights")
        try:
            weights[name] = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"--weights {item!r}: {value!r} is not a number") from None
    return weights


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m trainer",
        description="Continue (or start) pretraining a GPT on a replay-mixed token stream.",
    )
    src = p.add_argument_group("data")
    src.add_argument("--dataset", action="append", default=[], metavar="NAME=PATH",
                     help="a token dataset to mix in-process (repeat for each)")
    src.add_argument("--weights", type=_weights, default={}, metavar="NAME=W,...",
                     help="mixing weights of the --dataset names (default: equal)")
    src.add_argument("--stream", metavar="URL", help="pull batches from a mixer service instead")
    src.add_argument("--stream-token-file", type=Path, metavar="PATH",
                     help="with --stream: file holding the service's read token (its --read-token-file); omit it only "
                          "for a service started with --allow-anonymous-reads")
    src.add_argument("--stream-read-ahead", type=int, metavar="STEPS",
                     help="with --stream: fetch STEPS steps per request and keep STEPS ready, so about 3 x STEPS "
                          "are served ahead of training (default: ~4 MiB per request); small values make a ratio "
                          "change without start_step land sooner")
    src.add_argument("--seq-len", type=int, default=DataConfig.seq_len)
    src.add_argument("--global-batch", type=int, default=DataConfig.global_batch)
    src.add_argument("--micro-batch", type=int, default=DataConfig.micro_batch)
    src.add_argument("--data-seed", type=int, default=DataConfig.seed, help="the mixer's seed (in-process mixing)")
    src.add_argument("--eval-dataset", action="append", default=[], metavar="NAME=PATH",
                     help="a validation set (its val split); default: every training dataset")
    src.add_argument("--eval-batches", type=int, default=DataConfig.eval_batches)

    model = p.add_argument_group("model")
    model.add_argument("--model", choices=list(MODEL_SIZES), default="test")
    model.add_argument("--untied", action="store_true", help="separate input and output embeddings")
    model.add_argument("--init-from", type=Path, metavar="CKPT",
                       help="continue from a checkpoint (steps restart at 0; the schedule is this run's own unless "
                            "--continue-schedule)")
    model.add_argument("--reset-optimizer", action="store_true", help="with --init-from: fresh AdamW state")
    model.add_argument("--extension-report", type=Path, metavar="PATH",
                       help="extended.report.json, to grow the embeddings to an extended tokenizer")

    opt = p.add_argument_group("optimisation")
    opt.add_argument("--steps", type=int, default=TrainConfig.steps)
    # The schedule flags default to None so that --continue-schedule can tell which were given.
    opt.add_argument("--lr-schedule", choices=SCHEDULES, help=f"default {ScheduleConfig.name}")
    opt.add_argument("--max-lr", type=float, help=f"default {ScheduleConfig.max_lr}")
    opt.add_argument("--min-lr", type=float, help=f"default {ScheduleConfig.min_lr}")
    opt.add_argument("--const-lr", type=float, help="infinite schedule's constant rate (default (max+min)/2)")
    opt.add_argument("--warmup-steps", type=int, help="default 1%% of --steps")
    opt.add_argument("--cooldown-steps", type=int, help="infinite: max->const steps after warmup (default 59%%)")
    opt.add_argument("--decay-steps", type=int,
                     help="infinite anneal (default 15%%) or WSD cooldown (20%%); with --continue-schedule, the "
                          "length of this run's final decay (default: the checkpoint's)")
    opt.add_argument("--cooldown-shape", choices=("cosine", "inv_sqrt"), help=f"default {ScheduleConfig.cooldown_shape}")
    opt.add_argument("--continue-schedule", action="store_true",
                     help="with --init-from: no re-warming; follow the schedule recorded in the checkpoint from the "
                          "step it was saved at (an infinite schedule's constant rate, or WSD's stable one), with "
                          "its final decay moved to the end of this run. Other schedule flags than --decay-steps "
                          "are refused with it")
    opt.add_argument("--lr-start-step", type=int, help=argparse.SUPPRESS)  # only to point old command lines to --continue-schedule
    opt.add_argument("--weight-decay", type=float, default=OptimConfig.weight_decay)
    opt.add_argument("--grad-clip", type=float, default=OptimConfig.grad_clip)

    run = p.add_argument_group("run")
    run.add_argument("--out", type=Path, required=True, metavar="RUN_DIR")
    run.add_argument("--resume", action="store_true",
                     help="continue from RUN_DIR's latest checkpoint, on the schedule it recorded. Give the flags the "
                          "run started with: any difference is refused, except in "
                          f"{', '.join(RESUMABLE_FLAGS)}, which may change (and --extension-report and "
                          "--reset-optimizer, which a resumed run ignores)")
    run.add_argument("--eval-every", type=int, default=TrainConfig.eval_every)
    run.add_argument("--log-every", type=int, default=TrainConfig.log_every)
    run.add_argument("--checkpoint-every", type=int, default=TrainConfig.checkpoint_every)
    run.add_argument("--save-at", type=int, action="append", default=[], metavar="STEP",
                     help="also keep checkpoints/step-NNNNNN.pt after this step (e.g. before the anneal)")
    run.add_argument("--seed", type=int, default=TrainConfig.seed)
    run.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    run.add_argument("--compile", action="store_true", help="torch.compile the model")
    run.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    return p


def parse_args(argv: Sequence[str] | None = None) -> TrainConfig:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        datasets = dict(_pairs(d, "--dataset") for d in args.dataset)
        eval_datasets = dict(_pairs(d, "--eval-dataset") for d in args.eval_dataset)
    except argparse.ArgumentTypeError as e:
        parser.error(str(e))
    if bool(datasets) == bool(args.stream):
        parser.error("give either --dataset NAME=PATH (one or more) or --stream URL, not both or neither")
    if args.weights and datasets:
        try:
            check_weight_names(args.weights, datasets, "--weights")
        except ScheduleError as e:
            parser.error(str(e))
    if args.stream_token_file is not None and not args.stream:
        parser.error("--stream-token-file needs --stream")
    if args.stream_read_ahead is not None and (not args.stream or args.stream_read_ahead < 1):
        parser.error("--stream-read-ahead needs --stream and a positive number of steps")
    if args.stream and args.weights:
        parser.error("--weights applies to in-process mixing; with --stream the service's schedule decides")
    if args.resume and args.init_from:
        parser.error("--resume continues this run; --init-from starts a new one from a checkpoint; pick one")
    if args.lr_start_step is not None:
        parser.error("--lr-start-step was replaced by --continue-schedule, which takes the step and the whole "
                     "schedule from the --init-from checkpoint")
    schedule_paths = [f"schedule.{f.name}" for f in fields(ScheduleConfig) if f.name != "continued"]
    schedule = {path.partition(".")[2]: getattr(args, _dest(path))
                for path in schedule_paths if getattr(args, _dest(path)) is not None}
    if args.continue_schedule:
        if not (args.init_from or args.resume):
            parser.error("--continue-schedule continues the schedule of a checkpoint; give it with --init-from CKPT")
        conflicting = [flag_of(f"schedule.{name}") for name in schedule if name != "decay_steps"]
        if conflicting:
            parser.error(f"--continue-schedule follows the checkpoint's recorded schedule, which {', '.join(conflicting)} "
                         "would contradict; drop them (only --decay-steps, this run's final decay, may be given)")
    if args.global_batch % args.micro_batch:
        parser.error(f"--global-batch {args.global_batch} is not a multiple of --micro-batch {args.micro_batch}")
    for flag in ("steps", "seq_len", "eval_every", "log_every", "checkpoint_every", "eval_batches"):
        if getattr(args, flag) <= 0:
            parser.error(f"--{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}")
    return TrainConfig(
        out=args.out,
        data=DataConfig(
            datasets=datasets,
            weights=args.weights or {name: 1.0 for name in datasets},
            stream_url=args.stream,
            stream_read_ahead=args.stream_read_ahead,
            stream_token_file=args.stream_token_file,
            seq_len=args.seq_len,
            global_batch=args.global_batch,
            micro_batch=args.micro_batch,
            seed=args.data_seed,
            eval_datasets=eval_datasets,
            eval_batches=args.eval_batches,
        ),
        schedule=ScheduleConfig(**schedule, continued=args.continue_schedule),
        optim=OptimConfig(weight_decay=args.weight_decay, grad_clip=args.grad_clip),
        model=args.model,
        untied=args.untied,
        steps=args.steps,
        eval_every=args.eval_every,
        log_every=args.log_every,
        checkpoint_every=args.checkpoint_every,
        save_at=tuple(sorted(set(args.save_at))),
        init_from=args.init_from,
        reset_optimizer=args.reset_optimizer,
        extension_report=args.extension_report,
        resume=args.resume,
        seed=args.seed,
        device=args.device,
        compile=args.compile,
        progress=not args.no_progress,
    )
