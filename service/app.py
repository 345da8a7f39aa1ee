"""The HTTP API of the mixer service (FastAPI). `create_app(service, admin_token)` builds it.

    GET  /v1/batches/{step}?rank=R&world_size=W   the rank's rows (binary, see wire.py; JSON on Accept)
    GET  /v1/mix                                  the schedule
    PUT  /v1/mix  {"weights": {...}, "start_step": optional}   append a stage (admin bearer token)
    GET  /v1/status   datasets, epochs, served frontier, shares served, current weights
    GET  /healthz     liveness
    GET  /metrics     Prometheus
"""

from __future__ import annotations

import hmac
import time
from typing import Optional

from fastapi import Depends, FastAPI, HTTPException, Path, Query, Request
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, Field

from service.core import MixConflict, MixService
from service.schedule import ScheduleError
from service.wire import MEDIA_TYPE, batch_to_json, encode_batch


class MixChange(BaseModel):
    weights: dict[str, float] = Field(description="dataset name -> weight; normalised to sum 1")
    start_step: Optional[int] = Field(default=None, ge=0, description="default: the first step not yet served")


def create_app(service: MixService, admin_token: str | None) -> FastAPI:
    app = FastAPI(title="replaymix mixer", version="1")
    bearer = HTTPBearer(auto_error=False)

    def require_admin(credentials: Optional[HTTPAuthorizationCredentials] = Depends(bearer)) -> None:
        if credentials is None:
            raise HTTPException(401, "missing bearer token: send Authorization: Bearer <admin token>",
                                headers={"WWW-Authenticate": "Bearer"})
        if admin_token is None:
            raise HTTPException(403, "mix changes are disabled: start the service with --admin-token-file")
        # Constant-time comparison, so response timing reveals nothing about the token.
        if not hmac.compare_digest(credentials.credentials.encode(), admin_token.encode()):
            raise HTTPException(403, "wrong admin token")

    @app.middleware("http")
    async def record_metrics(request: Request, call_next):
        started = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        service.metrics.observe_request(
            route.path if route is not None else "unmatched", request.method, response.status_code,
            time.perf_counter() - started,
        )
        return response

    @app.get("/v1/batches/{step}", responses={200: {"content": {MEDIA_TYPE: {}, "application/json": {}}}})
    def get_batch(
        request: Request,
        step: int = Path(ge=0, le=2**62),
        rank: int = Query(0, ge=0),
        world_size: int = Query(1, ge=1),
    ) -> Response:
        try:
            batch = service.batch(step, rank, world_size)
        except ValueError as e:  # a rank or world size that does not fit the global batch
            raise HTTPException(422, str(e)) from None
        if "application/json" in request.headers.get("accept", ""):
            return JSONResponse(batch_to_json(batch))
        return Response(encode_batch(batch, service.mixer.vocab_size), media_type=MEDIA_TYPE)

    @app.get("/v1/mix")
    def get_mix() -> dict:
        return {"schedule": service.mixer.schedule.to_json(), "served_frontier": service.frontier}

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
