"""Prometheus metrics of one service instance, in its own registry (no process-global collectors),
and the ASGI middleware that counts and times every HTTP request."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.routing import Match


class ServiceMetrics:
    def __init__(self, dataset_names: tuple[str, ...]):
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "replaymix_requests_total", "HTTP requests by route and status", ["route", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "replaymix_request_seconds", "HTTP request latency by route", ["route"], registry=self.registry,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
        )
        self.tokens = Counter(
            "replaymix_tokens_served_total", "Tokens served per dataset (each request counts)", ["dataset"],
            registry=self.registry,
        )
        self.weight = Gauge(
            "replaymix_mix_weight", "Weight of each dataset at the served frontier", ["dataset"], registry=self.registry
        )
        self.frontier = Gauge("replaymix_served_frontier", "One more than the largest step served", registry=self.registry)
        self.leases = Counter("replaymix_leases", "Leases granted to clients that compute batches themselves",
                              registry=self.registry)
        self.reserved = Gauge(
            "replaymix_reserved_frontier", "Durable bound: no step at or above it was served", registry=self.registry
        )
        self.control = Gauge(
            "replaymix_controller", "The controller's state: forgetting, target, error, enabled",
            ["quantity"], registry=self.registry,
        )
        for name in dataset_names:  # export zeros from the start so dashboards see every dataset
            self.tokens.labels(name)

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(route, method, str(status)).inc()
        self.latency.labels(route).observe(seconds)

    def set_mix(self, weights: dict[str, float], frontier: int) -> None:
        for name, weight in weights.items():
            self.weight.labels(name).set(weight)
        self.frontier.set(frontier)

    def set_control(self, state: dict, enabled: bool) -> None:
        for quantity, value in state.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.control.labels(quantity).set(value)
        self.control.labels("enabled").set(float(enabled))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestMetrics:
    """Plain ASGI middleware: one count and one latency sample per HTTP request, by route template.

    Plain ASGI rather than `@app.middleware("http")`: that one (Starlette's BaseHTTPMiddleware) runs
    the endpoint in a separate task and streams the response through a memory channel, which cost
    milliseconds per request; this only wraps `send` to see the status.
    """

    def __init__(self, app, metrics: ServiceMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, status = time.perf_counter(), 500  # 500 unless a response starts: the app raised
        request_scope = dict(scope)  # as it came in: mounts rewrite the shared scope's paths while routing

        async def send_and_note_status(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note_status)
        finally:
            route = scope.get("route")  # set on the shared scope by FastAPI's own routes once one matched
            self.metrics.observe_request(getattr(route, "path", None) or _plain_route_path(request_scope),
                                         scope["method"], status, time.perf_counter() - started)


def _plain_route_path(scope) -> str:
    """The path template of a Starlette route (the OpenAPI document, the docs' static files), which does
    not mark the scope as FastAPI's routes do; labels stay few either way."""
    app = scope.get("app")
    route = next((r for r in getattr(app, "routes", ()) if r.matches(scope)[0] == Match.FULL), None)
    return getattr(route, "path", "unmatched")
