"""`python -m service ...`: open the datasets, resume or start the state dir, serve on uvicorn."""

from __future__ import annotations

import sys
from typing import Sequence

import uvicorn

from pipeline.dataset import DatasetError, TokenDataset
from service.app import create_app
from service.config import ServiceConfig, parse_args
from service.core import MixService
from service.mixer import MixerConfig
from service.schedule import MixSchedule, ScheduleError
from service.state import StateError
from service.vocab import VocabularyError


def read_admin_token(config: ServiceConfig) -> str | None:
    if config.admin_token_file is None:
        return None
    try:
        token = config.admin_token_file.read_text().strip()
    except OSError as e:
        raise StateError(f"--admin-token-file {config.admin_token_file}: cannot read it ({e.strerror})") from e
    if len(token) < 16:
        raise StateError(f"--admin-token-file {config.admin_token_file}: the token must be at least 16 characters")
    return token


def build_service(config: ServiceConfig) -> MixService:
    datasets = {name: TokenDataset(path, verify=config.verify) for name, path in config.datasets.items()}
    mixer_config = MixerConfig(seq_len=config.seq_len, global_batch=config.global_batch, seed=config.seed)
    return MixService(datasets, mixer_config, MixSchedule.constant(config.weights), config.state_dir,
                      reserve_steps=config.reserve_steps)


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_args(argv)
    try:
        admin_token = read_admin_token(config)
        service = build_service(config)
    except (DatasetError, VocabularyError, StateError, ScheduleError, ValueError) as e:
        print(f"python -m service: cannot start: {e}", file=sys.stderr)
        return 2
    status = service.status()
    served = ", ".join(f"{name}={entry['path']}" for name, entry in status["datasets"].items())
    print(
        f"serving {served} on "
        f"http://{config.host}:{config.port} (served frontier {status['served_frontier']}, reserved "
        f"{status['reserved']}, mix changes from step {status['next_change_step']}, "
        f"{len(status['schedule'])} stage(s), mix {'changeable' if admin_token else 'read-only'})",
        file=sys.stderr,
    )
    app = create_app(service, admin_token)
    uvicorn.run(app, host=config.host, port=config.port, log_level=config.log_level)
    return 0


if __name__ == "__main__":
    sys.exit(main())
