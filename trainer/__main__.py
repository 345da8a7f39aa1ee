"""`python -m trainer ...`: parse the flags and train (under torchrun, once per rank)."""

import sys

from pipeline.errors import PipelineError, report_user_error
from service.errors import ServiceError
from trainer.errors import TrainerError
from trainer.train_config import parse_args
from trainer.train import train

# A damaged dataset or extension report, a refused or unreachable stream, an unusable checkpoint, and the
# ValueErrors of the model's and schedule's own checks, all stop the run with one line.
USER_ERRORS = (PipelineError, ServiceError, TrainerError, ConnectionError, ValueError)


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    try:
        train(config)
    except USER_ERRORS as e:
        return report_user_error(e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
