"""Start Ray the same way whether a job runs on a laptop or under `ray job submit`.

With no address (and RAY_ADDRESS unset) Ray starts embedded in this process with local workers; with
an address, or under `ray job submit` (which sets RAY_ADDRESS for the job), the job joins that cluster
and uses its resources. Either way the driver's Ray Data context is set up for our jobs here.
"""

from __future__ import annotations

import logging
import os

import ray
import ray.data


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Connect to the cluster at `address` / $RAY_ADDRESS, or start a local Ray with `num_cpus` CPUs."""
    # Ray Data reserves part of the cluster per operator for the operators downstream. Our jobs are short
    # chains that fuse into one map stage, and on a small machine the reservation held that stage to one
    # task at a time (2 CPUs: one); without it every CPU works.
    ray.data.DataContext.get_current().op_resource_reservation_enabled = False
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        # A cluster owns its resources: num_cpus describes a local Ray only.
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=True)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, logging_level=logging.WARNING)
