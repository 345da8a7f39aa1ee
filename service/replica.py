"""A read replica: serves batches over HTTP beside the schedule's owner, holding only leases from it.

`python -m service --replica-of URL[,URL...]` runs the same HTTP API as the owner (app.py) for ranks
that do not compute their own rows, so that many trainer nodes spread their reads over many replicas.
A replica owns no state. It opens the datasets itself (the paths the owner reports, or `--dataset`
overrides for where this node mounts them), refuses to start unless each hashes to the manifest the
owner serves from, and computes a step's rows only under a lease from the owner (local_compute.py): the
lease makes the step part of the owner's served past, durably, before the replica computes it. So no
replica serves a step whose schedule could still change, and every replica serves the owner's bytes.

Everything else is the owner's: a mix change, a cancel, feedback, leases and the controller are sent on
to it (the replica checks the admin token itself and sends its own), and the status and mix are its. A
change made through any replica lands for all of them at the same step, because the owner puts it past
every step it ever leased. With several owner URLs (the owner and its standbys) the replica follows
ownership: a URL that does not answer, or answers 5xx, hands the request to the next; while no owner
answers, the replica keeps serving the steps it holds leases for.
"""

from __future__ import annotations

import json
import time
from typing import Mapping, Sequence

import numpy as np

from service.errors import ServiceError
from service.local_compute import LocalCompute
from service.mix_schedule import Stage
from service.mix_service import count_served_tokens, steps_per_body
from service.prometheus_metrics import ServiceMetrics
from service.transport import KeepAliveConnections, TransportError
from service.wire import Batch

DEFAULT_REPLICA_LEASE_STEPS = 256  # steps leased ahead: a renewal per this many steps of its furthest reader
# How long a lease renewal keeps trying the owner URLs. Short: while steps remain leased the replica serves
# them and tries again at the next request; past its lease it answers 503 and the trainer's client retries.
RENEWAL_PATIENCE_S = 2.0


class ReplicaError(ServiceError):
    """A replica that cannot start: its datasets are not the owner's, or no owner answers."""


class OwnerAnswered(ServiceError):
    """The owner refused a request sent on by a replica; carries its HTTP status and detail."""

    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.http_status = status


class OwnerUnreachable(ServiceError):
    """No owner URL answered within the retry budget."""

    http_status = 503


