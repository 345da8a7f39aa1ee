"""Start Ray the same way whether a job runs on a laptop or under `ray job submit`.

With no address (and RAY_ADDRESS unset) Ray starts embedded in this process with local workers; with
an address, or under `ray job submit` (which sets RAY_ADDRESS for the job), the job joins that cluster
and uses its resources.
"""

from __future__ import annotations

import logging
import os

import ray


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Connect to the cluster at `address` / $RAY_ADDRESS, or start a local Ray with `num_cpus` CPUs."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        # A cluster owns its resources: num_cpus describes a local Ray only.
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=True)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, logging_level=logging.WARNING)
