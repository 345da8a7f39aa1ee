"""`python -m trainer ...`: parse the flags and train (under torchrun, once per rank)."""

import os
import shlex
import sys
from typing import Sequence

from pipeline.errors import PipelineError, report_user_error
from service.errors import ServiceError
from trainer.errors import TrainerError
from trainer.stop_request import RunStopped
from trainer.train_config import parse_args, resume_command
from trainer.train import train

# A damaged dataset or extension report, a refused or unreachable stream, an unusable checkpoint or flags
# that do not fit: the user's to fix, so one line. Anything else is a bug and keeps its traceback.
USER_ERRORS = (PipelineError, ServiceError, TrainerError, ConnectionError)


def how_to_resume(argv: Sequence[str]) -> str:
    """The command line that resumes the run `argv` started; under torchrun, with the user's own launcher
    options, which this process cannot see."""
    flags = shlex.join(resume_command(argv))
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return f"torchrun <the same torchrun options> -m trainer {flags}"
    return f"{shlex.join([sys.executable, '-m', 'trainer'])} {flags}"


def die_with_launcher() -> None:
    """Under torchrun, end this rank when its torchrun agent ends. The agent starts each rank in a session of
    its own, so a SIGKILL of the job's process group (a killed `python -m recipe run`, a scheduler's kill)
    takes the agent but not the ranks, which would train on, orphaned, into the run folder that the rerun
    resumes from. Linux's parent-death signal ends them with it; elsewhere nothing is changed."""
    if "TORCHELASTIC_RUN_ID" not in os.environ or not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    agent = os.getppid()
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if agent == 1 or os.getppid() != agent:  # the agent ended before (orphans go to init) or while it was asked for
        os._exit(128 + signal.SIGKILL)


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    die_with_launcher()
    config = parse_args(argv)
    try:
        train(config)
    except USER_ERRORS as e:
        return report_user_error(e)
    except RunStopped as stopped:
        if stopped.is_main:
            print(f"{stopped}; resume with:\n  {how_to_resume(argv)}", file=sys.stderr, flush=True)
        return stopped.exit_status
    return 0


if __name__ == "__main__":
    sys.exit(main())
