"""Failover: kill -9 the schedule's owner again and again while ranks read through replicas.

    .venv/bin/python -m benchmarks.reliability.failover [--kills 10] [--store local|s3] [--lease-seconds 2]
                                                         [--work /tmp/replaymix-failover] [--seed 0]

An owner and a standby on one state (a folder, or `--store s3`: moto's S3 server on 127.0.0.1 in its own
process), two read replicas of them (`--replica-of OWNER,STANDBY`), two ranks reading through both
replicas (`StreamClient([A, B])`), one rank computing its own rows under leases straight from the owners
(`compute="local"`), and operators changing the ratio through the replicas. The main thread kills the
current owner with SIGKILL at random moments; the standby takes over, and the killed one comes back as the
next standby. Once (with `--store s3`) the killed owner's local disk (its shard cache, its log) is deleted
before it comes back: the state lives in the store. Each kill waits until the standby is up and watching,
as a deployment keeps one ready. At the end an uninterrupted single service given the
final schedule serves every step again, and every batch a rank received must equal it.

Figures: kills survived, batches compared and different (0), changes acknowledged and lost (0), the
longest any rank waited for a batch, and the steps ranks received while no owner served (leases at work).
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
from tqdm import tqdm

from benchmarks.reliability.crash_loop import Operator, compare_with_reference, lost_stages
from benchmarks.reliability.harness import (
    ServiceProcess,
    ServiceSettings,
    build_datasets,
    print_figures,
    write_admin_token,
)
from service.client import StreamClient
from service import launcher
from service.launcher import LOOPBACK, free_port

BUCKET = "replaymix-failover"
WAITING = "waiting to take it over"  # what a standby says once it watches the owner


@dataclass(eq=False)  # threads are hashed (threading keeps them in weak sets)
class Rank(threading.Thread):
    """One rank reading steps in order through `urls`, recording when each batch arrived."""

    urls: list[str]
    rank: int
    world_size: int
    token: str
    stop: threading.Event
    compute: str = "service"
    received: dict = field(default_factory=dict)
    arrivals: list = field(default_factory=list)
    error: str | None = None

    def __post_init__(self) -> None:
        super().__init__(name=f"rank-{self.rank}-{self.compute}", daemon=True)

    @property
    def last_step(self) -> int:
        return len(self.received) - 1

    def run(self) -> None:
        try:
            with StreamClient(self.urls, self.rank, self.world_size, prefetch=2, retry_for=120, token=self.token,
                              compute=self.compute, range_steps=4, lease_steps=64) as client:
                for batch in client:
                    self.received[batch.step] = (batch.tokens, batch.sources)
                    self.arrivals.append(time.monotonic())
                    if self.stop.is_set():
                        return
                    time.sleep(0.02)  # a training step
        except Exception as e:  # noqa: BLE001 - a figure, reported at the end
            self.error = f"{type(e).__name__}: {e}"


class S3Emulator:
    """moto's S3 server in its own process on a loopback port: the state's store."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://{LOOPBACK}:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", LOOPBACK, "-p", str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
               "AWS_ENDPOINT_URL": self.url, "AWS_EC2_METADATA_DISABLED": "true"}
        os.environ.update(env)  # every service started from here inherits them
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.put(f"{self.url}/{BUCKET}", timeout=2)
                break
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


@dataclass
class FailoverResult:
    kills: int = 0
    disks_lost: int = 0
    batches_compared: int = 0
    batches_different: int = 0
    changes_acknowledged: int = 0
    changes_lost: int = 0
    longest_wait_s: float = 0.0
    outage_s: list = field(default_factory=list)
    steps_in_outages: dict = field(default_factory=dict)
    errors: list = field(default_factory=list)
    service_tracebacks: int = 0

    @property
    def ok(self) -> bool:
        return (self.batches_different == 0 and self.changes_lost == 0 and not self.errors and self.batches_compared > 0
                and self.service_tracebacks == 0)