class ReplicaService:
    """The parts of MixService's interface the HTTP API uses, answered by a replica."""

    def __init__(self, owner_urls: str | Sequence[str], token: str | None, admin_token: str | None = None,
                 dataset_paths: Mapping[str, str] | None = None, lease_steps: int = DEFAULT_REPLICA_LEASE_STEPS,
                 retry_for: float = 60.0, timeout: float = 10.0):
        self._owner = KeepAliveConnections(owner_urls, timeout, token)
        self._admin = KeepAliveConnections(owner_urls, timeout, admin_token) if admin_token else None
        self.retry_for = retry_for
        info = json.loads(self._send(self._owner, "/v1/status"))
        if dataset_paths:
            unknown = sorted(set(dataset_paths) - set(info["datasets"]))
            if unknown:
                raise ReplicaError(f"--dataset {unknown}: the owner serves no such dataset; it serves "
                                   f"{sorted(info['datasets'])}")
            for name, path in dataset_paths.items():
                info["datasets"][name]["path"] = path
        # Checks the manifests against the owner's and the mix rule, and opens the datasets.
        self._leases = LocalCompute(
            info, lambda path, body, must: self._send(self._owner, path, json_body=body, patience=RENEWAL_PATIENCE_S),
            rank=0, world_size=1, lease_steps=lease_steps)
        self.mixer = self._leases.mixer
        self.metrics = ServiceMetrics(self.mixer.names)

    @property
    def owner_url(self) -> str:
        return self._owner.url

    @property
    def vocab_size(self) -> int:
        return self.mixer.vocab_size

    @property
    def frontier(self) -> int:
        """The end of this replica's lease: every step below it can be served from here."""
        return self._leases.until

    def steps_per_body(self, rank: int, world_size: int, token_bytes: int) -> int:
        return steps_per_body(self.mixer, rank, world_size, token_bytes)

    def batches(self, steps: Sequence[int], rank: int = 0, world_size: int = 1, dtype: np.dtype = np.int64) -> list[Batch]:
        self.mixer.check_request(steps, rank, world_size)
        batches = self._leases.batches(steps, rank, world_size, dtype)
        count_served_tokens(self.metrics, self.mixer, batches)
        return batches

    # --- the owner's, sent on ------------------------------------------------------------------------

    def lease(self, until: int, rank: int = 0, world_size: int = 1) -> dict:
        return self._json("/v1/leases", {"until": until, "rank": rank, "world_size": world_size})

    def mix(self) -> dict:
        return self._json("/v1/mix")

    def status(self, include_paths: bool = False) -> dict:
        status = self._json("/v1/status")
        for name, entry in status["datasets"].items():
            if include_paths:
                entry["path"] = self.mixer.datasets[name].uri  # where this replica reads it
            else:
                entry.pop("path", None)
        status["replica_of"] = self.owner_url
        return status

    def feedback(self, feedback, by: str) -> dict:
        return self._json("/v1/feedback", {"step": feedback.step, "losses": feedback.losses,
                                           "source_losses": feedback.source_losses})

    def controller_state(self) -> dict:
        return self._json("/v1/controller")

    def change_mix(self, weights: Mapping[str, float], start_step: int | None = None, by: str = "operator",
                   reason: str | None = None) -> Stage:
        answer = self._json("/v1/mix", {"weights": dict(weights), "start_step": start_step, "by": by,
                                        "reason": reason}, method="PUT", admin=True)
        return Stage.from_json(answer["stage"], "the owner's answer")

    def cancel_stage(self, start_step: int, by: str = "operator", reason: str | None = None) -> Stage:
        params = {"by": by, **({"reason": reason} if reason else {})}
        answer = self._json(f"/v1/mix/stages/{start_step}", params=params, method="DELETE", admin=True)
        return Stage.from_json(answer["cancelled"], "the owner's answer")

    def set_controller(self, enabled: bool, by: str = "operator") -> dict:
        return self._json("/v1/controller", {"enabled": enabled, "by": by}, method="PUT", admin=True)

    def close(self) -> None:
        self._owner.close()
        if self._admin is not None:
            self._admin.close()

    def _json(self, path: str, body: dict | None = None, *, params: dict | None = None, method: str | None = None,
              admin: bool = False) -> dict:
        connections = self._admin if admin else self._owner
        if connections is None:
            raise OwnerAnswered(403, "mix changes are disabled on this replica: start it with --admin-token-file")
        payload = json.dumps(body).encode() if body is not None else None
        return json.loads(self._send(connections, path, params=params, json_body=payload, method=method))

    def _send(self, connections: KeepAliveConnections, path: str, *, params: dict | None = None,
              json_body: bytes | None = None, method: str | None = None, patience: float | None = None) -> bytes:
        """The owner's answer body; OwnerAnswered for a 4xx, OwnerUnreachable when no owner URL answered
        without a 5xx within `patience` (default `retry_for`; each failure moves on to the next URL)."""
        patience = self.retry_for if patience is None else patience
        deadline, delay = time.monotonic() + patience, 0.05
        while True:
            try:
                status, answer = connections.request(path, params, "application/json", json_body, method=method)
                if status < 500:
                    break
                problem = f"HTTP {status}: {bytes(answer[:200]).decode(errors='replace')}"
            except TransportError as e:
                problem = str(e)
            if time.monotonic() + delay > deadline:
                raise OwnerUnreachable(f"no owner answered {path} for {patience:.0f} s (tried "
                                       f"{', '.join(connections.urls)}); last: {problem}")
            time.sleep(delay)
            delay = min(delay * 2, 1.0)
        if status >= 400:
            try:
                detail = json.loads(answer).get("detail", "")
            except ValueError:
                detail = bytes(answer[:500]).decode(errors="replace")
            raise OwnerAnswered(status, f"the owner ({connections.url}) answered: {detail}")
        return answer


