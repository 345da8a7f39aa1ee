"""`python -m trainer ...`: parse the flags and train (under torchrun, once per rank)."""

import sys

from pipeline.dataset import DatasetError
from trainer.checkpoint import CheckpointError
from trainer.train_config import parse_args
from trainer.train import train
from trainer.embedding_growth import ExtensionReportError


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    try:
        train(config)
    except (DatasetError, CheckpointError, ExtensionReportError, ConnectionError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
