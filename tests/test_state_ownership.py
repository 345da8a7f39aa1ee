"""One writer per state (issue 27): real `python -m service` processes on one state, in a local folder, in
moto's S3 server and in fake-gcs-server, both on 127.0.0.1. A second process is refused with the owner's address; a standby takes
over when the owner dies, serving the same bytes for every served step with every acknowledged change;
an owner that was paused past its lease finds its writes refused and stops."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest

from conftest import BUCKET
from service.launcher import ServiceProcess
from service.mix_service import MixService
from service.mixer import MixerConfig
from service.state_store import S3Store, Superseded
from tests.test_service import READ_TOKEN, TOKEN, get_batch, put_mix, refused_in_process, refused_start


def flags(datasets: dict[str, Path], state: str, tmp_path: Path, *extra: str) -> list[str]:
    (tmp_path / "admin-token").write_text(TOKEN + "\n")
    (tmp_path / "read-token").write_text(READ_TOKEN + "\n")
    return [*(f"--dataset={name}={path}" for name, path in datasets.items()), "--seq-len=16", "--global-batch=8",
            "--seed=5", f"--state-dir={state}", "--reserve-steps=4", "--lease-seconds=1", "--weights=old=0.25,new=0.75",
            f"--admin-token-file={tmp_path / 'admin-token'}", f"--read-token-file={tmp_path / 'read-token'}", *extra]


@pytest.fixture
def two_datasets(english_lines, english_model, token_dataset_factory) -> dict[str, Path]:
    return {"old": token_dataset_factory("old", english_lines[:80], english_model).root,
            "new": token_dataset_factory("new", english_lines[80:200], english_model).root}


@pytest.fixture(params=["local", "s3", "gs"])
def state(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "state")
    if request.param == "gs":
        return f"gs://{request.getfixturevalue('gcs')}/runs/state"  # fake-gcs-server, this test's environment
    request.getfixturevalue("s3")  # moto's server, this test's environment pointed at it
    return f"s3://{BUCKET}/runs/state"


def log_ops(url: str) -> list[str]:
    from tests.test_service import reader
    return [entry["op"] for entry in reader.get(f"{url}/v1/mix").json()["log"]]


def test_one_owner_is_refused_a_second_and_a_standby_takes_over_when_it_dies(tmp_path, two_datasets, state,
                                                                              capsys):
    owner = ServiceProcess(flags(two_datasets, state, tmp_path)).start()
    standby = ServiceProcess(flags(two_datasets, state, tmp_path, "--standby"))
    try:
        served = {step: get_batch(owner.url, step) for step in range(6)}
        result = refused_in_process(flags(two_datasets, state, tmp_path), capsys)
        assert result.returncode == 2, result.stderr
        assert "owned by " + owner.url in result.stderr and "--standby" in result.stderr
        assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
        assert {step: get_batch(owner.url, step) for step in range(6)} == served  # the owner serves on
        change = put_mix(owner.url, {"weights": {"old": 1, "new": 0}, "start_step": 20}).json()["stage"]

        standby.start(wait=False)
        time.sleep(1.5)  # the standby is up, waiting: it does not serve while the owner lives
        assert standby.proc.poll() is None and owner.proc.poll() is None
        owner.kill9()
        standby.wait_ready(30)
        assert {step: get_batch(standby.url, step) for step in range(6)} == served
        mix = json_mix(standby.url)
        assert change in mix["schedule"]
        # Everything the owner may have served (its reservation) counts as served: a change lands past it.
        assert mix["next_change_step"] >= 6
        if not state.startswith("/"):
            assert log_ops(standby.url)[-1] == "owner"  # the fence of a lease taken over
        assert put_mix(standby.url, {"weights": {"old": 0.5, "new": 0.5}}).status_code == 200
    finally:
        owner.kill9()
        standby.stop()


def json_mix(url: str) -> dict:
    from tests.test_service import reader
    return reader.get(f"{url}/v1/mix").json()


def test_an_owner_paused_past_its_lease_finds_its_writes_refused_and_stops(tmp_path, two_datasets, s3):
    """A GC pause or a frozen VM: the standby takes the lease over, so the old owner's next write (its
    lease renewal) is refused by the store's condition, never retried, and it stops."""
    state = f"s3://{BUCKET}/runs/paused"
    owner = ServiceProcess(flags(two_datasets, state, tmp_path), log=tmp_path / "owner.log").start()
    standby = ServiceProcess(flags(two_datasets, state, tmp_path, "--standby"))
    try:
        served = {step: get_batch(owner.url, step) for step in range(3)}
        standby.start(wait=False)
        owner.proc.send_signal(signal.SIGSTOP)
        standby.wait_ready(30)
        assert {step: get_batch(standby.url, step) for step in range(3)} == served
        owner.proc.send_signal(signal.SIGCONT)
        assert owner.proc.wait(timeout=30) == 3
        assert "another process took the state over" in owner.output()
        assert put_mix(standby.url, {"weights": {"old": 0.5, "new": 0.5}}).status_code == 200
    finally:
        owner.kill9()
        standby.stop()


def test_a_conditional_write_on_a_superseded_version_is_refused(s3):
    first, second = S3Store(BUCKET, "cas"), S3Store(BUCKET, "cas")
    assert first.read("frontier.json") is None and second.read("frontier.json") is None
    first.create("frontier.json", b"1")
    with pytest.raises(Superseded):
        second.replace("frontier.json", b"2")  # it saw the object absent: someone else created it since
    second.read("frontier.json")
    second.replace("frontier.json", b"3")
    with pytest.raises(Superseded):
        first.append("frontier.json", b"4")  # an old owner's append, on the version it knew
    assert s3.get_object(Bucket=BUCKET, Key="cas/frontier.json")["Body"].read() == b"3"


def test_bad_state_uris_and_a_standby_for_another_run_are_refused(tmp_path, two_datasets, s3, german_lines,
                                                                   english_model, token_dataset_factory, capsys):
    result = refused_in_process(flags(two_datasets, "s3://no-such-bucket/state", tmp_path), capsys)
    assert result.returncode == 2 and "no-such-bucket" in result.stderr and "credentials" in result.stderr
    state = f"s3://{BUCKET}/runs/one"
    owner = ServiceProcess(flags(two_datasets, state, tmp_path)).start()
    try:
        other = {**two_datasets, "new": token_dataset_factory("other", german_lines[:50], english_model).root}
        # In a process of its own, with its timeout: refused at once, not after waiting.
        result = refused_start(flags(other, state, tmp_path, "--standby"))
        assert result.returncode == 2 and "made for other inputs" in result.stderr
    finally:
        owner.stop()
    assert not [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET).get("Contents", []) if "no-such" in o["Key"]]


def test_in_process_services_share_the_rule(tmp_path, two_datasets):
    from pipeline.dataset import TokenDataset
    from service.ownership import StateOwned

    datasets = {name: TokenDataset(path) for name, path in two_datasets.items()}
    config = MixerConfig(seq_len=16, global_batch=8, seed=5)
    first = MixService(datasets, config, tmp_path / "state", {"old": 1, "new": 1}, address="http://first")
    with pytest.raises(StateOwned, match="owned by http://first"):
        MixService(datasets, config, tmp_path / "state")
    first.close()
    record = json.loads((tmp_path / "state" / "owner.json").read_text())
    assert record["released"] is True
    MixService(datasets, config, tmp_path / "state").close()
