"""The trainer's base error: every error the trainer raises on purpose derives from `TrainerError`.

Its own are CheckpointError (`checkpoint.py`), MetricsError (`metrics_log.py`), RunDirError
(`run_dir.py`) and DownstreamError (`downstream.py`); a missing CUDA device is a TrainerError itself (`train.py`). A run also meets the
pipeline's errors (a damaged dataset, a bad extension report) and the service's (a refused stream).
`python -m trainer` prints all three kinds, and `python -m trainer.report` its own, as one line
`error: ...` and exits 2 (`pipeline.errors.report_user_error`).
"""


class TrainerError(Exception):
    """A training run cannot start or go on as asked; the message names the file or flag and the fix."""
