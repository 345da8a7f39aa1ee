"""The HTTP API of the mixer service (FastAPI). `create_app(service, access)` builds it.

    GET    /v1/batches/{step}?rank=R&world_size=W    one step: the rank's rows (binary, see wire.py; JSON on Accept)
    GET    /v1/batches?start=S&count=N&rank=R&world_size=W[&stride=D]
                                                     steps S, S + D, ... (N of them) in one body (wire.py)
    POST   /v1/leases {"until": U, "rank": R, "world_size": W}
                                                     lease steps < U to a client that computes its own rows
    GET    /v1/mix                                   the schedule and the log of every change
    PUT    /v1/mix  {"weights": {...}, "start_step": optional, "by": optional, "reason": optional}
                                                     append a stage (admin token)
    DELETE /v1/mix/stages/{start_step}               withdraw a stage no step has reached (admin token)
    POST   /v1/feedback {"step": S, "losses": {...}}  a trainer's validation losses, for the controller
    GET    /v1/controller                            the controller's state, observations and decisions
    PUT    /v1/controller {"enabled": bool}          resume or suspend it (admin token)
    GET    /v1/status   datasets, epochs, frontiers, shares served, current weights
    GET    /healthz     liveness
    GET    /metrics     Prometheus
    GET    /docs, /redoc, /openapi.json   the API described, every endpoint, error and the binary layout

Access: reads (batches, mix, status) need the read token or the admin token as a bearer token, unless
the service runs with --allow-anonymous-reads; changes need the admin token. Anonymous callers never
see paths on the server's disk.

The app talks to one object, `MixService`; the frontiers it reports (`served_frontier`, `reserved`,
`next_change_step`) are defined in state.py and mix_service.py. A read more than `max_lookahead` steps
past the first unserved step is refused (409) and moves nothing. Steps are idempotent: the same request
returns the same bytes, also after a restart, so retries are safe.
"""

from __future__ import annotations

import hmac
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Optional

from fastapi import Depends, FastAPI, HTTPException, Path, Query, Request
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi_offline import FastAPIOffline
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, Field

from pipeline.dataset import token_dtype
from pipeline.errors import PipelineError
from service.control_laws import Feedback
from service.errors import ServiceError
from service.mix_service import MAX_BODY_BYTES, MixService
from service.prometheus_metrics import RequestMetrics
from service.replica import ReplicaService
from service import wire
from service.wire import MAX_RANGE_STEPS, MEDIA_TYPE, Batch, batch_to_json, encode_batches

LARGEST_STEP = 2**62


API_DESCRIPTION = f"""Replay-mixed training batches for continual pretraining. A batch is a pure function of
(dataset manifests, seed, mix schedule, step, rank, world size); the schedule changes only at steps not
yet served.

**Access.** Send `Authorization: Bearer <token>`: the read token (or the admin token) for GETs of
batches, mix and status, unless the service allows anonymous reads; the admin token for changes.

**Binary batch** (`{MEDIA_TYPE}`), all integers little-endian:

{wire.__doc__.split("All integers little-endian. One body holds one rank's rows of one step:", 1)[1]}"""

# What the error answers mean, for the OpenAPI document (every error body is {{"detail": "..."}}).
_DETAIL = {"application/json": {"schema": {"type": "object", "properties": {"detail": {"type": "string"}}}}}
READ_ERRORS: dict = {
    401: {"description": "no bearer token, and the service does not allow anonymous reads", "content": _DETAIL},
    403: {"description": "a bearer token that is neither the read nor the admin token", "content": _DETAIL},
}
CHANGE_ERRORS: dict = {
    401: {"description": "no bearer token", "content": _DETAIL},
    403: {"description": "a wrong admin token, or mix changes are disabled (no --admin-token-file)", "content": _DETAIL},
    409: {"description": "the step may have been served, or is not after the last scheduled stage", "content": _DETAIL},
    422: {"description": "invalid weights (every dataset named, finite, >= 0, not all zero) or step", "content": _DETAIL},
}
NO_CONTROLLER: dict = {"description": "this service runs no controller (start it with --controller)", "content": _DETAIL}
CONFLICT_FEEDBACK: dict = {"description": "no controller, or feedback older than the latest", "content": _DETAIL}
INVALID_FEEDBACK: dict = {"description": "losses for an unknown dataset, not finite or negative, or a step not served yet",
                          "content": _DETAIL}
