"""The pipeline's base error, and how every replaymix command shows a user's mistake.

A mistake a user can fix (a missing or damaged file, a bad flag) raises a subclass of its package's
base error, with a message that names the file or flag and what to do: `PipelineError` here (for
DatasetError, InputError, TokenizerError, ExtensionReportError), `service.errors.ServiceError` and
`trainer.errors.TrainerError`. Every command turns those into one line `error: <message>` on stderr and
exit status 2, as argparse does for a bad flag, with `report_user_error`; any other exception is a bug
and keeps its traceback.
"""

from __future__ import annotations

import sys
import traceback

USER_ERROR_STATUS = 2


class PipelineError(Exception):
    """A preprocessing input, output or flag is unusable; the message names it and what to do.

    The message is kept apart from `args`: Ray Data appends its retry advice to the args of any error
    raised in a task ("Failed to apply UDF transform after 1/1 attempts ... if you believe this to be
    transient"), which is about Ray, not about the input, and would reach the user's one error line.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message

    def __reduce__(self) -> tuple[type, tuple[str]]:
        # Ray pickles a task's error to send it to the driver: the message travels, not the annotated args.
        return type(self), (self.message,)


class DatasetError(PipelineError):
    """A dataset on disk or in a store is missing, damaged or inconsistent; the message names the file.
    Raised by its reader (`pipeline.dataset`) and its shard cache (`pipeline.shard_cache`) alike."""


def report_user_error(error: BaseException) -> int:
    """Print a user's mistake as the one line `error: <message>`; return the exit status, 2."""
    print(f"error: {error}", file=sys.stderr)
    return USER_ERROR_STATUS


def find_pipeline_error(error: BaseException) -> PipelineError | None:
    """The PipelineError behind an exception (itself or a cause), also when Ray wrapped it.

    Ray re-raises a task's exception as a class deriving from both RayTaskError and the original's, with
    the remote traceback in its message; its `.cause` is the original, whose message is the plain one.
    """
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(getattr(error, "cause", None), PipelineError):
            return error.cause
        if isinstance(error, PipelineError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def report_pipeline_error(error: BaseException, debug: bool = False) -> int:
    """For the pipeline's commands, whose errors may come back wrapped by Ray: report the PipelineError
    behind `error` (see `report_user_error`), or re-raise `error` when there is none (a bug). With
    `debug` (a command's --debug) the full traceback, Ray's wrapping included, comes first."""
    user_error = find_pipeline_error(error)
    if user_error is None:
        raise error
    if debug:
        traceback.print_exception(error, file=sys.stderr)
    return report_user_error(user_error)
