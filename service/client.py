"""Trainer-side client: `StreamClient` iterates a rank's batches from the mixer service over HTTP.

It reads the service's status once when made (`info`), and starts fetching at the first batch taken,
from `start_step` (or where `seek` moved it). A background thread fetches `range_steps` steps per request (`GET /v1/batches?start=...&count=...`,
one body, see wire.py), with IN_FLIGHT requests under way on keep-alive connections (transport.py)
so that the service computes the next range while this process decodes the last, and keeps up to
`prefetch` batches ready. A failed request is retried with exponential backoff, which is safe
because a step is idempotent: the server returns the same bytes for a step every time, also after a
restart. Batches arrive in step order, checked here (step, rank and world size of every body).
Batches are `wire.Batch` (numpy); the trainer makes tensors of them where they go to its device.
With `compute="local"` the client computes its rows itself from the datasets and asks the service only
for leases on steps and the schedule (`local_compute.py`): the same bytes, no tokens over HTTP.
`StreamDataset` wraps the client as a `torch.utils.data.IterableDataset` for DataLoader users.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from collections import deque
from concurrent.futures import Future
from typing import Iterator, Optional, Sequence

import torch

from pipeline.dataset import token_dtype
from service.errors import ServiceError
from service.local_compute import DEFAULT_LEASE_STEPS, LocalCompute
from service.transport import KeepAliveConnections, TransportError
from service.wire import MAX_RANGE_STEPS, MEDIA_TYPE, Batch, WireError, decode_batch, decode_batches

IN_FLIGHT = 2  # requests under way at once: one being computed by the service, one being decoded here
RANGE_BYTES = 4 << 20  # default range size: as many steps as fit in this many body bytes ...
DEFAULT_RANGE_STEPS = min(64, MAX_RANGE_STEPS)  # ... but at most this many (the service allows more)
COMPUTE_MODES = ("service", "local")
EARLY_RENEWAL_PATIENCE_S = 2.0  # how long a lease renewal ahead of the bound may try (see LocalCompute)


class StreamError(ServiceError, RuntimeError):
    """The service refused a request (4xx) or stayed unreachable past the retry budget."""


class StreamClient:
    def __init__(
        self,
        url: str | Sequence[str],
        rank: int = 0,
        world_size: int = 1,
        start_step: int = 0,
        prefetch: int = 16,
        stop_step: Optional[int] = None,
        step_stride: int = 1,
        timeout: float = 30.0,
        retry_for: float = 120.0,
        backoff: float = 0.05,
        range_steps: Optional[int] = None,
        token: Optional[str] = None,
        compute: str = "service",
        lease_steps: int = DEFAULT_LEASE_STEPS,
    ):
        """Batches for steps start_step, start_step + step_stride, ... (until stop_step, exclusive).

        `url`: the service, or several replicas of it (a list, or comma-separated): every replica serves the
        same bytes for a step, so when one stops answering the client goes on at the next, at the same step.

        Steps are requested `range_steps` at a time (default: what fits in RANGE_BYTES, at most
        DEFAULT_RANGE_STEPS) and up to `prefetch` of them wait decoded, so the service counts up to about
        prefetch + IN_FLIGHT * range_steps steps beyond the consumer as served.
        `retry_for` is how long (seconds) one request may keep failing on connection errors or 5xx
        before the iterator raises StreamError. `token` is the service's read token (sent as a bearer
        token), None where it allows anonymous reads. `compute`: "service" (the service sends the rows) or
        "local" (this process computes them under leases of `lease_steps` steps; needs a token and the
        datasets on storage this process reads).
        """
        worker = torch.utils.data.get_worker_info()
        if worker is not None and worker.num_workers > 1 and step_stride % worker.num_workers:
            # Each DataLoader worker runs its own copy of the dataset: all would yield every step.
            raise StreamError(
                f"StreamClient in DataLoader worker {worker.id} of {worker.num_workers} with step_stride "
                f"{step_stride}: every worker would yield the same steps. Use service.client.StreamDataset, "
                "which gives worker w the steps start + w, start + w + n, ..."
            )
        if compute not in COMPUTE_MODES:
            raise ValueError(f"compute {compute!r}: choose one of {COMPUTE_MODES}")
        if prefetch < 1 or step_stride < 1 or (range_steps is not None and not 1 <= range_steps <= MAX_RANGE_STEPS):
            raise ValueError(f"prefetch {prefetch} and step_stride {step_stride} must be >= 1, range_steps "
                             f"{range_steps} in [1, {MAX_RANGE_STEPS}]")
        self._http = KeepAliveConnections(url, timeout, token)
        self.rank, self.world_size = rank, world_size
        self.next_step, self.stop_step, self.step_stride = start_step, stop_step, step_stride
        self.retry_for, self.backoff = retry_for, backoff
        self._closed = threading.Event()
        self.info: dict = json.loads(self._request("/v1/status"))
        self._local = (
            LocalCompute(self.info, lambda path, body, must: self._request(
                path, json_body=body, retry_for=None if must else EARLY_RENEWAL_PATIENCE_S), rank, world_size, lease_steps)
            if compute == "local" else None
        )
        if range_steps is None:
            rows = max(1, self.info["global_batch"] // world_size)
            row_bytes = (self.info["seq_len"] + 1) * token_dtype(self.info["vocab_size"]).itemsize
            range_steps = max(1, min(DEFAULT_RANGE_STEPS, RANGE_BYTES // (rows * row_bytes)))
        self.range_steps = range_steps
        self._queue: queue.Queue = queue.Queue(maxsize=prefetch)
        self._jobs: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """The service URL requests go to now (of several: the one that answered last)."""
        return self._http.url

    def seek(self, step: int) -> None:
        """Start at `step` instead of start_step; only before the first batch is taken."""
        if self._thread is not None:
            raise RuntimeError("seek: the client is already fetching; make a new StreamClient to start elsewhere")
        self.next_step = step

    def _start(self) -> None:
        # Daemon threads (a ThreadPoolExecutor's are joined at exit, which a retrying request delays).
        for i in range(IN_FLIGHT):
            threading.Thread(target=self._fetch_worker, name=f"stream-fetch-{i}", daemon=True).start()
        self._thread = threading.Thread(target=self._fetch_loop, name="stream-prefetch", daemon=True)
        self._thread.start()

    def _request(self, path: str, params: dict | None = None, accept: str = "application/json",
             json_body: bytes | None = None, retry_for: float | None = None) -> bytes | bytearray:
        """The body of GET path (POST of json_body when given), retried on connection errors and 5xx for
        `retry_for` seconds (default: the client's); StreamError on 4xx or timeout. Safe to retry: reads and
        leases are idempotent."""
        retry_for = self.retry_for if retry_for is None else retry_for
        deadline, delay = time.monotonic() + retry_for, self.backoff
        while True:
            try:
                status, body = self._http.request(path, params, accept, json_body)
                if status < 500:
                    break
                problem = f"HTTP {status}: {bytes(body[:200]).decode(errors='replace')}"
            except TransportError as e:
                problem = str(e)
            if self._closed.is_set() or time.monotonic() + delay > deadline:
                raise StreamError(f"GET {self.url}{path} failed for {retry_for:.0f} s; last error: {problem}")
            time.sleep(delay)
            delay = min(delay * 2, 2.0)
        if status >= 400:
            raise StreamError(f"GET {self.url}{path} {params or ''}: HTTP {status}: {bytes(body[:500]).decode(errors='replace')}")
        return body

    def mix(self) -> dict:
        """GET /v1/mix: the schedule, the log of every change (who, when, why) and the frontiers."""
        return json.loads(self._request("/v1/mix"))

    def send_feedback(self, step: int, losses: dict[str, float]) -> dict | None:
        """POST /v1/feedback: the validation losses of the model after `step` updates, for the controller.
        Returns its answer, or None when the service already had feedback for this step (a retried POST
        whose first answer was lost) or runs no controller."""
        body = json.dumps({"step": step, "losses": losses}).encode()
        try:
            return json.loads(self._request("/v1/feedback", accept="application/json", json_body=body))
        except StreamError as e:
            if "HTTP 409" in str(e):
                return None
            raise

    def fetch(self, step: int) -> Batch:
        """One step's batch for this rank, synchronously (with retries)."""
        if self._local is not None:
            return self._local.batches([step])[0]
        body = self._request(f"/v1/batches/{step}", {"rank": self.rank, "world_size": self.world_size}, MEDIA_TYPE)
        try:
            return self._checked(decode_batch(body), step)
        except WireError as e:
            raise StreamError(f"GET {self.url}/v1/batches/{step}: {e}") from e

    def fetch_range(self, start: int, count: int) -> list[Batch]:
        """Steps start, start + step_stride, ... (count of them) in one request (with retries)."""
        if self._local is not None:
            return self._local.batches([start + i * self.step_stride for i in range(count)])
        params = {"start": start, "count": count, "stride": self.step_stride, "rank": self.rank, "world_size": self.world_size}
        body = self._request("/v1/batches", params, MEDIA_TYPE)
        try:
            batches = decode_batches(body)
        except WireError as e:
            raise StreamError(f"GET {self.url}/v1/batches {params}: {e}") from e
        if len(batches) != count:
            raise StreamError(f"GET {self.url}/v1/batches {params}: {len(batches)} steps in the body, expected {count}")
        return [self._checked(batch, start + i * self.step_stride) for i, batch in enumerate(batches)]

    def _checked(self, batch: Batch, step: int) -> Batch:
        if (batch.step, batch.rank, batch.world_size) != (step, self.rank, self.world_size):
            raise StreamError(
                f"{self.url}: asked for step {step} of rank {self.rank}/{self.world_size}, got step {batch.step} "
                f"of rank {batch.rank}/{batch.world_size}"
            )
        return batch

    def _ranges(self) -> Iterator[tuple[int, int]]:
        """(start, count) of each request, in order, up to stop_step."""
        step = self.next_step
        while self.stop_step is None or step < self.stop_step:
            count = self.range_steps
            if self.stop_step is not None:
                count = min(count, -(-(self.stop_step - step) // self.step_stride))
            yield step, count
            step += count * self.step_stride

    def _fetch_worker(self) -> None:
        """Runs queued fetch_range calls, each on this thread's own keep-alive connection."""
        while (job := self._jobs.get()) is not None:
            future, start, count = job
            try:
                future.set_result(self.fetch_range(start, count))
            except Exception as e:  # the fetch loop hands it to the consumer
                future.set_exception(e)

    def _submit(self, start: int, count: int) -> Future:
        future: Future = Future()
        self._jobs.put((future, start, count))
        return future

    def _fetch_loop(self) -> None:
        ranges, pending = self._ranges(), deque()
        while not self._closed.is_set():
            for start, count in ranges:  # top up to IN_FLIGHT requests; results come back in order
                pending.append(self._submit(start, count))
                if len(pending) == IN_FLIGHT:
                    break
            if not pending:
                self._offer(None)
                return
            try:
                items: list = pending.popleft().result()
            except Exception as e:  # handed to the consumer, which raises it in its own thread
                items = [e]
            for item in items:
                if not self._offer(item) or isinstance(item, Exception):
                    return

    def _offer(self, item: object) -> bool:
        """Queue an item, waiting for room; False once the client is closed."""
        while not self._closed.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        if self._closed.is_set():
            raise StopIteration
        if self._thread is None:
            self._start()
        while True:  # woken by close() too, so that no thread stays blocked here on a closed client
            try:
                item = self._queue.get(timeout=0.1)
                break
            except queue.Empty:
                if self._closed.is_set():
                    raise StopIteration from None
        if item is None:
            raise StopIteration
        if isinstance(item, Exception):
            raise item
        self.next_step = item.step + self.step_stride
        return item

    def close(self) -> None:
        self._closed.set()  # a request still retrying gives up at its next attempt
        if self._thread is not None:
            for _ in range(IN_FLIGHT):
                self._jobs.put(None)
            self._thread.join(timeout=5)
        self._http.close()

    def __enter__(self) -> "StreamClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class StreamDataset(torch.utils.data.IterableDataset):
    """The one right way to feed a DataLoader: `DataLoader(StreamDataset(url, ...), batch_size=None,
    num_workers=n)` yields `{"step": int, "tokens": tensor, "sources": tensor}` per step, in step order.

    With DataLoader workers, worker w of n takes steps start_step + w, start_step + w + n, ...; the
    DataLoader's in-order collection then yields steps in order. (A StreamClient wrapped in a dataset of
    one's own would give every worker every step; the client refuses to run that way.)
    """

    def __init__(self, url: str, rank: int = 0, world_size: int = 1, start_step: int = 0,
                 stop_step: Optional[int] = None, prefetch: int = 16, token: Optional[str] = None):
        self.url, self.rank, self.world_size = url, rank, world_size
        self.start_step, self.stop_step, self.prefetch, self.token = start_step, stop_step, prefetch, token

    def __iter__(self) -> Iterator[dict]:
        worker = torch.utils.data.get_worker_info()
        offset, stride = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        client = StreamClient(self.url, self.rank, self.world_size, self.start_step + offset, self.prefetch,
                              stop_step=self.stop_step, step_stride=stride, token=self.token)
        try:
            for batch in client:
                yield {"step": batch.step, "tokens": batch.tokens, "sources": batch.sources}
        finally:
            client.close()
