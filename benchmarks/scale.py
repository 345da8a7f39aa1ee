"""How many trainer ranks one schedule service steers: simulated ranks in compute="local" mode renewing
leases against one real service, with ratio changes under way.

    python -m benchmarks.scale [--ranks 4096] [--seconds 120] [--changes 20] [--lease-steps 64] [--step-ms 20]

Every rank holds a lease (`POST /v1/leases`) and "computes" one step per simulated training step, in
lockstep as data-parallel ranks run; it renews as `StreamClient(compute="local")` does, when half to three
quarters of its lease is used, staggered by rank (so a rank renews about every lease_steps / 2 steps, and the
ranks' renewals spread over lease_steps / 4 steps), and never computes a step at or past its lease (a rank whose renewal is late waits, and the wait is counted). Ranks come up as workers
do, over `--start-seconds` (each takes its first lease when it is up; training starts when all are, as at the
first collective). An operator's PUT /v1/mix lands `--changes` times, evenly spread. Everything runs on loopback: one service process and one
load-generating process (asyncio, `--connections` keep-alive connections).

Printed: leases/s sustained; lease latency at the service (p50/p99 of its own request histogram,
from /metrics, over the whole run and over the steady state after start-up) and as the ranks saw it; the service's CPU per lease (from /proc), hence leases/s per
core; checks that must be 0 (steps computed past a lease, rows of one step given to two ranks, changes
that land before a leased step or later than the first step past every lease). From the per-core rate,
the steerable ranks at a given step time: ranks = leases/s per core x (lease_steps / 2) x step seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np

from service.launcher import ServiceProcess, free_port

READ_TOKEN, ADMIN_TOKEN = "scale-read-token", "scale-admin-token"


@dataclass
class Run:
    ranks: int
    lease_steps: int
    step_seconds: float
    granted: list[tuple[float, float, int]] = field(default_factory=list)  # (sent, answered, until)
    latencies: list[float] = field(default_factory=list)
    computed_past_lease: int = 0
    waits: int = 0  # rank-ticks spent waiting for a late renewal
    step: int = 0  # the global training step all ranks are on
    start_seconds: float = 0.0  # ranks come up evenly over this long; training starts when all are up
    metrics_at_start: str = ""  # the service's /metrics when training started: the steady state is after it


def service_cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def latency_buckets(metrics: str, route: str) -> dict[float, float]:
    """The service's cumulative latency histogram for `route`: upper bound -> count."""
    buckets = {}
    for line in metrics.splitlines():
        match = re.match(r'replaymix_request_seconds_bucket\{le="([^"]+)",route="([^"]+)"\} (\S+)', line)
        if match and match.group(2) == route:
            buckets[float(match.group(1))] = float(match.group(3))
    return buckets


def histogram_quantiles(metrics: str, route: str, quantiles: tuple[float, ...], since: str = "") -> list[float]:
    """Upper bucket bounds at the given quantiles of the service's latency histogram for `route`, counting
    only requests after the scrape `since` when one is given."""
    before = latency_buckets(since, route)
    buckets = [(bound, count - before.get(bound, 0)) for bound, count in sorted(latency_buckets(metrics, route).items())]
    total = buckets[-1][1] if buckets else 0
    return [next((bound for bound, count in buckets if count >= q * total), float("inf")) for q in quantiles]