BATCH_RESPONSES: dict = {
    200: {"description": "the batch(es): binary (layout in the API description) or JSON",
          "content": {MEDIA_TYPE: {"schema": {"type": "string", "format": "binary"}},
                      "application/json": {"schema": {"type": "object"}}}},
    **READ_ERRORS,
    409: {"description": "a step more than max_lookahead steps past the first unserved step", "content": _DETAIL},
    422: {"description": "a step past the largest, a rank or world size that does not fit the global batch, or "
                         "a range larger than one body may hold", "content": _DETAIL},
    503: {"description": "a dataset's data is unavailable: its object store unreachable, an object changed since "
                         "the dataset was written (sha256), or the local shard cache full; nothing is served, "
                         "the detail names the object", "content": _DETAIL},
}


@dataclass(frozen=True)
class Access:
    """Who may do what: bearer tokens for reading and for changing the mix (None: nobody holds one)."""

    admin_token: str | None = None
    read_token: str | None = None
    anonymous_reads: bool = False


class LeaseRequest(BaseModel):
    until: int = Field(ge=1, le=LARGEST_STEP, description="lease every step below this one")
    rank: int = Field(default=0, ge=0, description="the asking rank (checked against world_size; leases are on steps)")
    world_size: int = Field(default=1, ge=1, description="ranks sharing each global batch")


LEASE_RESPONSES: dict = {
    **READ_ERRORS,
    409: {"description": "`until` more than max_lookahead steps past the first unserved step", "content": _DETAIL},
    422: {"description": "a rank or world size that does not fit the global batch", "content": _DETAIL},
}


class FeedbackReport(BaseModel):
    step: int = Field(ge=0, le=LARGEST_STEP, description="updates done: the losses of the model trained on steps < step")
    losses: dict[str, float] = Field(max_length=255, description="validation loss per dataset name")
    source_losses: dict[str, float] = Field(default_factory=dict, max_length=255,
                                            description="optional: training loss per source, from the rows received")


class ControllerChange(BaseModel):
    enabled: bool = Field(description="resume (true) or suspend (false) the controller")
    by: str = Field(default="operator", max_length=200, description="who asks, for the log")


class MixChange(BaseModel):
    weights: dict[str, float] = Field(description="dataset name -> weight, every dataset named (0 leaves one out); "
                                                  "normalised to sum 1")
    start_step: Optional[int] = Field(default=None, ge=0, description="default: next_change_step in /v1/status")
    by: str = Field(default="operator", max_length=200, description="who asks, for the log")
    reason: Optional[str] = Field(default=None, max_length=2000, description="why, for the log")


def _matches(credentials: HTTPAuthorizationCredentials, token: str | None) -> bool:
    # Constant-time comparison, so response timing reveals nothing about the token.
    return token is not None and hmac.compare_digest(credentials.credentials.encode(), token.encode())


