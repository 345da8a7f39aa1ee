"""Fast versions of benchmarks/reliability: kill -9 loop, fuzzing, damaged data, pipeline kill and rerun.

Everything is real: `python -m service` subprocesses on loopback, schemathesis against the service's
OpenAPI document, datasets on disk, `python -m pipeline.tokenize` jobs on a local Ray. A failure found
and not yet fixed goes into KNOWN_HAND_FAILURES as a strict xfail (it turns into an error once fixed,
so the marker goes with the fix); today none is open.
"""

from __future__ import annotations

import shutil

import httpx
import pytest
import ray

from benchmarks.reliability import damaged_data, far_reader, fuzz
from benchmarks.reliability.crash_loop import CrashLoopConfig, run_crash_loop
from benchmarks.reliability.harness import ServiceProcess, ServiceSettings, build_datasets, write_admin_token
from benchmarks.reliability.pipeline_kill import run_pipeline_kill



@pytest.fixture(scope="module")
def datasets(tmp_path_factory) -> dict:
    return build_datasets(tmp_path_factory.mktemp("reliability-datasets"))


@pytest.fixture(scope="module")
def admin(tmp_path_factory) -> tuple:
    token_file = tmp_path_factory.mktemp("admin") / "token"
    return token_file, write_admin_token(token_file)


def started_service(datasets, state_dir, admin) -> ServiceProcess:
    settings = ServiceSettings(datasets, state_dir, admin_token_file=admin[0])
    return ServiceProcess(settings, state_dir.with_suffix(".log")).start()


def test_crash_loop_loses_no_batch_and_no_acknowledged_change(tmp_path, datasets):
    shutil.copytree(datasets["old"].parent, tmp_path / "datasets")
    result = run_crash_loop(CrashLoopConfig(work=tmp_path, kills=3, gap=(0.2, 0.8), steps_after=10))
    assert result.crashes == 3 and result.batches_compared >= 20, result.summary()
    assert result.changes_acknowledged >= 1, result.summary()
    assert result.batches_different == 0 and result.changes_lost == 0, result.summary()
    assert not result.consumer_errors and result.service_tracebacks == 0, result.summary()


@pytest.fixture(scope="module")
def hand_service(tmp_path_factory, datasets, admin):
    service = started_service(datasets, tmp_path_factory.mktemp("hand") / "state", admin)
    httpx.get(f"{service.url}/v1/batches/3").raise_for_status()  # a served past that refusals must keep
    yield service
    service.stop()


KNOWN_HAND_FAILURES: dict[str, str] = {}  # case name -> reason, as strict xfails while a failure is open


@pytest.mark.parametrize("case", [
    pytest.param(case, id=case.name, marks=[pytest.mark.xfail(strict=True, reason=KNOWN_HAND_FAILURES[case.name])]
                 if case.name in KNOWN_HAND_FAILURES else [])
    for case in fuzz.hand_cases()
])
def test_hostile_request_is_refused_and_changes_nothing(hand_service, admin, case):
    with httpx.Client(base_url=hand_service.url, timeout=60) as http:
        before = http.get("/v1/mix").json()
        assert fuzz.send(http, case, admin[1]) in case.expect
        assert fuzz.alive(http)
        assert http.get("/v1/mix").json() == before


def test_far_readers_cannot_move_a_change_out_of_reach(tmp_path):
    result = far_reader.run_far_reader(tmp_path)
    assert result.ok and result.requests == 9 and result.frontier_after == far_reader.SERVED_STEPS, (
        result.summary() + "\n" + "\n".join(result.failures))


def test_schemathesis_finds_no_server_error(tmp_path, datasets, admin):
    service = started_service(datasets, tmp_path / "state", admin)
    try:
        cases, failures = fuzz.run_schemathesis(service.url, admin[1], max_examples=5, seed=1,
                                                report=tmp_path / "schemathesis.json")
    finally:
        service.stop()
    assert cases > 20
    assert failures == []


# A subset of damaged_data.DAMAGES (each case is a service start): one per kind of check.
DAMAGES = {d.name: d for d in damaged_data.DAMAGES}
SIZE_DETECTED = [DAMAGES[name] for name in ("truncated shard", "missing shard", "manifest lies about token counts")]
FLIPPED = [DAMAGES["flipped bytes in a shard"]]


@pytest.mark.parametrize("damage, mode", [
    *[pytest.param(d, "size", id=f"{d.name}-size") for d in SIZE_DETECTED],
    *[pytest.param(d, "full", id=f"{d.name}-full") for d in FLIPPED],
    *[pytest.param(d, None, id=f"{d.name}-default") for d in FLIPPED],  # the default is a full checksum
])
def test_service_refuses_damaged_data_naming_the_file(tmp_path, datasets, damage, mode):
    damaged = damaged_data.damaged_copy(tmp_path, datasets["new"], damage)
    refused, message = damaged_data.start_on_damaged(tmp_path, datasets, damaged, damage, mode)
    assert refused, message


def test_pipeline_refuses_to_overwrite_without_being_told(tmp_path, datasets):
    result = damaged_data.DamagedResult()
    damaged_data.check_pipeline_overwrite(tmp_path, datasets, damaged_data.REPO, False, result)
    assert result.pipeline_checks and all(result.pipeline_checks.values()), result.pipeline_checks


@pytest.fixture
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False)  # shared by the jobs: one Ray start, not three
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def test_pipeline_killed_midway_reruns_byte_identical(tmp_path, datasets, local_ray):
    shutil.copytree(datasets["old"].parent, tmp_path / "datasets")
    result = run_pipeline_kill(tmp_path, kills=1, seed=3, documents=200, ray_address=local_ray)
    assert result.ok, result.summary() + "\n" + "\n".join(result.reruns_different)
