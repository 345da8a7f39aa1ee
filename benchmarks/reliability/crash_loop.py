"""Crash loop: kill -9 the service at random moments while ranks consume and the mix changes.

    .venv/bin/python -m benchmarks.reliability.crash_loop [--kills 20] [--work /tmp/replaymix-crash] [--seed 0]

Two rank consumers (the real `StreamClient`, which retries through restarts) read steps in order while
an operator thread changes the ratio over HTTP (PUT /v1/mix without start_step: "from the next step").
The main thread kills the service with SIGKILL at random moments and restarts it on the same state dir.
After each restart every acknowledged change must still be in the schedule, as it was answered (the
log only appends; a change lands past everything served and scheduled). At the end a fresh
service, given the final schedule and never interrupted, serves the same steps; every batch a consumer
received must equal its reference bytes. Figures: crashes survived, batches compared, batches
different (0), acknowledged changes lost (0).
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
from tqdm import tqdm

from benchmarks.reliability.harness import (
    REPO,
    ServiceProcess,
    ServiceSettings,
    build_datasets,
    code_root,
    head_commit,
    percentiles,
    print_figures,
    put_mix,
    replay_schedule,
    write_admin_token,
)
from service.client import StreamClient
from service.wire import MEDIA_TYPE, decode_batch


@dataclass(frozen=True)
class CrashLoopConfig:
    work: Path
    kills: int = 20
    seed: int = 0
    world_size: int = 2
    gap: tuple[float, float] = (0.2, 1.5)  # seconds between a restart and the next kill
    step_seconds: float = 0.01  # a consumer's "training step" between batches
    change_every: float = 0.3  # seconds between acknowledged ratio changes
    steps_after: int = 30  # steps consumed after the last restart
    code: Path = REPO  # the service code to run (harness.code_root)


@dataclass
class CrashLoopResult:
    crashes: int = 0
    batches_compared: int = 0
    batches_different: int = 0
    changes_acknowledged: int = 0
    changes_lost: int = 0
    consumer_errors: list[str] = field(default_factory=list)
    service_tracebacks: int = 0
    steps: int = 0
    stages: int = 0
    restart_seconds: list[float] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return (self.batches_different == 0 and self.changes_lost == 0 and not self.consumer_errors
                and self.service_tracebacks == 0 and self.batches_compared > 0)

    def summary(self) -> str:
        p50, p99 = percentiles(self.restart_seconds)
        return (
            f"crash loop: {self.crashes} kill -9s survived, {self.batches_compared} batches compared, "
            f"{self.batches_different} different, {self.changes_acknowledged} changes acknowledged, "
            f"{self.changes_lost} lost, {len(self.consumer_errors)} consumer errors, {self.stages} stages over "
            f"{self.steps} steps, restart p50 {p50:.2f} s -> {'OK' if self.ok else 'FAILED'}"
        )


class Consumer(threading.Thread):
    """One rank reading steps 0, 1, 2, ... through StreamClient until told to stop."""

    def __init__(self, url: str, rank: int, world_size: int, step_seconds: float, stop: threading.Event):
        super().__init__(name=f"consumer-{rank}", daemon=True)
        self.url, self.rank, self.world_size, self.step_seconds, self.stop = url, rank, world_size, step_seconds, stop
        self.received: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self.last_step = -1
        self.error: str | None = None

    def run(self) -> None:
        try:
            with StreamClient(self.url, self.rank, self.world_size, prefetch=2, retry_for=120) as client:
                for batch in client:
                    if batch.step != self.last_step + 1:
                        raise RuntimeError(f"rank {self.rank}: step {batch.step} after {self.last_step}")
                    self.received[batch.step] = (batch.tokens, batch.sources)
                    self.last_step = batch.step
                    if self.stop.is_set():
                        return
                    time.sleep(self.step_seconds)
        except Exception as e:  # noqa: BLE001 - recorded as a figure; the loop must finish to report it
            self.error = f"{type(e).__name__}: {e}"


class Operator(threading.Thread):
    """Changes the ratio every `change_every` seconds; keeps each acknowledged stage.

    A change without start_step lands past everything served and scheduled, and the log only appends,
    so every acknowledged stage must be in the final schedule, at its start step, with its weights.
    """

    def __init__(self, url: str, token: str, change_every: float, seed: int, stop: threading.Event):
        super().__init__(name="operator", daemon=True)
        self.url, self.token, self.change_every, self.stop = url, token, change_every, stop
        self.rng = random.Random(seed)
        self.acknowledged: list[dict] = []  # each stage as answered
        self.refused: list[str] = []

    def run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=5) as http:
            while not self.stop.wait(self.change_every):
                old = round(self.rng.uniform(0.01, 0.99), 4)
                try:
                    response = put_mix(http, self.token, {"old": old, "new": 1 - old})
                except httpx.TransportError:
                    continue  # killed mid-request: not acknowledged, so nothing is promised
                if response.status_code == 200:
                    self.acknowledged.append(response.json()["stage"])
                else:
                    self.refused.append(f"HTTP {response.status_code}: {response.text[:200]}")


def lost_stages(acknowledged: list[dict], schedule: list[dict]) -> int:
    """Acknowledged stages that the schedule no longer holds as they were answered."""
    held = {stage["start_step"]: stage["weights"] for stage in schedule}
    return sum(held.get(stage["start_step"]) != stage["weights"] for stage in acknowledged)


def run_crash_loop(config: CrashLoopConfig) -> CrashLoopResult:
    work = Path(config.work)
    datasets = build_datasets(work / "datasets")
    for stale in ("state", "reference-state"):
        shutil.rmtree(work / stale, ignore_errors=True)
    token_file = work / "admin-token"
    token = write_admin_token(token_file)
    settings = ServiceSettings(datasets, work / "state", admin_token_file=token_file, code_root=config.code)
    service = ServiceProcess(settings, work / "service.log").start()
    rng = random.Random(config.seed)
    result = CrashLoopResult()
    stop = threading.Event()
    consumers = [Consumer(service.url, r, config.world_size, config.step_seconds, stop) for r in range(config.world_size)]
    operator = Operator(service.url, token, config.change_every, config.seed, stop)
    for thread in (*consumers, operator):
        thread.start()
    try:
        with httpx.Client(base_url=service.url, timeout=10) as http:
            for _ in tqdm(range(config.kills), desc="kill -9", unit="kill"):
                time.sleep(rng.uniform(*config.gap))
                service.kill9()
                acknowledged = list(operator.acknowledged)  # before the check: each must be durable
                started = time.perf_counter()
                service.start()
                result.restart_seconds.append(time.perf_counter() - started)
                result.crashes += 1
                result.changes_lost = max(result.changes_lost,
                                          lost_stages(acknowledged, http.get("/v1/mix").json()["schedule"]))
            target = min(c.last_step for c in consumers) + config.steps_after
            while min(c.last_step for c in consumers) < target and all(c.is_alive() for c in consumers):
                time.sleep(0.05)
            stop.set()
            for thread in (*consumers, operator):
                thread.join(timeout=60)
            schedule = http.get("/v1/mix").json()["schedule"]
    finally:
        stop.set()
        service.stop()
    result.changes_acknowledged = len(operator.acknowledged)
    result.changes_lost = max(result.changes_lost, lost_stages(operator.acknowledged, schedule))
    result.consumer_errors = [c.error for c in consumers if c.error] + operator.refused
    result.service_tracebacks = service.tracebacks()
    result.stages = len(schedule)
    result.steps = min(len(c.received) for c in consumers)
    compare_with_reference(settings, token, schedule, consumers, work, result)
    return result


def compare_with_reference(settings: ServiceSettings, token: str, schedule: list[dict], consumers: list[Consumer],
                           work: Path, result: CrashLoopResult) -> None:
    """An uninterrupted service given the same schedule must serve every received batch byte for byte."""
    reference_settings = dataclasses.replace(settings, state_dir=work / "reference-state")
    with ServiceProcess(reference_settings, work / "reference.log") as reference, \
            httpx.Client(base_url=reference.url, timeout=30, headers={"Accept": MEDIA_TYPE}) as http:
        replay_schedule(http, token, schedule)
        total = sum(len(c.received) for c in consumers)
        with tqdm(total=total, desc="compare", unit="batch") as bar:
            for consumer in consumers:
                for step, (tokens, sources) in sorted(consumer.received.items()):
                    response = http.get(f"/v1/batches/{step}",
                                        params={"rank": consumer.rank, "world_size": consumer.world_size})
                    expected = decode_batch(response.content)
                    result.batches_compared += 1
                    same = np.array_equal(expected.tokens, tokens) and np.array_equal(expected.sources, sources)
                    result.batches_different += not same
                    bar.update()
        result.service_tracebacks += reference.tracebacks()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=CrashLoopConfig.kills)
    parser.add_argument("--work", type=Path, default=Path("/tmp/replaymix-crash"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--from-head", action="store_true", help="run the service as committed at HEAD")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    code = code_root(args.work, args.from_head)
    result = run_crash_loop(CrashLoopConfig(work=args.work, kills=args.kills, seed=args.seed, code=code))
    p50, p99 = percentiles(result.restart_seconds)
    print_figures(f"crash loop (service at {head_commit() if args.from_head else 'the working tree'})", {
        "kill -9s survived": result.crashes,
        "batches compared": result.batches_compared,
        "batches different": result.batches_different,
        "changes acknowledged": result.changes_acknowledged,
        "acknowledged changes lost": result.changes_lost,
        "consumer errors": result.consumer_errors or 0,
        "service tracebacks": result.service_tracebacks,
        "schedule stages / steps": f"{result.stages} / {result.steps}",
        "restart p50 / p99 (s)": f"{p50:.2f} / {p99:.2f}",
    })
    print(result.summary())
    return 0 if result.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