async def drive(run: Run, url: str, seconds: float, changes: int, connections: int) -> list[tuple[float, float, int]]:
    """Run the ranks for `seconds`; return each change as (sent, answered, start_step).

    One scheduler for all ranks (a task per rank waking every few milliseconds would cost the load
    generator more CPU than the service): every simulated step, each rank whose lease is half used asks
    for the next one, and each rank computes the step only if its lease covers it; a rank whose lease
    ends before the step waits (counted) until its renewal comes back.
    """
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    headers = {"Authorization": f"Bearer {READ_TOKEN}"}
    until = np.zeros(run.ranks, np.int64)  # each rank's lease: it may compute steps below it
    computed = np.zeros(run.ranks, np.int64)  # each rank's next step to compute
    pending = np.zeros(run.ranks, bool)
    # As service.local_compute renews: between half and three quarters of the lease, staggered by rank.
    renew_margin = run.lease_steps // 2 - np.arange(run.ranks) % max(1, run.lease_steps // 4)
    up_at = np.arange(run.ranks) * run.start_seconds / run.ranks  # when each rank's worker is up
    landed = []

    # At most `connections` requests in the client at once: httpx's pool slows down quadratically with
    # thousands of requests queued in it, which would measure the load generator, not the service.
    in_flight = asyncio.Semaphore(connections)

    async def renew(client: httpx.AsyncClient, rank: int, target: int) -> None:
        async with in_flight:
            sent = time.perf_counter()
            response = await client.post(f"{url}/v1/leases",
                                         json={"until": target, "rank": rank, "world_size": run.ranks})
            answered = time.perf_counter()
        response.raise_for_status()
        granted = response.json()["until"]
        run.granted.append((sent, answered, granted))
        run.latencies.append(answered - sent)
        until[rank], pending[rank] = max(until[rank], granted), False

    async with httpx.AsyncClient(limits=limits, headers=headers, timeout=120) as client:
        requests: set[asyncio.Task] = set()
        began = time.perf_counter()
        while (elapsed := time.perf_counter() - began) < run.start_seconds:  # workers coming up: first leases
            for rank in np.flatnonzero(~pending & (until == 0) & (up_at <= elapsed)).tolist():
                pending[rank] = True
                task = asyncio.ensure_future(renew(client, rank, run.lease_steps))
                requests.add(task)
                task.add_done_callback(requests.discard)
            await asyncio.sleep(0.01)
        run.metrics_at_start = (await client.get(f"{url}/metrics")).text
        started = time.perf_counter()
        next_change = 1
        while (elapsed := time.perf_counter() - started) < seconds:
            run.step = int(elapsed / run.step_seconds)
            due = np.flatnonzero(~pending & (computed >= until - renew_margin))
            for rank in due.tolist():
                pending[rank] = True
                task = asyncio.ensure_future(renew(client, rank, int(computed[rank]) + run.lease_steps))
                requests.add(task)
                task.add_done_callback(requests.discard)
            # Each rank computes the steps up to the global one that its lease covers, and no further.
            reachable = np.minimum(run.step + 1, until)
            run.waits += int(np.count_nonzero(reachable < run.step + 1))
            run.computed_past_lease += int(np.count_nonzero(reachable > until))
            computed = np.maximum(computed, reachable)
            if next_change <= changes and elapsed >= next_change * seconds / (changes + 1):
                share = 0.01 * next_change
                sent = time.perf_counter()
                response = await client.put(f"{url}/v1/mix", json={"weights": {"old": share, "new": 1 - share}},
                                            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
                response.raise_for_status()
                landed.append((sent, time.perf_counter(), response.json()["stage"]["start_step"]))
                next_change += 1
            await asyncio.sleep(run.step_seconds)
        for task in list(requests):
            task.cancel()
        await asyncio.gather(*requests, return_exceptions=True)
    return landed


def check_changes(run: Run, landed: list[tuple[float, float, int]]) -> int:
    """Changes that land before a step leased before they were asked, or later than the first step past
    every lease granted by the time they were answered (or, the log being append-only, than the step after
    the previous change): must be 0."""
    bad, previous = 0, 0
    for sent, answered, start in landed:
        before = max((u for _, a, u in run.granted if a <= sent), default=0)
        by_then = max((u for s, _, u in run.granted if s <= answered), default=0)
        if not before <= start <= max(by_then, before, previous + 1):
            bad += 1
            print(f"change at step {start}: leases answered before it was asked reach {before}, leases asked "
                  f"before it was answered reach {by_then}, the previous change is at {previous}")
        previous = start
    return bad


def check_rows(ranks: int, datasets: dict[str, Path]) -> int:
    """Rows of one step given to two ranks (or to none): the mixer's partition, checked for every rank."""
    from pipeline.dataset import TokenDataset
    from service.mix_schedule import MixSchedule
    from service.mixer import Mixer, MixerConfig

    mixer = Mixer({n: TokenDataset(p) for n, p in datasets.items()}, MixerConfig(seq_len=16, global_batch=ranks, seed=0),
                  MixSchedule.constant({"old": 0.05, "new": 0.95}))
    owner = [0] * ranks
    for rank in range(ranks):
        for row in mixer.rows_of(rank, ranks):
            owner[row] += 1
    return sum(count != 1 for count in owner)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, default=4096)
    parser.add_argument("--seconds", type=float, default=120.0)
    parser.add_argument("--changes", type=int, default=20)
    parser.add_argument("--lease-steps", type=int, default=64)
    parser.add_argument("--step-ms", type=float, default=20.0, help="simulated training step time")
    parser.add_argument("--connections", type=int, default=256)
    parser.add_argument("--start-seconds", type=float, default=10.0,
                        help="ranks come up evenly over this long (0: all at once); training starts when all are")
    args = parser.parse_args()
    from benchmarks.train_throughput import make_dataset

    with tempfile.TemporaryDirectory(prefix="replaymix-scale-") as scratch:
        work = Path(scratch)
        datasets = {}
        for name, seed in (("old", 0), ("new", 0)):  # one tokenizer for both (make_dataset trains it from the seed)
            (work / name).mkdir()
            datasets[name] = make_dataset(work / name, vocab_size=300, tokens=200_000, seed=seed)
        (work / "read-token").write_text(READ_TOKEN)
        (work / "admin-token").write_text(ADMIN_TOKEN)
        service = ServiceProcess([*(f"--dataset={n}={p}" for n, p in datasets.items()), "--seq-len=16",
                                  f"--global-batch={args.ranks}", "--seed=0", f"--state-dir={work / 'state'}",
                                  "--weights=old=0.05,new=0.95", f"--read-token-file={work / 'read-token'}",
                                  f"--admin-token-file={work / 'admin-token'}", "--reserve-steps=4096",
                                  f"--max-lookahead={1 << 20}"], free_port()).start()
        try:
            run = Run(args.ranks, args.lease_steps, args.step_ms / 1000, start_seconds=args.start_seconds)
            cpu_before, wall_before = service_cpu_seconds(service.proc.pid), time.perf_counter()
            landed = asyncio.run(drive(run, service.url, args.seconds, args.changes, args.connections))
            wall = time.perf_counter() - wall_before
            cpu = service_cpu_seconds(service.proc.pid) - cpu_before
            metrics = httpx.get(f"{service.url}/metrics").text
        finally:
            service.stop()
        p50, p99 = histogram_quantiles(metrics, "/v1/leases", (0.5, 0.99))
        steady_p50, steady_p99 = histogram_quantiles(metrics, "/v1/leases", (0.5, 0.99), since=run.metrics_at_start)
        leases = len(run.granted)
        rate = leases / wall
        per_core = leases / cpu if cpu else float("inf")
        seen = sorted(run.latencies)
        print(f"{args.ranks} ranks up over {args.start_seconds:g} s, {wall:.0f} s in all, lease {args.lease_steps} steps, simulated step {args.step_ms:g} ms "
              f"(demand {2 * args.ranks / (args.lease_steps * run.step_seconds):.0f} leases/s), {len(landed)} changes")
        print(f"leases: {leases} ({rate:.0f}/s sustained); at the service p50 <= {p50 * 1e3:g} ms, p99 <= {p99 * 1e3:g} ms "
              f"(histogram bucket bounds), after start-up p50 <= {steady_p50 * 1e3:g} ms, p99 <= {steady_p99 * 1e3:g} ms; as ranks saw it p50 {statistics.median(seen) * 1e3:.1f} ms, "
              f"p99 {seen[int(0.99 * (len(seen) - 1))] * 1e3:.1f} ms")
        print(f"service CPU {cpu:.1f} s = {cpu / wall:.2f} cores busy; {per_core:.0f} leases per CPU-second; "
              f"rank-steps spent waiting for a renewal: {run.waits} of {args.ranks * int(wall / run.step_seconds)}")
        print(f"checks (must be 0): steps computed past a lease {run.computed_past_lease}, rows given to two ranks or "
              f"none {check_rows(args.ranks, datasets)}, changes not at the first step past every lease "
              f"{check_changes(run, landed)}")
        for step_seconds in (0.5, 1.0, 2.0):
            print(f"one service core steers about {per_core * args.lease_steps / 2 * step_seconds:,.0f} ranks at "
                  f"{step_seconds:g} s a step with {args.lease_steps}-step leases")
    return 0


if __name__ == "__main__":
    sys.exit(main())
