"""Batches computed where the GPUs are: the client opens the datasets itself and the service owns only the
schedule (`StreamClient(url, compute="local")`).

A batch is a pure function of (manifests, seed, schedule, step, rank, world size), so any process that can
read the shards computes exactly the bytes the service would send. What it cannot know alone is whether
a mix change may still land on a step. A lease settles that: `POST /v1/leases {"until": U}` makes every
step below U part of the service's served past (durably, as a served read would), so no change can reach
those steps, and returns the schedule that decides them. The client computes only steps below its lease,
renews ahead of its reads, and stops at the bound with a clear error when it cannot renew: it never
computes a step a change could still alter.

The datasets are opened from the paths (or URIs) the service reports to an authenticated caller; each
must hash to the manifest the service serves from (`inputs_identity`, the service's own rule), and the
mixer's rule must be this process's, or the client refuses to start.
"""

from __future__ import annotations

import json
import threading
from typing import Callable, Sequence

import numpy as np

from pipeline.dataset import TokenDataset
from pipeline.errors import PipelineError
from service.errors import ServiceError
from service.mix_schedule import MixSchedule
from service.mix_service import inputs_identity
from service.mixer import MIX_RULE, Mixer, MixerConfig
from service.wire import Batch

# Steps leased beyond the last one asked for: a renewal per this many steps of the rank's reads.
DEFAULT_LEASE_STEPS = 64


class LocalComputeError(ServiceError, RuntimeError):
    """The client cannot compute batches itself: datasets unreachable or not the service's, or a lease
    that could not be renewed."""

    http_status = 503  # a replica past its lease while no owner answers: the client retries


class LocalCompute:
    """The service's mixer, rebuilt in this process, computing only leased steps.

    `post(path, body, must)` sends a JSON body to the service and returns the answer's bytes (with the
    client's retries: all of them when `must`, a couple of seconds' worth otherwise); `info` is the service's /v1/status as an authenticated caller sees it.
    """

    def __init__(self, info: dict, post: Callable[[str, bytes, bool], bytes], rank: int, world_size: int,
                 lease_steps: int = DEFAULT_LEASE_STEPS):
        if info.get("mix_rule") != MIX_RULE:
            raise LocalComputeError(
                f"the service computes batches with mix rule {info.get('mix_rule')}, this process with {MIX_RULE}; "
                "run the same replaymix version on both sides, or use compute=\"service\""
            )
        missing = [name for name, entry in info["datasets"].items() if "path" not in entry]
        if missing:
            raise LocalComputeError(
                f"the service gave no paths for datasets {missing}: compute=\"local\" needs a read token (give "
                "token=...), and storage this process can read (a shared filesystem or an object store)"
            )
        config = MixerConfig(seq_len=info["seq_len"], global_batch=info["global_batch"], seed=info["seed"])
        datasets = {}
        for name, entry in info["datasets"].items():
            try:
                datasets[name] = TokenDataset(entry["path"])
            except PipelineError as e:
                raise LocalComputeError(
                    f"dataset {name!r} at {entry['path']}: this process cannot open it ({e}); compute=\"local\" "
                    "needs the service's datasets on storage every trainer node reads"
                ) from e
        ours = inputs_identity(datasets, config)["datasets"]
        for name, entry in info["datasets"].items():
            if ours[name] != entry["manifest_sha256"]:
                raise LocalComputeError(
                    f"dataset {name!r} at {entry['path']}: its manifest here (sha256 {ours[name][:12]}...) is not the "
                    f"one the service serves from ({entry['manifest_sha256'][:12]}...); this node sees another "
                    "copy of the data: fix its storage, or use compute=\"service\""
                )
        self.mixer = Mixer(datasets, config, MixSchedule.from_json(info["schedule"]))
        self.mixer.check_request([0], rank, world_size)
        self.rank, self.world_size, self.lease_steps = rank, world_size, lease_steps
        # Renew between half and three quarters of the lease, staggered by rank: ranks run in lockstep, and
        # renewing all at the same step would hit the service with every rank's request at once.
        self.renew_margin = lease_steps // 2 - rank % max(1, lease_steps // 4)
        self.until = 0  # every step below it is leased: computing it gives the service's bytes
        self._post = post
        self._lock = threading.Lock()

    def batches(self, steps: Sequence[int], rank: int | None = None, world_size: int | None = None,
                dtype: np.dtype = np.int64) -> list[Batch]:
        """The rank's batches of `steps` (this client's rank, or any: a replica serves every rank), renewing
        the lease first where it falls short."""
        if not steps:
            return []
        last = max(steps)
        if last >= self.until - self.renew_margin:  # renew ahead, while leased steps remain
            self._renew(last)
        return self.mixer.batches(steps, self.rank if rank is None else rank,
                                  self.world_size if world_size is None else world_size, dtype)

    def _renew(self, last: int) -> None:
        with self._lock:
            if last < self.until - self.renew_margin:
                return  # another thread renewed meanwhile
            body = json.dumps({"until": last + 1 + self.lease_steps, "rank": self.rank,
                               "world_size": self.world_size}).encode()
            try:
                # An early renewal tries briefly (`must` False): while leased steps remain, an owner being
                # replaced must not stall training; at the bound it waits as long as the caller allows.
                answer = json.loads(self._post("/v1/leases", body, last >= self.until))
            except ServiceError as e:
                if last < self.until:
                    return  # early renewal failed: the steps asked for are still leased; try again later
                raise LocalComputeError(
                    f"step {last}: the lease ends at step {self.until} and could not be renewed ({e}); nothing at "
                    "or past it is computed, since a mix change may still land there. Restore the connection to "
                    "the service and resume from the last checkpoint"
                ) from e
            # The schedule first, then the bound: a step below the new bound is never computed with the old
            # schedule (the old one decides every step below the old bound identically anyway).
            self.mixer.set_schedule(MixSchedule.from_json(answer["schedule"]))
            self.until = answer["until"]
