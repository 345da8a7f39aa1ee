"""Far readers: nobody reading far ahead, with or without a token, can move a mix change out of reach.

    .venv/bin/python -m benchmarks.reliability.far_reader [--work /tmp/replaymix-far] [--from-head]

A service whose reads need a token (`--read-token-file`) serves a few steps to a trainer rank. Then:
1. an anonymous reader asks for far steps (10^9 and the largest the API documents, alone and as the end
   of a range): each must be refused with 401;
2. an authenticated but confused reader (the read token) asks for the same: each must be refused
   with 409 (past `--max-lookahead`) or 422 (past the largest step), and the served frontier must not move;
3. the operator changes the mix without start_step: the change must land at the next unserved step,
   and the trainer's next step must have the new mix.
Figures: requests, refused as expected, frontier before and after, the step the change landed at.
"""

from __future__ import annotations

import argparse
import secrets
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from benchmarks.reliability.harness import (
    REPO,
    ServiceProcess,
    ServiceSettings,
    build_datasets,
    code_root,
    head_commit,
    print_figures,
    put_mix,
    write_admin_token,
)
from service.wire import decode_batch

LARGEST_STEP = 2**62  # the largest step GET /v1/batches/{step} documents as valid
FAR_STEPS = (10**9, LARGEST_STEP)
SERVED_STEPS = 5  # what the trainer rank has read before the far readers come


@dataclass
class FarReaderResult:
    requests: int = 0
    failures: list[str] = field(default_factory=list)
    frontier_before: int = -1
    frontier_after: int = -1
    change_landed_at: int | None = None

    @property
    def ok(self) -> bool:
        return not self.failures and self.change_landed_at == self.frontier_before

    def summary(self) -> str:
        return (f"far readers: {self.requests} requests, {len(self.failures)} not refused as expected; frontier "
                f"{self.frontier_before} -> {self.frontier_after}; change landed at step {self.change_landed_at} "
                f"-> {'OK' if self.ok else 'FAILED'}")


def far_requests() -> list[tuple[str, dict]]:
    """(path, params) of each far read: single steps and ranges ending far away."""
    requests = []
    for step in FAR_STEPS:
        requests.append((f"/v1/batches/{step}", {}))
        requests.append(("/v1/batches", {"start": 0, "count": 2, "stride": step}))
    return requests


def check_far_readers(url: str, read_token: str, admin_token: str, result: FarReaderResult) -> None:
    reader_headers = {"Authorization": f"Bearer {read_token}"}
    with httpx.Client(base_url=url, timeout=60) as anonymous, \
            httpx.Client(base_url=url, timeout=60, headers=reader_headers) as reader:
        for step in range(SERVED_STEPS):
            reader.get(f"/v1/batches/{step}").raise_for_status()
        result.frontier_before = reader.get("/v1/status").json()["served_frontier"]
        for who, http, expected in (("anonymous", anonymous, (401,)), ("read token", reader, (409, 422))):
            for path, params in far_requests():
                status = http.get(path, params=params).status_code
                result.requests += 1
                if status not in expected:
                    result.failures.append(f"{who}: GET {path} {params} -> {status}, expected {expected}")
        result.frontier_after = reader.get("/v1/status").json()["served_frontier"]
        if result.frontier_after != result.frontier_before:
            result.failures.append(f"far reads moved the served frontier {result.frontier_before} -> "
                                   f"{result.frontier_after}")
        response = put_mix(reader, admin_token, {"old": 1.0, "new": 0.0})
        result.requests += 1
        if response.status_code != 200:
            result.failures.append(f"PUT /v1/mix -> {response.status_code}: {response.text[:200]}")
            return
        result.change_landed_at = response.json()["stage"]["start_step"]
        next_batch = decode_batch(reader.get(f"/v1/batches/{result.frontier_after}").content)
        if set(next_batch.sources.tolist()) != {next_batch.dataset_names.index("old")}:
            result.failures.append(f"step {result.frontier_after} after the change is not all 'old'")


def run_far_reader(work: Path, code: Path = REPO) -> FarReaderResult:
    work = Path(work)
    datasets = build_datasets(work / "datasets")
    admin_token = write_admin_token(work / "admin-token")
    read_token = secrets.token_hex(16)
    (work / "read-token").write_text(read_token + "\n")
    settings = ServiceSettings(datasets, work / "state", admin_token_file=work / "admin-token",
                               read_token_file=work / "read-token", code_root=code)
    (work / "service.log").unlink(missing_ok=True)
    result = FarReaderResult()
    with ServiceProcess(settings, work / "service.log") as service:
        check_far_readers(service.url, read_token, admin_token, result)
    if service.tracebacks():
        result.failures.append(f"{service.tracebacks()} service tracebacks (log {work / 'service.log'})")
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/replaymix-far"))
    parser.add_argument("--from-head", action="store_true", help="run the service as committed at HEAD")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(args.work / "state", ignore_errors=True)
    result = run_far_reader(args.work, code_root(args.work, args.from_head))
    print_figures(f"far readers (service at {head_commit() if args.from_head else 'the working tree'})", {
        "requests": result.requests,
        "not refused as expected": len(result.failures),
        "served frontier before / after": f"{result.frontier_before} / {result.frontier_after}",
        "operator's change landed at step": result.change_landed_at,
    })
    for failure in result.failures:
        print(f"  FAILURE {failure}")
    print(result.summary())
    return 0 if result.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
