"""The service's settings: one dataclass, filled from the command line in one place."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from service.schedule import ScheduleError, quantize_weights


@dataclass(frozen=True)
class ServiceConfig:
    datasets: dict[str, Path]
    weights: dict[str, float]
    seq_len: int
    global_batch: int
    seed: int
    state_dir: Path
    reserve_steps: int = 256
    host: str = "127.0.0.1"
    port: int = 8000
    admin_token_file: Path | None = None
    verify: str = "full"
    log_level: str = "info"


def _pairs(text: str, what: str) -> list[tuple[str, str]]:
    pairs = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, value = item.partition("=")
        if not sep or not name or not value:
            raise argparse.ArgumentTypeError(f"{what}: {item!r} is not NAME=VALUE")
        pairs.append((name, value))
    return pairs


def parse_args(argv: Sequence[str] | None = None) -> ServiceConfig:
    parser = argparse.ArgumentParser(
        prog="python -m service",
        description="Serve replay-mixed training batches over HTTP; the mix can be changed while training runs.",
    )
    parser.add_argument("--dataset", action="append", required=True, metavar="NAME=PATH",
                        help="a token dataset made by pipeline.tokenize (repeat for each dataset)")
    parser.add_argument("--weights", required=True, metavar="NAME=W,...",
                        help="initial mix, e.g. old=0.05,new=0.95 (normalised to sum 1)")
    parser.add_argument("--seq-len", type=int, required=True)
    parser.add_argument("--global-batch", type=int, required=True, help="rows per step over all ranks")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--state-dir", type=Path, required=True,
                        help="where the schedule and served frontier are kept (reuse it to resume)")
    parser.add_argument("--reserve-steps", type=int, default=256, metavar="K",
                        help="persist the served frontier K steps ahead at a time (default 256): serving needs an "
                             "fsync once per K steps; after a kill -9 a mix change lands up to K steps later")
    parser.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1 (loopback only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--admin-token-file", type=Path,
                        help="file holding the bearer token for PUT /v1/mix; without it the mix is read-only")
    parser.add_argument("--verify", choices=("none", "size", "full"), default="full",
                        help="dataset check at start: the sha256 of every file (default: damaged data is refused "
                             "before anything is served), or file sizes only, for a fast start on huge datasets")
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    if args.reserve_steps < 1:
        parser.error(f"--reserve-steps {args.reserve_steps}: must be >= 1 (1 persists every new step)")

    datasets: dict[str, Path] = {}
    for entry in args.dataset:
        try:
            [(name, path)] = _pairs(entry, "--dataset")
        except (argparse.ArgumentTypeError, ValueError):
            parser.error(f"--dataset {entry!r}: expected NAME=PATH, e.g. --dataset old=/data/en")
        if name in datasets:
            parser.error(f"--dataset {name}: given twice")
        datasets[name] = Path(path)
    try:
        weights = {name: float(value) for name, value in _pairs(args.weights, "--weights")}
    except (argparse.ArgumentTypeError, ValueError) as e:
        parser.error(f"--weights {args.weights!r}: {e}; expected e.g. old=0.05,new=0.95")
    unknown = sorted(set(weights) - set(datasets))
    if unknown:
        parser.error(f"--weights: unknown dataset(s) {unknown}; the --dataset names are {sorted(datasets)}")
    try:
        quantize_weights(weights)
    except ScheduleError as e:
        parser.error(f"--weights: {e}")
    return ServiceConfig(
        datasets=datasets,
        weights=weights,
        seq_len=args.seq_len,
        global_batch=args.global_batch,
        seed=args.seed,
        state_dir=args.state_dir,
        reserve_steps=args.reserve_steps,
        host=args.host,
        port=args.port,
        admin_token_file=args.admin_token_file,
        verify=args.verify,
        log_level=args.log_level,
    )
