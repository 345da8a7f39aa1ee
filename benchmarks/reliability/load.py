"""Load: 64 concurrent rank clients on loopback for 2 minutes while the ratio changes.

    .venv/bin/python -m benchmarks.reliability.load [--clients 64] [--seconds 120] [--work /tmp/replaymix-load]

Each client is one rank of a world of `--clients` ranks (asyncio + httpx, one keep-alive connection
each) walking steps 0, 1, 2, ...; a quarter of its requests re-ask for a random step it already had.
An operator changes the ratio every few seconds. Every body is hashed per (step, rank): a second answer
that differs is a mismatch. Afterwards, for every tenth step, the ranks' bodies are checked against
the in-process Mixer given the final schedule (the pure function a batch must be), and the rows of
the step are checked to be disjoint across ranks (distinct (dataset, sample) pairs covering the whole
global batch). Figures: requests, errors (0), p50/p99 latency, mismatches (0), rows overlapping (0).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families
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
    write_admin_token,
)
from pipeline.dataset import TokenDataset
from service.mixer import Mixer, MixerConfig
from service.mix_schedule import MixSchedule
from service.wire import MEDIA_TYPE, decode_batch


@dataclass(frozen=True)
class LoadConfig:
    work: Path
    clients: int = 64
    seconds: float = 120.0
    seq_len: int = 64
    rows_per_rank: int = 2
    recheck: float = 0.25  # share of requests that re-ask for an earlier step
    change_every: float = 5.0
    keep_every: int = 10  # bodies of every tenth step are kept for the checks against the mixer
    max_requests_per_client: int = 50_000
    code: Path = REPO


@dataclass
class LoadResult:
    requests: int = 0
    errors: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    mismatches: int = 0  # a (step, rank) answered with different bytes
    digests: dict[tuple[int, int], bytes] = field(default_factory=dict)
    kept: dict[tuple[int, int], bytes] = field(default_factory=dict)
    changes_acknowledged: int = 0
    steps_checked: int = 0
    bodies_unlike_mixer: int = 0
    overlapping_rows: int = 0
    tracebacks: int = 0
    seconds: float = 0.0
    server_mean_seconds: float = float("nan")  # the service's own histogram: time inside the app

    @property
    def ok(self) -> bool:
        return (not self.errors and self.mismatches == 0 and self.bodies_unlike_mixer == 0
                and self.overlapping_rows == 0 and self.tracebacks == 0 and self.steps_checked > 0)

    def summary(self, clients: int) -> str:
        p50, p99 = percentiles(self.latencies)
        return (
            f"load: {clients} clients x {self.seconds:.0f} s: {self.requests} requests "
            f"({self.requests / max(self.seconds, 1e-9):.0f}/s), {len(self.errors)} errors, p50 {p50 * 1e3:.1f} ms, "
            f"p99 {p99 * 1e3:.1f} ms, {self.mismatches} byte mismatches, {self.changes_acknowledged} ratio changes, "
            f"{self.steps_checked} steps checked against the mixer: {self.bodies_unlike_mixer} unlike, "
            f"{self.overlapping_rows} overlapping rows -> {'OK' if self.ok else 'FAILED'}"
        )


async def rank_client(url: str, rank: int, config: LoadConfig, deadline: float, result: LoadResult,
                      bar: tqdm) -> None:
    rng = random.Random(rank)
    next_step = 0
    async with httpx.AsyncClient(base_url=url, timeout=60, headers={"Accept": MEDIA_TYPE}) as http:
        for _ in range(config.max_requests_per_client):
            if time.monotonic() >= deadline:
                return
            if next_step and rng.random() < config.recheck:
                step = rng.randrange(next_step)
            else:
                step, next_step = next_step, next_step + 1
            started = time.perf_counter()
            try:
                response = await http.get(f"/v1/batches/{step}", params={"rank": rank, "world_size": config.clients})
            except httpx.HTTPError as e:
                result.errors.append(f"rank {rank} step {step}: {type(e).__name__}: {e}")
                continue
            finally:
                result.requests += 1
                bar.update()
            result.latencies.append(time.perf_counter() - started)
            if response.status_code != 200:
                result.errors.append(f"rank {rank} step {step}: HTTP {response.status_code}: {response.text[:200]}")
                continue
            digest = hashlib.sha256(response.content).digest()
            if result.digests.setdefault((step, rank), digest) != digest:
                result.mismatches += 1
            if step % config.keep_every == 0:
                result.kept[step, rank] = response.content


async def operator(url: str, token: str, config: LoadConfig, deadline: float, result: LoadResult) -> None:
    rng = random.Random(0)
    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        while time.monotonic() + config.change_every < deadline:
            await asyncio.sleep(config.change_every)
            old = round(rng.uniform(0.01, 0.5), 4)
            response = await http.put("/v1/mix", json={"weights": {"old": old, "new": 1 - old}},
                                      headers={"Authorization": f"Bearer {token}"})
            if response.status_code == 200:
                result.changes_acknowledged += 1
            else:
                result.errors.append(f"PUT /v1/mix: HTTP {response.status_code}: {response.text[:200]}")


async def drive(url: str, token: str, config: LoadConfig, result: LoadResult) -> None:
    deadline = time.monotonic() + config.seconds
    started = time.perf_counter()
    with tqdm(desc=f"{config.clients} clients", unit="req", mininterval=1.0) as bar:
        await asyncio.gather(
            operator(url, token, config, deadline, result),
            *(rank_client(url, rank, config, deadline, result, bar) for rank in range(config.clients)),
        )
    result.seconds = time.perf_counter() - started


def check_against_mixer(settings: ServiceSettings, schedule: list[dict], config: LoadConfig, result: LoadResult) -> None:
    """Every kept body equals the pure function's answer, and a step's rows are disjoint across ranks."""
    datasets = {name: TokenDataset(path) for name, path in settings.datasets.items()}
    mixer = Mixer(datasets, MixerConfig(settings.seq_len, settings.global_batch, settings.seed),
                  MixSchedule.from_json(schedule))
    steps = sorted({step for step, _ in result.kept})
    for step in tqdm(steps, desc="check steps", unit="step"):
        ranks = [rank for rank in range(config.clients) if (step, rank) in result.kept]
        if len(ranks) < config.clients:
            continue  # a step not every rank reached before the deadline
        samples = set()
        for rank in ranks:
            body = decode_batch(result.kept[step, rank])
            expected = mixer.batch(step, rank, config.clients)
            same = np.array_equal(body.tokens, expected.tokens) and np.array_equal(body.sources, expected.sources)
            result.bodies_unlike_mixer += not same
            source, ordinal = mixer.locate(step, rank, config.clients)
            samples.update(zip(source.tolist(), ordinal.tolist()))
        result.overlapping_rows += settings.global_batch - len(samples)
        result.steps_checked += 1


def server_mean_seconds(metrics: str, route: str = "/v1/batches/{step}") -> float:
    """Mean request time the service itself measured for `route` (Prometheus histogram sum / count)."""
    totals = {}
    for family in text_string_to_metric_families(metrics):
        for sample in family.samples:
            if sample.name in ("replaymix_request_seconds_sum", "replaymix_request_seconds_count") \
                    and sample.labels.get("route") == route:
                totals[sample.name.rsplit("_", 1)[1]] = sample.value
    return totals.get("sum", float("nan")) / max(totals.get("count", 0.0), 1.0)


def run_load(config: LoadConfig) -> LoadResult:
    work = Path(config.work)
    datasets = build_datasets(work / "datasets", old_docs=2000, new_docs=2000)
    shutil.rmtree(work / "state", ignore_errors=True)
    token_file = work / "admin-token"
    token = write_admin_token(token_file)
    settings = ServiceSettings(datasets, work / "state", seq_len=config.seq_len,
                               global_batch=config.clients * config.rows_per_rank, admin_token_file=token_file,
                               code_root=config.code)
    log = work / "service.log"
    log.unlink(missing_ok=True)
    result = LoadResult()
    with ServiceProcess(settings, log) as service:
        asyncio.run(drive(service.url, token, config, result))
        schedule = httpx.get(f"{service.url}/v1/mix", timeout=60).json()["schedule"]
        result.server_mean_seconds = server_mean_seconds(httpx.get(f"{service.url}/metrics", timeout=60).text)
    result.tracebacks = service.tracebacks()
    check_against_mixer(settings, schedule, config, result)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=LoadConfig.clients)
    parser.add_argument("--seconds", type=float, default=LoadConfig.seconds)
    parser.add_argument("--work", type=Path, default=Path("/tmp/replaymix-load"))
    parser.add_argument("--from-head", action="store_true", help="run the service as committed at HEAD")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    config = LoadConfig(work=args.work, clients=args.clients, seconds=args.seconds,
                        code=code_root(args.work, args.from_head))
    result = run_load(config)
    p50, p99 = percentiles(result.latencies)
    print_figures(f"load (service at {head_commit() if args.from_head else 'the working tree'})", {
        "clients x seconds": f"{config.clients} x {result.seconds:.0f}",
        "requests": f"{result.requests} ({result.requests / max(result.seconds, 1e-9):.0f}/s)",
        "errors": len(result.errors),
        "latency p50 / p99 (ms), at the clients": f"{p50 * 1e3:.1f} / {p99 * 1e3:.1f}",
        "mean time inside the service (ms)": f"{result.server_mean_seconds * 1e3:.1f}",
        "(step, rank) answered twice, bytes differ": f"{result.mismatches} of {len(result.digests)} pairs",
        "ratio changes acknowledged": result.changes_acknowledged,
        "steps checked (all ranks) against the mixer": result.steps_checked,
        "bodies unlike the mixer": result.bodies_unlike_mixer,
        "rows overlapping across ranks": result.overlapping_rows,
        "service tracebacks": result.tracebacks,
    })
    for error in result.errors[:10]:
        print(f"  ERROR {error}")
    print(result.summary(config.clients))
    return 0 if result.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