def run_failover(work: Path, kills: int, store: str, lease_seconds: float, seed: int) -> FailoverResult:
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    datasets = build_datasets(work / "datasets")
    token = write_admin_token(work / "admin-token")
    (work / "read-token").write_text(token + "\n")
    emulator = S3Emulator() if store == "s3" else None
    state = f"s3://{BUCKET}/failover" if emulator else str(work / "state")
    settings = ServiceSettings(datasets, state, admin_token_file=work / "admin-token",
                               read_token_file=work / "read-token")
    ports = [free_port(), free_port()]

    def owner_process(i: int, standby: bool) -> ServiceProcess:
        disk = work / f"disk-{i}"  # this machine's local disk: its shard cache and its log
        disk.mkdir(exist_ok=True)
        process = ServiceProcess(settings, disk / "service.log", port=ports[i])
        process.args += [f"--lease-seconds={lease_seconds}", f"--cache-dir={disk / 'cache'}", "--reserve-steps=16"]
        if standby:
            process.args.append("--standby")
        return process

    def start_standby(i: int) -> ServiceProcess:
        """A standby, returned once it watches the owner (a deployment keeps one ready: the next kill waits)."""
        log = work / f"disk-{i}" / "service.log"
        before = log.read_text().count(WAITING) if log.exists() else 0
        process = owner_process(i, True).start(wait=False)
        deadline = time.monotonic() + 120
        while log.read_text().count(WAITING) == before and time.monotonic() < deadline:
            time.sleep(0.1)
        return process

    rng, result, stop = random.Random(seed), FailoverResult(), threading.Event()
    owners = [owner_process(0, False).start(), start_standby(1)]
    owner_urls = ",".join(f"http://{LOOPBACK}:{port}" for port in ports)
    replicas = [launcher.ServiceProcess([f"--replica-of={owner_urls}", f"--read-token-file={work / 'read-token'}",
                                f"--admin-token-file={work / 'admin-token'}", "--lease-steps=64"],
                               log=work / f"replica-{i}.log").start() for i in range(2)]
    replica_urls = [replica.url for replica in replicas]
    ranks = [Rank(replica_urls[::1 if r == 0 else -1], r, 2, token, stop) for r in range(2)]
    ranks.append(Rank(owner_urls.split(","), 0, 2, token, stop, compute="local"))
    operators = [Operator(url, token, 0.5, seed + i, stop) for i, url in enumerate(replica_urls)]
    for thread in (*ranks, *operators):
        thread.start()
    outages: list[tuple[float, float]] = []
    current = 0
    try:
        for kill in tqdm(range(kills), desc="kill -9 the owner", unit="kill"):
            time.sleep(rng.uniform(1.0, 3.0))
            killed_at = time.monotonic()
            owners[current].kill9()
            successor = 1 - current
            owners[successor].wait_ready(120)
            outages.append((killed_at, time.monotonic()))
            result.kills += 1
            if emulator is not None and kill == kills // 2:
                shutil.rmtree(work / f"disk-{current}")  # the dead owner's machine comes back with a blank disk
                result.disks_lost += 1
            owners[current] = start_standby(current)
            current = successor
        target = min(r.last_step for r in ranks) + 20
        while min(r.last_step for r in ranks) < target and all(r.is_alive() for r in ranks):
            time.sleep(0.05)
        stop.set()
        for thread in (*ranks, *operators):
            thread.join(timeout=60)
        with httpx.Client(timeout=10, headers={"Authorization": f"Bearer {token}"}) as http:
            schedule = http.get(f"{replica_urls[0]}/v1/mix").json()["schedule"]
    finally:
        stop.set()
        for process in (*replicas, *owners):
            process.stop()
    acknowledged = [stage for operator in operators for stage in operator.acknowledged]
    result.changes_acknowledged = len(acknowledged)
    result.changes_lost = lost_stages(acknowledged, schedule)
    result.errors = [r.error for r in ranks if r.error] + [e for o in operators for e in o.refused]
    result.outage_s = [end - start for start, end in outages]
    result.longest_wait_s = max(float(np.max(np.diff(r.arrivals))) for r in ranks if len(r.arrivals) > 1)
    for r in ranks:
        name = f"rank {r.rank} ({'own rows, leases' if r.compute == 'local' else 'through the replicas'})"
        result.steps_in_outages[name] = sum(any(a <= t <= b for a, b in outages) for t in r.arrivals)
    result.service_tracebacks = sum(p.output().count("Traceback") for p in (*replicas, *owners))
    # Every batch against one uninterrupted service given the final schedule (the local rank's rows are the
    # rows of rank 0: compare them as rank 0's).
    reference = ServiceSettings(datasets, work / "state-unused", admin_token_file=work / "admin-token")
    compare_with_reference(reference, token, schedule, ranks, work, result)
    if emulator is not None:
        emulator.stop()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--store", choices=("local", "s3"), default="local")
    parser.add_argument("--lease-seconds", type=float, default=2.0)
    parser.add_argument("--work", type=Path, default=Path("/tmp/replaymix-failover"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    result = run_failover(args.work, args.kills, args.store, args.lease_seconds, args.seed)
    outage = np.asarray(result.outage_s)
    print_figures(f"failover ({args.store} state, lease {args.lease_seconds:g} s)", {
        "owner kill -9s survived": result.kills,
        "owner disks deleted": result.disks_lost,
        "batches compared / different": f"{result.batches_compared} / {result.batches_different}",
        "changes acknowledged / lost": f"{result.changes_acknowledged} / {result.changes_lost}",
        "no owner serving, median / longest (s)": f"{np.median(outage):.2f} / {outage.max():.2f}",
        "longest any rank waited for a batch (s)": f"{result.longest_wait_s:.2f}",
        **{f"steps received with no owner: {name}": steps for name, steps in result.steps_in_outages.items()},
        "errors": result.errors or 0,
        "service tracebacks": result.service_tracebacks,
    })
    print(f"failover: {result.kills} owner kills, {result.batches_compared} batches compared, "
          f"{result.batches_different} different, {result.changes_lost} of {result.changes_acknowledged} changes lost, "
          f"longest wait {result.longest_wait_s:.2f} s -> {'OK' if result.ok else 'FAILED'}")
    return 0 if result.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