def create_app(service: MixService | ReplicaService, access: Access) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        service.close()  # a clean shutdown records exactly what was served

    # The docs pages load Swagger UI and ReDoc from files shipped in the package (fastapi-offline), not a
    # CDN, so /docs and /redoc work on an air-gapped cluster.
    app = FastAPIOffline(title="replaymix mixer", version="1", lifespan=lifespan, description=API_DESCRIPTION)

    @app.exception_handler(ServiceError)
    async def service_error(request: Request, error: ServiceError) -> JSONResponse:
        """Every refusal of the service answers by its error's own status: one mapping for every endpoint."""
        return JSONResponse({"detail": str(error)}, status_code=error.http_status)

    app.add_middleware(RequestMetrics, metrics=service.metrics)
    bearer = HTTPBearer(auto_error=False)
    wire_dtype = token_dtype(service.vocab_size)

    def require_admin(credentials: Optional[HTTPAuthorizationCredentials] = Depends(bearer)) -> None:
        if credentials is None:
            raise HTTPException(401, "missing bearer token: send Authorization: Bearer <admin token>",
                                headers={"WWW-Authenticate": "Bearer"})
        if access.admin_token is None:
            raise HTTPException(403, "mix changes are disabled: start the service with --admin-token-file")
        if not _matches(credentials, access.admin_token):
            raise HTTPException(403, "wrong admin token")

    async def require_reader(credentials: Optional[HTTPAuthorizationCredentials] = Depends(bearer)) -> bool:
        """Whether the caller is authenticated (anonymous reads, where allowed, are not). Async: a string
        comparison needs no worker thread, and a thread hop per request is most of a lease's latency."""
        if credentials is None:
            if access.anonymous_reads:
                return False
            raise HTTPException(401, "missing bearer token: send Authorization: Bearer <read token> (the service's "
                                     "--read-token-file)", headers={"WWW-Authenticate": "Bearer"})
        if not (_matches(credentials, access.read_token) or _matches(credentials, access.admin_token)):
            raise HTTPException(403, "wrong read token")
        return True

    async def require_token(request: Request, authenticated: bool = Depends(require_reader)) -> None:
        """Leases and feedback change what the service records: a token, even where anonymous reads are allowed."""
        if not authenticated:
            raise HTTPException(401, f"{request.url.path} needs a token: send Authorization: Bearer <read token>",
                                headers={"WWW-Authenticate": "Bearer"})

    def who(request: Request, by: str) -> str:
        return f"{by} ({request.client.host if request.client else 'unknown address'})"

    def respond(request: Request, steps: list[int], rank: int, world_size: int, single: bool) -> Response:
        wants_json = "application/json" in request.headers.get("accept", "")
        try:
            # The binary path gets tokens at the wire's width straight from the maps: no int64 detour.
            batches: list[Batch] = service.batches(steps, rank, world_size, dtype="int64" if wants_json else wire_dtype)
        except ServiceError:
            raise  # mapped by its status, below
        except PipelineError as e:  # a remote dataset's store down, an object changed, the cache full
            raise HTTPException(503, str(e)) from None
        except ValueError as e:  # a step past the largest, or a rank or world size that does not fit
            raise HTTPException(422, str(e)) from None
        if wants_json:
            return JSONResponse(batch_to_json(batches[0]) if single else {"batches": [batch_to_json(b) for b in batches]})
        return Response(encode_batches(batches, service.vocab_size), media_type=MEDIA_TYPE)

    @app.get("/v1/batches/{step}", responses=BATCH_RESPONSES, dependencies=[Depends(require_reader)])
    def get_batch(
        request: Request,
        step: int = Path(ge=0, le=LARGEST_STEP),
        rank: int = Query(0, ge=0),
        world_size: int = Query(1, ge=1),
    ) -> Response:
        """The rank's rows of one step: binary (see the layout in the API description) or, with
        `Accept: application/json`, JSON. The same request returns the same bytes, always."""
        return respond(request, [step], rank, world_size, single=True)

    @app.get("/v1/batches", responses=BATCH_RESPONSES, dependencies=[Depends(require_reader)])
    def get_batches(
        request: Request,
        start: int = Query(ge=0, le=LARGEST_STEP, description="the first step"),
        count: int = Query(ge=1, le=MAX_RANGE_STEPS, description="how many steps"),
        rank: int = Query(0, ge=0),
        world_size: int = Query(1, ge=1),
        stride: int = Query(1, ge=1, le=LARGEST_STEP, description="steps between two batches of the range"),
    ) -> Response:
        """Steps start, start + stride, ... (count of them) in one body: the binary bodies of the steps back
        to back, or `{"batches": [...]}` in JSON."""
        # JSON spends up to ~8 characters a token; budget it so, and binary at its token width.
        wants_json = "application/json" in request.headers.get("accept", "")
        try:
            fits = service.steps_per_body(rank, world_size, 8 if wants_json else wire_dtype.itemsize)
        except ValueError as e:
            raise HTTPException(422, str(e)) from None
        if count > fits:
            raise HTTPException(422, f"count {count}: {count} steps of this rank's rows exceed the "
                                     f"{MAX_BODY_BYTES >> 20} MiB a response may hold; ask for at most {fits} steps per request")
        return respond(request, [start + i * stride for i in range(count)], rank, world_size, single=False)

    @app.post("/v1/leases", responses=LEASE_RESPONSES, dependencies=[Depends(require_token)])
    async def post_lease(lease: LeaseRequest) -> dict:
        """Lease every step below `until` to a client that computes batches itself from the datasets
        (`compute="local"`; read or admin token): the steps count as served from now on, so no mix change
        reaches them, and the answer's `schedule` gives their batches exactly. Renew before reaching `until`;
        a lease never expires. On the event loop, not a worker thread: a lease is about a millisecond of
        CPU (a durable write only when the reservation moves, every --reserve-steps steps), and with
        thousands of ranks the queue for the thread pool, not the work, was the latency."""
        try:
            return service.lease(lease.until, lease.rank, lease.world_size)
        except ServiceError:
            raise
        except ValueError as e:  # a rank or world size that does not fit
            raise HTTPException(422, str(e)) from None

    @app.get("/v1/mix", dependencies=[Depends(require_reader)], responses=READ_ERRORS)
    def get_mix() -> dict:
        """The schedule (stages of start_step and weights), the log of every change (who, when, what), and
        the frontiers: `served_frontier`, `reserved` and `next_change_step`."""
        return service.mix()

    @app.put("/v1/mix", dependencies=[Depends(require_admin)], responses=CHANGE_ERRORS)
    def put_mix(request: Request, change: MixChange) -> dict:
        """Append a stage to the schedule (admin token): from `start_step` on (default: `next_change_step`,
        past every step served and every stage scheduled) datasets are drawn at `weights`. Recorded in the
        log, durably, before the answer."""
        stage = service.change_mix(change.weights, change.start_step, who(request, change.by), change.reason)
        return {"stage": stage.to_json(), **service.mix()}

    @app.delete("/v1/mix/stages/{start_step}", dependencies=[Depends(require_admin)],
                responses={**CHANGE_ERRORS, 404: {"description": "no stage starts at this step"}})
    def cancel_stage(
        request: Request,
        start_step: int = Path(ge=0, le=LARGEST_STEP),
        by: str = Query("operator", max_length=200, description="who asks, for the log"),
        reason: Optional[str] = Query(None, max_length=2000, description="why, for the log"),
    ) -> dict:
        """Withdraw the stage that starts at `start_step` (admin token), allowed only while no step at or
        past it may have been served; recorded in the log."""
        stage = service.cancel_stage(start_step, who(request, by), reason)
        return {"cancelled": stage.to_json(), **service.mix()}

    @app.get("/v1/status", responses=READ_ERRORS)
    def get_status(authenticated: bool = Depends(require_reader)) -> dict:
        """Datasets (tokens, windows, samples served, epoch, share served; their paths on the server's disk
        for authenticated callers only), vocabulary, seq_len, global batch, seed, mix rule, frontiers,
        current weights and the schedule."""
        return service.status(include_paths=authenticated)

    @app.post("/v1/feedback", responses={**READ_ERRORS, 409: CONFLICT_FEEDBACK, 422: INVALID_FEEDBACK},
              dependencies=[Depends(require_token)])
    def post_feedback(request: Request, report: FeedbackReport) -> dict:
        """A trainer's validation losses at an evaluation step (read or admin token). Recorded in the log
        and folded into the controller, whose decision, if any, is appended as a stage; answered with that
        stage (or null) and the controller's state. Trainers send it when /v1/status says feedback.wanted."""
        return service.feedback(Feedback(report.step, report.losses, report.source_losses), who(request, "trainer"))

    @app.get("/v1/controller", dependencies=[Depends(require_reader)], responses={**READ_ERRORS, 409: NO_CONTROLLER})
    def get_controller() -> dict:
        """The controller's law, settings, state, every observation and every decision with its reason."""
        return service.controller_state()

    @app.put("/v1/controller", dependencies=[Depends(require_admin)], responses={**CHANGE_ERRORS, 409: NO_CONTROLLER})
    def put_controller(request: Request, change: ControllerChange) -> dict:
        """Resume or suspend the controller (admin token); an operator's change of the mix suspends it."""
        return service.set_controller(change.enabled, who(request, change.by))

    @app.get("/healthz")
    def healthz() -> dict:
        """Liveness: answers while the service runs (no token needed); a replica names its owner."""
        replica = {"replica_of": service.owner_url} if isinstance(service, ReplicaService) else {}
        return {"ok": True, "served_frontier": service.frontier, **replica}

    @app.get("/metrics", responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
    def metrics() -> Response:
        """Prometheus metrics: tokens served per dataset, mix weights, frontiers, request latency."""
        return Response(service.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return app
