"""`python -m service ...`: open the datasets, resume or start the state dir, serve on uvicorn."""

from __future__ import annotations

import os
import sys
from typing import Sequence

import uvicorn

from pipeline.dataset import TokenDataset
from pipeline.errors import PipelineError, report_user_error
from pipeline.tokenizer.encoding_mix import warn_encoding_mixes
from service.app import Access, create_app
from service.replica import ReplicaError, ReplicaService
from service.service_config import ReplicaConfig, ServiceConfig, parse_args
from service.mix_service import MixService
from service.mixer import MixerConfig
from service.errors import ServiceError
from service.tokens import read_token

# A damaged dataset, an unusable or owned state, a token file, or inputs the mixer refuses (MixError) stop
# the start with one line; anything else is a bug and keeps its traceback.
USER_ERRORS = (PipelineError, ServiceError)


def build_service(config: ServiceConfig) -> MixService:
    datasets = {name: TokenDataset(path, verify=config.verify, cache=config.cache)
                for name, path in config.datasets.items()}
    warn_encoding_mixes(datasets)  # a base-tokenized dataset beside its extension's: said once, at start-up
    mixer_config = MixerConfig(seq_len=config.seq_len, global_batch=config.global_batch, seed=config.seed)
    address = f"{'https' if config.ssl_certfile else 'http'}://{config.host}:{config.port}"
    return MixService(datasets, mixer_config, config.state_dir, config.weights, reserve_steps=config.reserve_steps,
                      max_lookahead=config.max_lookahead, controller=config.controller, address=address,
                      standby=config.standby, lease_seconds=config.lease_seconds, on_lost=_stop_serving,
                      waiting=lambda owner: print(f"standby: {config.state_dir} is owned by {owner}; waiting to take "
                                                  "it over", file=sys.stderr, flush=True))


def _stop_serving(reason: str) -> None:
    """The state's lease was taken over: this process is no longer its owner and must not serve another
    step (its writes are refused already). Ends at once, as a crash would: nothing of the state is its to write."""
    print(f"error: {reason}; this service stops", file=sys.stderr, flush=True)
    os._exit(3)


def build_replica(config: ReplicaConfig, access: Access) -> ReplicaService:
    token = access.read_token or access.admin_token
    if token is None:
        raise ReplicaError("--replica-of needs --read-token-file (or --admin-token-file): the replica leases steps "
                           "from the owner and reads the datasets' paths from it, both with a token")
    return ReplicaService(config.owner_urls, token, access.admin_token, config.dataset_paths, config.lease_steps)


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_args(argv)
    try:
        access = Access(
            admin_token=read_token(config.admin_token_file, "--admin-token-file"),
            read_token=read_token(config.read_token_file, "--read-token-file"),
            anonymous_reads=config.allow_anonymous_reads,
        )
        if isinstance(config, ReplicaConfig):
            service = build_replica(config, access)
        else:
            service = build_service(config)
    except USER_ERRORS as e:
        return report_user_error(e)
    if isinstance(config, ReplicaConfig):
        print(f"replica of {service.owner_url} serving on {'https' if config.ssl_certfile else 'http'}://"
              f"{config.host}:{config.port} (leases of {config.lease_steps} steps; owner URLs "
              f"{', '.join(config.owner_urls)})", file=sys.stderr)
        return _serve(create_app(service, access), config)
    status = service.status()
    served = ", ".join(f"{name}={config.datasets[name]}" for name in status["datasets"])
    reads = "anonymous reads allowed" if access.anonymous_reads else "reads need a token"
    print(
        f"serving {served} on "
        f"{'https' if config.ssl_certfile else 'http'}://{config.host}:{config.port} (served frontier {status['served_frontier']}, reserved "
        f"{status['reserved']}, mix changes from step {status['next_change_step']}, "
        f"{len(status['schedule'])} stage(s), mix {'changeable' if access.admin_token else 'read-only'}, {reads})",
        file=sys.stderr,
    )
    return _serve(create_app(service, access), config)


def _serve(app, config: ServiceConfig | ReplicaConfig) -> int:
    uvicorn.run(app, host=config.host, port=config.port, log_level=config.log_level,
                ssl_keyfile=config.ssl_keyfile, ssl_certfile=config.ssl_certfile)
    return 0


if __name__ == "__main__":
    sys.exit(main())
