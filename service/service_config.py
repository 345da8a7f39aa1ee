"""The service's settings: one dataclass, filled from the command line in one place."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from pipeline.shard_cache import CacheConfig, default_cache_dir, DEFAULT_CACHE_BYTES
from pipeline.storage import is_uri
from service.control_laws import LAWS
from service.mix_schedule import check_weight_names, quantize_weights
from service.name_values import name_values, number_list


@dataclass(frozen=True)
class ServiceConfig:
    datasets: dict[str, str]  # name -> a local folder or a URI (s3://, gs://): never a Path, which breaks URIs
    weights: dict[str, float] | None  # None: resume the state dir's own mix
    seq_len: int
    global_batch: int
    seed: int
    state_dir: str  # a local folder or s3://BUCKET/PREFIX: never a Path, which breaks URIs
    reserve_steps: int = 256
    standby: bool = False  # wait for the state's owner to end, then take over
    lease_seconds: float = 10.0  # an object-store state's ownership lease (ownership.py)
    host: str = "127.0.0.1"
    port: int = 8000
    admin_token_file: Path | None = None
    read_token_file: Path | None = None
    allow_anonymous_reads: bool = False
    max_lookahead: int | None = None  # None: MixService's default
    controller: tuple[str, dict] | None = None  # a control law's name and settings (control_laws.py)
    ssl_keyfile: Path | None = None
    ssl_certfile: Path | None = None
    verify: str = "full"
    log_level: str = "info"
    cache: CacheConfig | None = None  # where remote datasets' shards are cached; None: CacheConfig.default()


@dataclass(frozen=True)
class ReplicaConfig:
    """A read replica (`--replica-of`): serves batches beside the owner, owns no state (service/replica.py)."""

    owner_urls: tuple[str, ...]  # the owner and its standbys: requests go to whichever answers
    dataset_paths: dict[str, str]  # where this node reads a dataset, where not where the owner says
    lease_steps: int = 256
    host: str = "127.0.0.1"
    port: int = 8000
    admin_token_file: Path | None = None
    read_token_file: Path | None = None
    allow_anonymous_reads: bool = False
    ssl_keyfile: Path | None = None
    ssl_certfile: Path | None = None
    log_level: str = "info"


def parse_args(argv: Sequence[str] | None = None) -> ServiceConfig | ReplicaConfig:
    parser = argparse.ArgumentParser(
        prog="python -m service",
        description="Serve replay-mixed training batches over HTTP; the mix can be changed while training runs.",
    )
    parser.add_argument("--dataset", action="append", default=[], metavar="NAME=PATH",
                        help="a token dataset made by pipeline.tokenize: a folder, or s3://BUCKET/PREFIX or "
                             "gs://BUCKET/PREFIX read through --cache-dir (repeat for each dataset)")
    parser.add_argument("--weights", metavar="NAME=W,...",
                        help="initial mix of a new --state-dir, e.g. old=0.05,new=0.95 (normalised to sum 1; name "
                             "every dataset, 0 leaves one out). On an existing state dir it may be omitted, and if "
                             "given must equal the mix the state dir started with: its log decides the mix")
    parser.add_argument("--seq-len", type=int)
    parser.add_argument("--global-batch", type=int, help="rows per step over all ranks")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--state-dir",
                        help="where the schedule and served frontier are kept (reuse it to resume): a folder, or "
                             "s3://BUCKET/PREFIX or gs://BUCKET/PREFIX so that the record of what was trained on "
                             "survives this machine. One process owns it; a second is refused with the owner's address")
    parser.add_argument("--standby", action="store_true",
                        help="wait while another service owns --state-dir, and take over (and start serving) when it "
                             "ends: at once on a folder's lock, within --lease-seconds on an object store")
    parser.add_argument("--lease-seconds", type=float, default=10.0, metavar="S",
                        help="s3:// or gs:// state: the owner renews its lease every S/3 seconds, and a standby takes over S "
                             "seconds after the last renewal it saw (default 10)")
    replica = parser.add_argument_group("read replica (serves batches beside the owner; see service/replica.py)")
    replica.add_argument("--replica-of", metavar="URL[,URL...]",
                         help="serve batches for the service at URL (and its standbys: the next URL when one fails) "
                              "under its leases, with the same API; owns no state. --dataset NAME=PATH only where this "
                              "node reads a dataset elsewhere than the owner says; no --state-dir, --weights, "
                              "--controller or --standby")
    replica.add_argument("--lease-steps", type=int, default=256, metavar="K",
                         help="a replica leases K steps ahead of its furthest reader at a time (default 256)")
    parser.add_argument("--reserve-steps", type=int, default=256, metavar="K",
                        help="persist the served frontier K steps ahead at a time (default 256): serving needs an "
                             "fsync once per K steps; after a kill -9 a mix change lands up to K steps later")
    parser.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1 (loopback only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--admin-token-file", type=Path,
                        help="file holding the bearer token for PUT /v1/mix and DELETE /v1/mix/stages (it may read "
                             "too); without it the mix is read-only")
    parser.add_argument("--read-token-file", type=Path,
                        help="file holding the bearer token trainer ranks send to read batches, the mix and the status")
    parser.add_argument("--allow-anonymous-reads", action="store_true",
                        help="let anyone who reaches the port read batches without a token (a laptop, not a cluster)")
    parser.add_argument("--max-lookahead", type=int, metavar="STEPS",
                        help="refuse reads this many steps or more past the first unserved step (default: "
                             "max(1024, 4 x --reserve-steps)), so no reader can push every future mix change away")
    control = parser.add_argument_group("controller (replay that steers itself; see service/control_laws.py)")
    control.add_argument("--controller", choices=sorted(LAWS),
                         help="forgetting-budget: hold --old's forgetting within --budget with the least replay; "
                              "excess-loss: reweight all datasets from their losses (DoReMi-style)")
    control.add_argument("--old", metavar="NAME", help="forgetting-budget: the old dataset whose forgetting is held")
    control.add_argument("--budget", type=float, metavar="F",
                         help="forgetting-budget: the accepted relative rise of --old's validation loss, e.g. 0.02")
    control.add_argument("--min-share", type=float, default=0.0, help="forgetting-budget: least --old share (default 0)")
    control.add_argument("--max-share", type=float, default=0.5, help="forgetting-budget: most --old share (default 0.5)")
    control.add_argument("--interval", type=int, default=0, metavar="STEPS",
                         help="forgetting-budget: at least this many steps between two decisions (default 0)")
    parser.add_argument("--ssl-keyfile", type=Path, help="serve HTTPS with this private key (with --ssl-certfile)")
    parser.add_argument("--ssl-certfile", type=Path, help="serve HTTPS with this certificate chain (with --ssl-keyfile)")
    parser.add_argument("--verify", choices=("none", "size", "full"), default="full",
                        help="dataset check at start: the sha256 of every file (default: damaged data is refused "
                             "before anything is served), or file sizes only, for a fast start on huge datasets")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help=f"local cache of the shards of datasets given by URI, shared by every process that "
                             f"uses it (default: $REPLAYMIX_CACHE_DIR, else {default_cache_dir()})")
    parser.add_argument("--cache-bytes", type=_byte_size, default=None, metavar="BYTES",
                        help=f"most bytes of shards the cache keeps, least recently used out; 500G, 64G, 512M "
                             f"(default: $REPLAYMIX_CACHE_BYTES, else {DEFAULT_CACHE_BYTES >> 30}G); at least two "
                             "shards")
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    if args.replica_of is None:
        missing = [flag for flag, value in (("--dataset", args.dataset), ("--seq-len", args.seq_len),
                                            ("--global-batch", args.global_batch), ("--state-dir", args.state_dir))
                   if not value]
        if missing:
            parser.error(f"the following arguments are required: {', '.join(missing)} (or --replica-of URL)")
    else:
        owned = [flag for flag, value in (("--state-dir", args.state_dir), ("--weights", args.weights),
                                          ("--controller", args.controller), ("--standby", args.standby),
                                          ("--seq-len", args.seq_len), ("--global-batch", args.global_batch))
                 if value]
        if owned:
            parser.error(f"--replica-of: {', '.join(owned)} belong to the owner; a replica takes its schedule, "
                         "geometry and state from it")
        if args.lease_steps < 1:
            parser.error(f"--lease-steps {args.lease_steps}: must be >= 1")
    if args.reserve_steps < 1:
        parser.error(f"--reserve-steps {args.reserve_steps}: must be >= 1 (1 persists every new step)")

    try:
        named = name_values(args.dataset, "--dataset", "PATH")
    except argparse.ArgumentTypeError as e:
        parser.error(str(e))
    datasets = {name: path if is_uri(path) else str(Path(path)) for name, path in named.items()}
    if not args.lease_seconds > 0:
        parser.error(f"--lease-seconds {args.lease_seconds}: must be > 0")
    if args.max_lookahead is not None and args.max_lookahead < 1:
        parser.error(f"--max-lookahead {args.max_lookahead}: must be >= 1")
    if args.read_token_file is None and not args.allow_anonymous_reads and args.admin_token_file is None:
        parser.error("reads need a credential: give --read-token-file (the token trainer ranks send), or "
                     "--allow-anonymous-reads on a machine only you can reach")
    if (args.ssl_keyfile is None) != (args.ssl_certfile is None):
        parser.error("--ssl-keyfile and --ssl-certfile go together: give both to serve HTTPS, or neither")
    if args.replica_of is not None:
        return ReplicaConfig(
            owner_urls=tuple(url.strip() for url in args.replica_of.split(",") if url.strip()),
            dataset_paths=datasets, lease_steps=args.lease_steps, host=args.host, port=args.port,
            admin_token_file=args.admin_token_file, read_token_file=args.read_token_file,
            allow_anonymous_reads=args.allow_anonymous_reads, ssl_keyfile=args.ssl_keyfile,
            ssl_certfile=args.ssl_certfile, log_level=args.log_level)
    controller = None
    if args.controller == "forgetting-budget":
        if args.old is None or args.budget is None:
            parser.error("--controller forgetting-budget needs --old NAME and --budget F (e.g. --old en --budget 0.02)")
        controller = (args.controller, {"old": args.old, "budget": args.budget, "min_share": args.min_share,
                                        "max_share": args.max_share, "interval": args.interval})
    elif args.controller is not None:
        controller = (args.controller, {})
    weights = None
    if args.weights is not None:
        try:
            weights = number_list(args.weights, "--weights")
            check_weight_names(weights, datasets, "--weights")
            quantize_weights(weights)
        except (argparse.ArgumentTypeError, ValueError) as e:
            parser.error(f"--weights {args.weights!r}: {e}")
    return ServiceConfig(
        datasets=datasets,
        weights=weights,
        seq_len=args.seq_len,
        global_batch=args.global_batch,
        seed=args.seed,
        state_dir=args.state_dir if is_uri(args.state_dir) else str(Path(args.state_dir)),
        reserve_steps=args.reserve_steps,
        standby=args.standby,
        lease_seconds=args.lease_seconds,
        host=args.host,
        port=args.port,
        admin_token_file=args.admin_token_file,
        read_token_file=args.read_token_file,
        allow_anonymous_reads=args.allow_anonymous_reads,
        max_lookahead=args.max_lookahead,
        controller=controller,
        ssl_keyfile=args.ssl_keyfile,
        ssl_certfile=args.ssl_certfile,
        verify=args.verify,
        log_level=args.log_level,
        cache=_cache_config(args.cache_dir, args.cache_bytes),
    )


def _byte_size(text: str) -> int:
    """A byte count: 1234, or with a binary suffix K, M, G, T (512M, 64G)."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    number, unit = (text[:-1], units[text[-1].upper()]) if text and text[-1].upper() in units else (text, 1)
    try:
        value = int(float(number) * unit)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size such as 64G or 512M") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: must be positive")
    return value


def _cache_config(folder: Path | None, max_bytes: int | None) -> CacheConfig:
    default = CacheConfig.default()
    return CacheConfig(folder or default.folder, max_bytes or default.max_bytes)
