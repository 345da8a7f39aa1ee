"""Fuzzing: schemathesis against the service's own OpenAPI document, then hand-made hostile requests.

    .venv/bin/python -m benchmarks.reliability.fuzz [--max-examples 200] [--work /tmp/replaymix-fuzz] [--seed 1]

1. `schemathesis run <service>/openapi.json --checks not_a_server_error` (examples, coverage and
   fuzzing phases, with the admin token so PUT /v1/mix is reached) on a fresh state dir: no 5xx.
2. Hand-made cases on another fresh state dir: huge, negative and non-integer steps and ranges, world_size 0,
   rank not below world_size, NaN and infinite weights, unknown datasets, bodies of several MB, a
   wrong or missing token, far steps, cancels of stages that served or do not exist. Each must get its
   4xx (never a 5xx), change nothing, and leave the service up. (Far readers and where a change then
   lands: far_reader.py.)
Figures: requests, 5xx, unexpected statuses, service tracebacks.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from tqdm import tqdm

from benchmarks.reliability.harness import (
    REPO,
    ServiceProcess,
    ServiceSettings,
    build_datasets,
    code_root,
    head_commit,
    print_figures,
    write_admin_token,
)

MB = 1 << 20
LARGEST_STEP = 2**62  # the largest step GET /v1/batches/{step} documents as valid


@dataclass(frozen=True)
class HandCase:
    name: str
    method: str
    path: str
    params: dict | None = None
    body: bytes | None = None  # sent as application/json
    auth: str | None = "admin"  # "admin", None (no header), or the literal Authorization value
    expect: tuple[int | str, ...] = (422,)  # "closed": the server may drop the connection instead


def _json(data: object) -> bytes:
    return json.dumps(data).encode()


def hand_cases() -> list[HandCase]:
    """Hostile requests that must all be refused with a 4xx and change nothing."""
    batches, mix = "/v1/batches", "/v1/mix"
    many_names = {f"dataset-{i:07d}": 1.0 for i in range(200_000)}  # about 5 MB of JSON
    return [
        HandCase("step 2**63", "GET", f"{batches}/{2**63}"),
        HandCase("step 10**30", "GET", f"{batches}/{10**30}"),
        HandCase("step -1", "GET", f"{batches}/-1"),
        HandCase("step 1.5", "GET", f"{batches}/1.5"),
        HandCase("step 1e3", "GET", f"{batches}/1e3"),
        HandCase("step abc", "GET", f"{batches}/abc"),
        HandCase("world_size 0", "GET", f"{batches}/0", {"world_size": 0}),
        HandCase("world_size -1", "GET", f"{batches}/0", {"world_size": -1}),
        HandCase("world_size 2**70", "GET", f"{batches}/0", {"world_size": 2**70}),
        HandCase("world_size not dividing the batch", "GET", f"{batches}/0", {"world_size": 3}),
        HandCase("rank == world_size", "GET", f"{batches}/0", {"rank": 2, "world_size": 2}),
        HandCase("rank -1", "GET", f"{batches}/0", {"rank": -1, "world_size": 2}),
        HandCase("rank 2**70", "GET", f"{batches}/0", {"rank": 2**70, "world_size": 2}),
        HandCase("rank x", "GET", f"{batches}/0", {"rank": "x"}),
        HandCase("range count 0", "GET", batches, {"start": 0, "count": 0}),
        HandCase("range count 10**9", "GET", batches, {"start": 0, "count": 10**9}),
        HandCase("range without count", "GET", batches, {"start": 0}),
        HandCase("range start -1", "GET", batches, {"start": -1, "count": 1}),
        HandCase("range stride 0", "GET", batches, {"start": 0, "count": 2, "stride": 0}),
        HandCase("range stride past the largest step", "GET", batches, {"start": 0, "count": 2, "stride": LARGEST_STEP}),
        HandCase("range from the largest step", "GET", batches, {"start": LARGEST_STEP, "count": 2}),
        HandCase("range rank == world_size", "GET", batches, {"start": 0, "count": 1, "rank": 4, "world_size": 4}),
        HandCase("weight NaN", "PUT", mix, body=b'{"weights": {"old": NaN, "new": 1}}'),
        HandCase("weight Infinity", "PUT", mix, body=b'{"weights": {"old": Infinity, "new": 1}}'),
        HandCase("weight -Infinity", "PUT", mix, body=b'{"weights": {"old": -Infinity, "new": 1}}'),
        HandCase("weight 1e999", "PUT", mix, body=b'{"weights": {"old": 1e999, "new": 1}}'),
        HandCase("weight 1e308 twice", "PUT", mix, body=b'{"weights": {"old": 1e308, "new": 1e308}}'),
        HandCase("weight negative", "PUT", mix, body=_json({"weights": {"old": -1, "new": 2}})),
        HandCase("weights all zero", "PUT", mix, body=_json({"weights": {"old": 0, "new": 0}})),
        HandCase("weights empty", "PUT", mix, body=_json({"weights": {}})),
        HandCase("weights a list", "PUT", mix, body=_json({"weights": [1, 2]})),
        HandCase("weight a string", "PUT", mix, body=_json({"weights": {"old": "a lot"}})),
        HandCase("unknown dataset", "PUT", mix, body=_json({"weights": {"other": 1}})),
        HandCase("unknown and known dataset", "PUT", mix, body=_json({"weights": {"old": 1, "other": 1}})),
        HandCase("a dataset left out", "PUT", mix, body=_json({"weights": {"old": 1}})),
        HandCase("start_step already served", "PUT", mix, body=_json({"weights": {"old": 1, "new": 0}, "start_step": 1}),
                 expect=(409,)),
        HandCase("step 10**9 (past the lookahead)", "GET", f"{batches}/{10**9}", expect=(409,)),
        HandCase("range ending past the lookahead", "GET", batches, {"start": 0, "count": 2, "stride": 10**9},
                 expect=(409,)),
        HandCase("cancel the first stage", "DELETE", f"{mix}/stages/0", expect=(409,)),
        HandCase("cancel a stage that does not exist", "DELETE", f"{mix}/stages/7", expect=(404,)),
        HandCase("cancel step -1", "DELETE", f"{mix}/stages/-1"),
        HandCase("cancel without token", "DELETE", f"{mix}/stages/7", auth=None, expect=(401,)),
        HandCase("start_step -1", "PUT", mix, body=_json({"weights": {"old": 1, "new": 0}, "start_step": -1})),
        HandCase("start_step 1.5", "PUT", mix, body=_json({"weights": {"old": 1, "new": 0}, "start_step": 1.5})),
        HandCase("start_step 2**70", "PUT", mix, body=_json({"weights": {"old": 1, "new": 0}, "start_step": 2**70})),
        HandCase("5 MB of dataset names", "PUT", mix, body=_json({"weights": many_names}), expect=(413, 422)),
        HandCase("8 MB of garbage", "PUT", mix, body=b"\xff{" * (4 * MB), expect=(400, 413, 422)),
        HandCase("not JSON", "PUT", mix, body=b"weights=old:1"),
        HandCase("empty body", "PUT", mix, body=b""),
        HandCase("missing token", "PUT", mix, body=_json({"weights": {"old": 1, "new": 0}}), auth=None, expect=(401,)),
        HandCase("wrong token", "PUT", mix, body=_json({"weights": {"old": 1, "new": 0}}), auth="Bearer " + "0" * 32,
                 expect=(403,)),
        HandCase("bearer without a token", "PUT", mix, body=_json({"weights": {"old": 1, "new": 0}}), auth="Bearer",
                 expect=(401, 403)),
        HandCase("basic auth", "PUT", mix, body=_json({"weights": {"old": 1, "new": 0}}), auth="Basic YWRtaW46YWRtaW4=",
                 expect=(401, 403)),
        HandCase("8 MB token", "PUT", mix, body=_json({"weights": {"old": 1, "new": 0}}), auth="Bearer " + "a" * (8 * MB),
                 expect=(400, 401, 403, 431, "closed")),
        HandCase("PUT without body or token", "PUT", mix, auth=None, expect=(401, 422)),
        HandCase("DELETE /v1/mix", "DELETE", mix, expect=(405,)),
    ]


@dataclass
class FuzzResult:
    schemathesis_cases: int = 0
    schemathesis_failures: list[str] = field(default_factory=list)
    hand_requests: int = 0
    hand_failures: list[str] = field(default_factory=list)
    tracebacks: int = 0

    @property
    def ok(self) -> bool:
        return not self.schemathesis_failures and not self.hand_failures and self.tracebacks == 0

    def summary(self) -> str:
        return (
            f"fuzz: schemathesis {self.schemathesis_cases} cases, {len(self.schemathesis_failures)} failures; "
            f"hand-made {self.hand_requests} requests, {len(self.hand_failures)} failures; "
            f"{self.tracebacks} service tracebacks -> {'OK' if self.ok else 'FAILED'}"
        )


def run_schemathesis(url: str, token: str, max_examples: int, seed: int, report: Path) -> tuple[int, list[str]]:
    """Run the schemathesis CLI; return (test cases generated, one line per unique failure)."""
    command = [
        str(REPO / ".venv" / "bin" / "schemathesis"), "run", f"{url}/openapi.json",
        "--checks", "not_a_server_error", "--phases", "examples,coverage,fuzzing",
        "-H", f"Authorization: Bearer {token}", "--max-examples", str(max_examples), "--seed", str(seed),
        "--generation-database", "none", "--workers", "1", "--request-timeout", "30", "--no-color",
        "--report", "json", "--report-json-path", str(report),
    ]
    completed = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900)
    if not report.exists():
        raise RuntimeError(f"schemathesis wrote no report (exit {completed.returncode}):\n{completed.stdout[-3000:]}"
                           f"\n{completed.stderr[-3000:]}")
    data = json.loads(report.read_text())
    failures = [f"{f['code']} {f['title']} on {', '.join(f['operations'])}" for f in data["failures"]]
    failures += [f"error: {e}" for e in data["errors"]]
    return data["test_cases"]["generated"], failures


def send(http: httpx.Client, case: HandCase, token: str) -> int | str:
    headers = {"Content-Type": "application/json"} if case.body is not None else {}
    if case.auth == "admin":
        headers["Authorization"] = f"Bearer {token}"
    elif case.auth is not None:
        headers["Authorization"] = case.auth
    try:
        return http.request(case.method, case.path, params=case.params, content=case.body, headers=headers).status_code
    except httpx.TransportError as e:
        # uvicorn drops the connection on a header over its limit instead of answering
        return "closed" if isinstance(e, (httpx.ReadError, httpx.RemoteProtocolError)) else f"{type(e).__name__}: {e}"


def alive(http: httpx.Client) -> bool:
    """/healthz answers on a new connection (the server may close one after refusing a request)."""
    try:
        return httpx.get(http.base_url.join("/healthz"), timeout=10).status_code == 200
    except httpx.TransportError:
        return False


def run_hand_cases(http: httpx.Client, token: str, result: FuzzResult) -> None:
    before = http.get("/v1/mix").json()
    http.get("/v1/batches/3").raise_for_status()  # a served past, so that refusals have something to keep
    for case in tqdm(hand_cases(), desc="hand-made", unit="case"):
        status = send(http, case, token)
        result.hand_requests += 1
        if status not in case.expect:
            result.hand_failures.append(f"{case.name}: {case.method} {case.path[:60]} -> {status}, expected {case.expect}")
        if not alive(http):
            result.hand_failures.append(f"{case.name}: the service stopped answering /healthz")
            return
    after = http.get("/v1/mix").json()
    if after["schedule"] != before["schedule"]:
        result.hand_failures.append(f"refused requests changed the schedule: {before['schedule']} -> {after['schedule']}")


def run_fuzz(work: Path, max_examples: int, seed: int, code: Path = REPO) -> FuzzResult:
    work = Path(work)
    datasets = build_datasets(work / "datasets")
    token_file = work / "admin-token"
    token = write_admin_token(token_file)
    result = FuzzResult()
    for name in ("schemathesis", "hand"):
        shutil.rmtree(work / f"state-{name}", ignore_errors=True)
        settings = ServiceSettings(datasets, work / f"state-{name}", admin_token_file=token_file, code_root=code)
        log = work / f"service-{name}.log"
        log.unlink(missing_ok=True)
        with ServiceProcess(settings, log) as service:
            if name == "schemathesis":
                result.schemathesis_cases, result.schemathesis_failures = run_schemathesis(
                    service.url, token, max_examples, seed, work / "schemathesis.json")
            else:
                with httpx.Client(base_url=service.url, timeout=60) as http:
                    run_hand_cases(http, token, result)
        result.tracebacks += service.tracebacks()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-examples", type=int, default=200, help="schemathesis examples per operation")
    parser.add_argument("--work", type=Path, default=Path("/tmp/replaymix-fuzz"))
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--from-head", action="store_true", help="run the service as committed at HEAD")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    result = run_fuzz(args.work, args.max_examples, args.seed, code_root(args.work, args.from_head))
    print_figures(f"fuzz (service at {head_commit() if args.from_head else 'the working tree'})", {
        "schemathesis test cases": result.schemathesis_cases,
        "schemathesis failures": len(result.schemathesis_failures),
        "hand-made requests": result.hand_requests,
        "hand-made failures": len(result.hand_failures),
        "service tracebacks": f"{result.tracebacks} (logs in {args.work})",
    })
    for failure in result.schemathesis_failures + result.hand_failures:
        print(f"  FAILURE {failure}")
    print(result.summary())
    return 0 if result.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
