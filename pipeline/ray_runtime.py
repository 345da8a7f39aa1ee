"""Start Ray the same way whether a job runs on a laptop or under `ray job submit`.

With no address (and RAY_ADDRESS unset) Ray starts embedded in this process with local workers; with
an address, or under `ray job submit` (which sets RAY_ADDRESS for the job), the job joins that cluster
and uses its resources. Either way the driver's Ray Data context is set up for our jobs here.
`submission_id` tells whether this process is a submitted job, and `quiet_ray_data_console` keeps
Ray Data's own log lines off the terminal.
"""

from __future__ import annotations

import json
import logging
import os
import warnings

import ray
import ray.data


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Connect to the cluster at `address` / $RAY_ADDRESS, or start a local Ray with `num_cpus` CPUs."""
    # Ray Data reserves part of the cluster per operator for the operators downstream. Our jobs are short
    # chains that fuse into one map stage, and on a small machine the reservation held that stage to one
    # task at a time (2 CPUs: one); without it every CPU works.
    ray.data.DataContext.get_current().op_resource_reservation_enabled = False
    _notice_finished_tasks_sooner()
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        # A cluster owns its resources: num_cpus describes a local Ray only.
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=True)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, logging_level=logging.WARNING)


def _notice_finished_tasks_sooner(seconds: float = 0.01) -> None:
    """Shorten how long Ray Data's scheduler waits before it sees that a task has finished.

    Its loop calls `ray.wait` for *all* running tasks with a 0.1 s timeout, so a CPU freed by a finished
    task idles up to 0.1 s before the next task starts (ray-project/ray#42377, #45934, open). On 2 CPUs
    that cost the tokenize job about 0.1 s a task; 0.01 s keeps the loop cheap and the CPUs busy. The
    setting is a module constant of Ray Data's executor, so it is changed only where it exists.
    """
    from ray.data._internal.execution import streaming_executor_state

    if hasattr(streaming_executor_state, "WAIT_FOR_TASK_COMPLETION_TIMEOUT_S"):
        streaming_executor_state.WAIT_FOR_TASK_COMPLETION_TIMEOUT_S = seconds


# Set by Ray's job manager for a job's entrypoint, and only there: {"runtime_env": ..., "metadata":
# {"job_submission_id": ...}}. Ray's own driver start-up reads it by this name (ray._private.worker).
JOB_CONFIG_ENV_VAR = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def submission_id() -> str | None:
    """The id of the `ray job submit` job this process is the entrypoint of, or None when it is not one.

    Read from the environment, so it is known before Ray is started or joined.
    """
    config = os.environ.get(JOB_CONFIG_ENV_VAR)
    if not config:
        return None
    try:
        metadata = json.loads(config).get("metadata") or {}
    except (ValueError, AttributeError):
        metadata = {}
    return str(metadata.get("job_submission_id") or "(id unknown)")


def quiet_ray_data_console() -> None:
    """Keep Ray Data's log off the terminal; its log file (the Ray session's logs/ray-data*) keeps it all.

    When a read or encode task fails on bad input, Ray Data logs its own account of the failure (about
    200 lines of traceback, ending for errors outside a map function in "please open an issue on the Ray
    project") before the command can print its one error line naming the file and line. Ray Data
    configures its loggers when `ray.data` is imported (done above), with one console handler. Its
    Python warnings (tuning hints such as "the operator only received 1 input(s)") go too.
    """
    for handler in logging.getLogger("ray.data").handlers:
        if isinstance(handler, logging.StreamHandler):
            handler.setLevel(logging.CRITICAL)
    warnings.filterwarnings("ignore", module=r"ray\.data\.")
