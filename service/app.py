"""The HTTP API of the mixer service (FastAPI). `create_app(service, admin_token)` builds it.

    GET  /v1/batches/{step}?rank=R&world_size=W    one step: the rank's rows (binary, see wire.py; JSON on Accept)
    GET  /v1/batches?start=S&count=N&rank=R&world_size=W[&stride=D]
                                                   steps S, S + D, ... (N of them) in one body (wire.py)
    GET  /v1/mix                                   the schedule
    PUT  /v1/mix  {"weights": {...}, "start_step": optional}   append a stage (admin bearer token)
    GET  /v1/status   datasets, epochs, frontiers, shares served, current weights
    GET  /healthz     liveness
    GET  /metrics     Prometheus

Frontiers in /v1/status and /v1/mix: `served_frontier` is one more than the largest step requested
(what a trainer has pulled, prefetch included); `reserved` is the durable bound no served step has
reached (moved `reserve_steps` ahead at a time, see state.py); `next_change_step` is the earliest
start_step a mix change accepts, and where a change without start_step lands. It is the served
frontier while this process runs; after a kill -9 it is the reservation the killed process left, so a
change may then take effect up to `reserve_steps` steps later than the frontier a trainer reached.
Steps are idempotent: the same request returns the same bytes, also after a restart, so retries are safe.
"""

from __future__ import annotations

import hmac
from contextlib import asynccontextmanager
from typing import Optional

from fastapi import Depends, FastAPI, HTTPException, Path, Query, Request
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, Field

from service.core import MixConflict, MixService
from service.metrics import RequestMetrics
from service.mixer import Batch
from service.schedule import ScheduleError
from service.wire import MEDIA_TYPE, batch_to_json, encode_batches, token_width

MAX_RANGE_STEPS = 1024
MAX_RANGE_BYTES = 64 << 20  # one response body; bounds the memory a single request can make us hold
LARGEST_STEP = 2**62


class MixChange(BaseModel):
    weights: dict[str, float] = Field(description="dataset name -> weight; normalised to sum 1")
    start_step: Optional[int] = Field(default=None, ge=0, description="default: next_change_step in /v1/status")


def create_app(service: MixService, admin_token: str | None) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        service.close()  # a clean shutdown records exactly what was served

    app = FastAPI(title="replaymix mixer", version="1", lifespan=lifespan)
    app.add_middleware(RequestMetrics, metrics=service.metrics)
    bearer = HTTPBearer(auto_error=False)
    vocab_size = service.mixer.vocab_size
    wire_dtype = "<u2" if token_width(vocab_size) == 2 else "<u4"

    def require_admin(credentials: Optional[HTTPAuthorizationCredentials] = Depends(bearer)) -> None:
        if credentials is None:
            raise HTTPException(401, "missing bearer token: send Authorization: Bearer <admin token>",
                                headers={"WWW-Authenticate": "Bearer"})
        if admin_token is None:
            raise HTTPException(403, "mix changes are disabled: start the service with --admin-token-file")
        # Constant-time comparison, so response timing reveals nothing about the token.
        if not hmac.compare_digest(credentials.credentials.encode(), admin_token.encode()):
            raise HTTPException(403, "wrong admin token")

    def respond(request: Request, steps: list[int], rank: int, world_size: int, single: bool) -> Response:
        wants_json = "application/json" in request.headers.get("accept", "")
        try:
            # The binary path gets tokens at the wire's width straight from the maps: no int64 detour.
            batches: list[Batch] = service.batches(steps, rank, world_size, dtype="int64" if wants_json else wire_dtype)
        except ValueError as e:  # a step past the largest, or a rank or world size that does not fit
            raise HTTPException(422, str(e)) from None
        if wants_json:
            return JSONResponse(batch_to_json(batches[0]) if single else {"batches": [batch_to_json(b) for b in batches]})
        return Response(encode_batches(batches, vocab_size), media_type=MEDIA_TYPE)

    batch_responses = {200: {"content": {MEDIA_TYPE: {}, "application/json": {}}}}

    @app.get("/v1/batches/{step}", responses=batch_responses)
    def get_batch(
        request: Request,
        step: int = Path(ge=0, le=LARGEST_STEP),
        rank: int = Query(0, ge=0),
        world_size: int = Query(1, ge=1),
    ) -> Response:
        return respond(request, [step], rank, world_size, single=True)

    @app.get("/v1/batches", responses=batch_responses)
    def get_batches(
        request: Request,
        start: int = Query(ge=0, le=LARGEST_STEP, description="the first step"),
        count: int = Query(ge=1, le=MAX_RANGE_STEPS, description="how many steps"),
        rank: int = Query(0, ge=0),
        world_size: int = Query(1, ge=1),
        stride: int = Query(1, ge=1, le=LARGEST_STEP, description="steps between two batches of the range"),
    ) -> Response:
        try:
            rows = len(service.mixer.rows_of(rank, world_size))
        except ValueError as e:
            raise HTTPException(422, str(e)) from None
        # JSON spends up to ~8 characters a token; budget it so, and binary at its token width.
        token_bytes = 8 if "application/json" in request.headers.get("accept", "") else token_width(vocab_size)
        row_bytes = (service.mixer.config.seq_len + 1) * token_bytes + 1
        if count * rows * row_bytes > MAX_RANGE_BYTES:
            fits = max(1, MAX_RANGE_BYTES // (rows * row_bytes))
            raise HTTPException(422, f"count {count}: {count} steps of {rows} rows exceed the {MAX_RANGE_BYTES >> 20} MiB "
                                     f"a response may hold; ask for at most {fits} steps per request")
        return respond(request, [start + i * stride for i in range(count)], rank, world_size, single=False)

    @app.get("/v1/mix")
    def get_mix() -> dict:
        state = service.state
        return {"schedule": service.mixer.schedule.to_json(), "served_frontier": service.frontier,
                "reserved": state.reserved, "next_change_step": state.unserved_from}

    @app.put("/v1/mix", dependencies=[Depends(require_admin)])
    def put_mix(change: MixChange) -> dict:
        try:
            stage = service.change_mix(change.weights, change.start_step)
        except ScheduleError as e:
            raise HTTPException(422, str(e)) from None
        except MixConflict as e:
            raise HTTPException(409, str(e)) from None
        return {"stage": stage.to_json(), "schedule": service.mixer.schedule.to_json()}

    @app.get("/v1/status")
    def get_status() -> dict:
        return service.status()

    @app.get("/healthz")
    def healthz() -> dict:
        return {"ok": True, "served_frontier": service.frontier}

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(service.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return app
