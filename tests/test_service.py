"""The service as a real uvicorn process: bytes stable across kill -9, mix changes, auth, errors."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from service.launcher import ServiceProcess, free_port
from service.mix_service import MixService
from service.mixer import MixerConfig
from service.mix_log import LOG_FILE
from service.state import FRONTIER_FILE, StateError
from service.wire import MEDIA_TYPE, decode_batch, decode_batches

REPO = Path(__file__).resolve().parents[1]
TOKEN = "s3cret-admin-token-for-tests"
READ_TOKEN = "read-token-of-the-trainer-ranks"
# What trainer ranks use: every read carries the read token.
reader = httpx.Client(headers={"Authorization": f"Bearer {READ_TOKEN}"}, timeout=30)


def service_args(datasets: dict[str, Path], state_dir: Path, token_file: Path | None, weights: str | None,
                 seq_len: int = 16, global_batch: int = 8, reserve_steps: int = 256) -> list[str]:
    """Flags of a service whose reads need READ_TOKEN (its file is written beside the state dir)."""
    read_token_file = state_dir.with_name(state_dir.name + ".read-token")
    read_token_file.write_text(READ_TOKEN + "\n")
    args = [f"--dataset={name}={path}" for name, path in datasets.items()]
    args += [f"--seq-len={seq_len}", f"--global-batch={global_batch}", "--seed=5",
             f"--state-dir={state_dir}", f"--reserve-steps={reserve_steps}", f"--read-token-file={read_token_file}"]
    if weights is not None:
        args.append(f"--weights={weights}")
    if token_file is not None:
        args.append(f"--admin-token-file={token_file}")
    return args


@pytest.fixture
def two_datasets(english_lines, english_model, token_dataset_factory) -> dict[str, Path]:
    old = token_dataset_factory("old", english_lines[:80], english_model)
    new = token_dataset_factory("new", english_lines[80:200], english_model)
    return {"old": old.root, "new": new.root}


@pytest.fixture
def service(tmp_path, two_datasets):
    token_file = tmp_path / "admin-token"
    token_file.write_text(TOKEN + "\n")
    proc = ServiceProcess(service_args(two_datasets, tmp_path / "state", token_file, "old=0.25,new=0.75"), free_port())
    yield proc.start()
    proc.stop()


def refused_start(args: list[str]) -> subprocess.CompletedProcess:
    """Run `python -m service` expecting it to refuse to start (a start that serves times out here)."""
    return subprocess.run([sys.executable, "-m", "service", *args, "--port", str(free_port())], cwd=REPO,
                          capture_output=True, text=True, timeout=60)


def get_batch(url: str, step: int, rank: int = 0, world_size: int = 1) -> bytes:
    response = reader.get(f"{url}/v1/batches/{step}", params={"rank": rank, "world_size": world_size})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == MEDIA_TYPE
    return response.content


def put_mix(url: str, body: dict, token: str | None = TOKEN) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    return httpx.put(f"{url}/v1/mix", json=body, headers=headers)


def test_same_bytes_after_kill_9_and_restart_with_acknowledged_changes(service):
    url = service.url
    served = {step: get_batch(url, step) for step in range(6)}
    ranks = {r: get_batch(url, 3, r, 4) for r in range(4)}
    changed = put_mix(url, {"weights": {"old": 0.05, "new": 0.95}})  # takes effect at step 6
    assert changed.status_code == 200 and changed.json()["stage"]["start_step"] == 6
    assert put_mix(url, {"weights": {"old": 1, "new": 0}, "start_step": 20}).status_code == 200
    served.update({step: get_batch(url, step) for step in (6, 7, 19, 20, 21)})
    service.kill9()
    service.start()
    for step, body in served.items():
        assert get_batch(url, step) == body, f"step {step} changed across kill -9"
    assert all(get_batch(url, 3, r, 4) == body for r, body in ranks.items())
    mix = reader.get(f"{url}/v1/mix").json()
    assert [s["start_step"] for s in mix["schedule"]] == [0, 6, 20] and mix["served_frontier"] == 22
    assert set(decode_batch(served[20]).sources.tolist()) == {1}  # "old": sources index datasets by name
    # a served step can never be rewritten, also not after the restart: nor can any step the killed
    # process had reserved (steps 0..255), since nobody can tell which of them it served
    assert mix["reserved"] == mix["next_change_step"] == 256
    assert put_mix(url, {"weights": {"old": 0.5, "new": 0.5}, "start_step": 21}).status_code == 409
    assert put_mix(url, {"weights": {"old": 0.5, "new": 0.5}, "start_step": 255}).status_code == 409


def test_binary_and_json_bodies_agree_and_ranks_cover_the_batch(service):
    url = service.url
    whole = decode_batch(get_batch(url, 4))
    parts = [decode_batch(get_batch(url, 4, r, 2)) for r in range(2)]
    np.testing.assert_array_equal(np.concatenate([p.tokens for p in parts]), whole.tokens)
    assert whole.tokens.shape == (8, 17) and whole.dataset_names == ("new", "old")
    as_json = reader.get(f"{url}/v1/batches/4", headers={"Accept": "application/json"}).json()
    assert as_json["tokens"] == whole.tokens.tolist() and as_json["sources"] == whole.sources.tolist()
    status = reader.get(f"{url}/v1/status").json()
    assert status["served_frontier"] == 5 and status["seq_len"] == 16 and status["global_batch"] == 8
    assert list(status["datasets"]) == ["new", "old"]
    assert sum(d["samples_served"] for d in status["datasets"].values()) == 5 * 8
    assert abs(status["datasets"]["old"]["share_served"] - 0.25) <= 1 / 40
    metrics = httpx.get(f"{url}/metrics").text
    assert 'replaymix_mix_weight{dataset="old"} 0.25' in metrics
    assert 'replaymix_tokens_served_total{dataset="new"}' in metrics
    assert 'route="/v1/batches/{step}"' in metrics and "replaymix_reserved_frontier 260.0" in metrics


BAD_CHANGES = [
    ({"weights": {"old": -1, "new": 1}}, 422),
    ({"weights": {"old": 0, "new": 0}}, 422),
    ({"weights": {"other": 1}}, 422),
    ({"weights": {"old": "a lot"}}, 422),
    ({"weights": {}}, 422),
    ({"weights": {"old": 1, "new": 0}, "start_step": -3}, 422),
    ({"weights": {"old": 1, "new": 0}, "start_step": 1}, 409),
    ({"weights": {"old": 1}}, 422),
    ({"weights": {"old": 1, "new": 0, "other": 0}}, 422),
]


def test_bad_mix_changes_are_refused_and_change_nothing(service):
    get_batch(service.url, 2)
    before = reader.get(f"{service.url}/v1/mix").json()
    for body, status in BAD_CHANGES:
        response = put_mix(service.url, body)
        assert response.status_code == status, (body, response.text)
        assert response.json()["detail"]
    response = httpx.put(f"{service.url}/v1/mix", content=b'{"weights": {"old": NaN, "new": 1}}',
                         headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
    assert response.status_code == 422 and "weights.old" in response.text
    # a dataset left out is an error, not a weight of 0, and it is reported before any step conflict
    response = put_mix(service.url, {"weights": {"old": 1}, "start_step": 1})
    assert response.status_code == 422 and "no weight for ['new'] (give 0" in response.text
    assert reader.get(f"{service.url}/v1/mix").json() == before


def test_the_schedule_is_an_append_only_log_with_explicit_cancels(service):
    url = service.url
    get_batch(url, 2)
    assert put_mix(url, {"weights": {"old": 1, "new": 0}, "start_step": 50, "by": "alice"}).status_code == 200
    # the same unserved step again does not silently replace the stage ...
    again = put_mix(url, {"weights": {"old": 0, "new": 1}, "start_step": 50})
    assert again.status_code == 409 and "DELETE /v1/mix/stages/50" in again.json()["detail"]
    # ... and a change without start_step lands past everything scheduled, not refused
    assert put_mix(url, {"weights": {"old": 0.5, "new": 0.5}}).json()["stage"]["start_step"] == 51
    # withdrawing a stage no step has reached is its own, recorded operation
    admin = {"Authorization": f"Bearer {TOKEN}"}
    cancelled = httpx.delete(f"{url}/v1/mix/stages/51", params={"by": "bob", "reason": "too early"}, headers=admin)
    assert cancelled.status_code == 200 and cancelled.json()["cancelled"]["start_step"] == 51
    assert httpx.delete(f"{url}/v1/mix/stages/51", headers=admin).status_code == 404
    assert httpx.delete(f"{url}/v1/mix/stages/0", headers=admin).status_code == 409  # served: it stays
    assert httpx.delete(f"{url}/v1/mix/stages/50").status_code == 401
    mix = reader.get(f"{url}/v1/mix").json()
    assert [s["start_step"] for s in mix["schedule"]] == [0, 50] and mix["next_change_step"] == 51
    log = mix["log"]
    assert [(e["seq"], e["op"]) for e in log] == [(0, "stage"), (1, "stage"), (2, "stage"), (3, "cancel")]
    assert log[1]["by"] == "alice (127.0.0.1)" and log[3]["by"] == "bob (127.0.0.1)" and log[3]["reason"] == "too early"
    assert log[0]["by"] == "python -m service --weights" and all(e["time"].endswith("Z") for e in log)
    # the log survives a restart, and the schedule is derived from it
    service.kill9()
    service.start()
    assert reader.get(f"{url}/v1/mix").json()["log"] == log


def test_mutations_need_the_admin_token(service):
    assert put_mix(service.url, {"weights": {"old": 1, "new": 0}}, token=None).status_code == 401
    assert put_mix(service.url, {"weights": {"old": 1, "new": 0}}, token="wrong-token-0000000").status_code == 403
    assert reader.get(f"{service.url}/v1/batches/0", params={"world_size": 3}).status_code == 422
    assert reader.get(f"{service.url}/v1/batches/-1").status_code == 422
    assert httpx.get(f"{service.url}/healthz").json()["ok"] is True


def refused_in_process(args: list[str], capsys) -> subprocess.CompletedProcess:
    """`refused_start` through the function `python -m service` runs (`service.__main__.main`), in this
    process: a Python process and its imports fewer. A flag argparse refuses exits (SystemExit) with the
    status the process would. The port is one this test holds, so a start that was not refused ends at once,
    where uvicorn binds it (SystemExit 1), instead of serving."""
    import socket

    from service.__main__ import main

    capsys.readouterr()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        try:
            status = main([*args, "--port", str(taken.getsockname()[1])])
        except SystemExit as exited:
            status = exited.code
    return subprocess.CompletedProcess(["python", "-m", "service", *args], status, "", capsys.readouterr().err)


def test_start_is_refused_with_clear_messages(tmp_path, two_datasets, german_lines, token_dataset_factory, capsys):
    from tests.conftest import train_spm

    german = train_spm(german_lines, tmp_path / "spm" / "german", vocab_size=200)
    foreign = token_dataset_factory("foreign", german_lines[:40], german).root
    args = service_args({"old": two_datasets["old"], "foreign": foreign}, tmp_path / "s1", None, "old=1,foreign=0")
    result = refused_start(args)  # as the user runs it, a process of its own; the refusals below in this one
    assert result.returncode == 2 and "do not share a vocabulary" in result.stderr
    assert not (tmp_path / "s1").exists()
    # a state dir made for other inputs is refused rather than silently changing served steps
    state = tmp_path / "s2"
    ServiceProcess(service_args(two_datasets, state, None, "old=1,new=0"), free_port()).start().stop()
    other = service_args(two_datasets, state, None, "old=1,new=0", seq_len=32)
    result = refused_in_process(other, capsys)
    assert result.returncode == 2 and "seq_len" in result.stderr and "identity.json" in result.stderr
    # other weights on a state dir are refused: its log decides the mix (omitting --weights resumes it)
    other = service_args(two_datasets, state, None, "old=0.5,new=0.5")
    result = refused_in_process(other, capsys)
    assert result.returncode == 2 and "differs from the one this state dir started with" in result.stderr
    ServiceProcess(service_args(two_datasets, state, None, None), free_port()).start().stop()
    # a state dir written under another mix rule (replaymix before Tijdeman's rule) is refused by name
    identity = json.loads((state / "identity.json").read_text())
    del identity["mix_rule"]
    (state / "identity.json").write_text(json.dumps(identity))
    result = refused_in_process(service_args(two_datasets, state, None, None), capsys)
    assert result.returncode == 2 and "served with mix rule 1" in result.stderr and "mix rule 2" in result.stderr
    # an omitted dataset, and a service nobody could read from, are refused at start
    partial = service_args(two_datasets, tmp_path / "s3", None, "old=1")
    result = refused_in_process(partial, capsys)
    assert result.returncode == 2 and "no weight for ['new']" in result.stderr
    unreadable = [a for a in service_args(two_datasets, tmp_path / "s4", None, "old=1,new=1") if "read-token" not in a]
    result = refused_in_process(unreadable, capsys)
    assert result.returncode == 2 and "--allow-anonymous-reads" in result.stderr


def test_the_order_datasets_are_named_in_does_not_change_served_bytes(tmp_path, two_datasets):
    state = tmp_path / "state"
    forward = ServiceProcess(service_args(two_datasets, state, None, "old=0.3,new=0.7"), free_port()).start()
    try:
        served = {step: get_batch(forward.url, step, 1, 2) for step in range(8)}
    finally:
        forward.stop()
    backward = dict(reversed(list(two_datasets.items())))
    for state_dir in (state, tmp_path / "fresh"):  # the same state dir, and a new one
        again = ServiceProcess(service_args(backward, state_dir, None, "new=0.7,old=0.3"), free_port()).start()
        try:
            assert all(get_batch(again.url, step, 1, 2) == body for step, body in served.items())
            assert list(reader.get(f"{again.url}/v1/status").json()["datasets"]) == ["new", "old"]
        finally:
            again.stop()


def test_reads_need_a_token_and_no_reader_can_push_the_frontier_away(service):
    url = service.url
    get_batch(url, 0)
    assert httpx.get(f"{url}/v1/batches/1").status_code == 401
    assert httpx.get(f"{url}/v1/status").status_code == 401
    assert httpx.get(f"{url}/v1/mix").status_code == 401
    assert httpx.get(f"{url}/v1/batches/1", headers={"Authorization": "Bearer not-the-token"}).status_code == 403
    # the admin token reads too
    assert httpx.get(f"{url}/v1/batches/1", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
    # a far step, alone or at the end of a range, is refused and moves nothing
    far = reader.get(f"{url}/v1/batches/999999999")
    assert far.status_code == 409 and "--max-lookahead" in far.json()["detail"]
    ranged = reader.get(f"{url}/v1/batches", params={"start": 2, "count": 3, "stride": 10**6})
    assert ranged.status_code == 409
    status = reader.get(f"{url}/v1/status").json()
    assert status["served_frontier"] == 2 and status["max_lookahead"] == 1024 and status["mix_rule"] == 2
    assert all(Path(d["path"]).is_absolute() for d in status["datasets"].values())  # the trainer's val splits
    # so the operator's change lands at the next unserved step of the run that is training
    assert put_mix(url, {"weights": {"old": 1, "new": 0}}).json()["stage"]["start_step"] == 2
    assert reader.get(f"{url}/v1/batches/1026").status_code == 409  # 2 served + 1024 ahead
    assert reader.get(f"{url}/v1/batches/1026", params={"world_size": 2, "rank": 1}).status_code == 409
    assert reader.get(f"{url}/v1/batches/1025").status_code == 200


def test_anonymous_reads_when_allowed_see_no_server_paths(tmp_path, two_datasets):
    args = [a for a in service_args(two_datasets, tmp_path / "state", None, "old=1,new=1") if "read-token" not in a]
    proc = ServiceProcess(args + ["--allow-anonymous-reads"], free_port()).start()
    try:
        assert httpx.get(f"{proc.url}/v1/batches/0").status_code == 200
        for path in ("/v1/status", "/v1/mix", "/v1/batches/99999999", "/v1/batches/0?world_size=3"):
            body = httpx.get(f"{proc.url}{path}").text
            assert str(tmp_path) not in body and "/tmp" not in body, path
    finally:
        proc.stop()


def frontier_file(state: Path) -> dict:
    return json.loads((state / FRONTIER_FILE).read_text())


def test_reservations_write_once_per_leap_and_never_let_a_change_rewrite_a_served_step(tmp_path, two_datasets):
    token_file = tmp_path / "admin-token"
    token_file.write_text(TOKEN)
    state = tmp_path / "state"
    service = ServiceProcess(service_args(two_datasets, state, token_file, "old=0.5,new=0.5", reserve_steps=16), free_port())
    url = service.start().url
    try:
        served = {0: get_batch(url, 0)}
        assert frontier_file(state) == {"reserved": 16, "served": 1}
        served.update({step: get_batch(url, step) for step in range(1, 10)})
        assert frontier_file(state) == {"reserved": 16, "served": 1}  # no disk write below the reservation
        status = reader.get(f"{url}/v1/status").json()
        assert (status["served_frontier"], status["reserved"], status["next_change_step"]) == (10, 16, 10)
        # while the process runs it knows exactly what it served: a change may start right after it
        assert put_mix(url, {"weights": {"old": 1, "new": 0}, "start_step": 9}).status_code == 409
        assert put_mix(url, {"weights": {"old": 1, "new": 0}, "start_step": 12}).json()["stage"]["start_step"] == 12
        served.update({step: get_batch(url, step) for step in (10, 11, 12, 13)})
        assert set(decode_batch(served[13]).sources.tolist()) == {1}
        service.kill9()
        service.start()
        for step, body in served.items():
            assert get_batch(url, step) == body, f"step {step} changed across kill -9"
        # after kill -9 every reserved step counts as served: refused below 16, a default change lands at 16
        assert put_mix(url, {"weights": {"old": 0, "new": 1}, "start_step": 14}).status_code == 409
        assert put_mix(url, {"weights": {"old": 0, "new": 1}}).json()["stage"]["start_step"] == 16
        served[16] = get_batch(url, 16)
        assert frontier_file(state) == {"reserved": 32, "served": 17}
        assert set(decode_batch(served[16]).sources.tolist()) == {0}
    finally:
        service.stop()  # SIGTERM: a clean shutdown shrinks the reservation to what was served
    assert frontier_file(state) == {"reserved": 17, "served": 17}
    service.start()
    try:
        assert reader.get(f"{url}/v1/mix").json()["next_change_step"] == 17
        assert put_mix(url, {"weights": {"old": 1, "new": 0}}).json()["stage"]["start_step"] == 17
        assert all(get_batch(url, step) == body for step, body in served.items())
    finally:
        service.stop()


def test_a_range_request_is_its_steps_back_to_back(service):
    url = service.url
    singles = [get_batch(url, step, 1, 2) for step in range(5, 12, 3)]
    params = {"start": 5, "count": 3, "stride": 3, "rank": 1, "world_size": 2}
    response = reader.get(f"{url}/v1/batches", params=params)
    assert response.status_code == 200 and response.headers["content-type"] == MEDIA_TYPE
    assert response.content == b"".join(singles)
    assert [b.step for b in decode_batches(response.content)] == [5, 8, 11]
    as_json = reader.get(f"{url}/v1/batches", params=params, headers={"Accept": "application/json"}).json()
    assert [b["tokens"] for b in as_json["batches"]] == [decode_batch(b).tokens.tolist() for b in singles]
    before = reader.get(f"{url}/v1/status").json()
    assert before["served_frontier"] == 12
    refused = {
        "count too large": {"start": 0, "count": 10**6},
        "no count": {"start": 0},
        "bad world size": {"start": 0, "count": 2, "world_size": 3},
        "past the last step": {"start": 2**62, "count": 1},
    }
    for why, bad in refused.items():
        response = reader.get(f"{url}/v1/batches", params=bad)
        assert response.status_code == 422 and response.json()["detail"], why
    assert reader.get(f"{url}/v1/status").json()["served_frontier"] == 12  # refusals moved nothing
    assert 'route="/v1/batches"' in httpx.get(f"{url}/metrics").text


def test_state_dir_refuses_a_damaged_frontier_or_log_and_drops_a_torn_last_entry(tmp_path, two_datasets):
    from pipeline.dataset import TokenDataset

    datasets = {name: TokenDataset(path) for name, path in two_datasets.items()}
    config, weights = MixerConfig(seq_len=16, global_batch=8, seed=5), {"old": 1, "new": 0}
    service = MixService(datasets, config, tmp_path / "state", weights)
    service.change_mix({"old": 0, "new": 1}, 10)
    service.close()
    log = tmp_path / "state" / LOG_FILE
    log.write_bytes(log.read_bytes() + b'{"seq": 2, "op": "sta')  # a crash in the middle of an append
    service = MixService(datasets, config, tmp_path / "state")
    assert [s.start_step for s in service.state.schedule.stages] == [0, 10] and log.read_bytes().endswith(b"}\n")
    service.change_mix({"old": 1, "new": 1})  # and the next append starts on a clean line
    service.close()  # one owner at a time, in one process too
    assert len(MixService(datasets, config, tmp_path / "state").state.log.entries) == 3
    intact = log.read_bytes()
    log.write_bytes(intact.replace(b'"op": "stage"', b'"op": "stage?"', 1))
    with pytest.raises(StateError, match=r"mix_log.jsonl:1: expected an object with op"):
        MixService(datasets, config, tmp_path / "state")
    log.write_bytes(intact)
    (tmp_path / "state" / FRONTIER_FILE).write_text('{"reserved": 3, "served": 9}')
    with pytest.raises(StateError, match=r"frontier.json: expected .*0 <= F <= R"):
        MixService(datasets, config, tmp_path / "state")
    with pytest.raises(StateError, match="reserve_steps"):
        MixService(datasets, config, tmp_path / "other", weights, reserve_steps=0)
    with pytest.raises(StateError, match="give the initial mix"):
        MixService(datasets, config, tmp_path / "third")


def test_https_with_a_key_and_certificate(tmp_path, two_datasets):
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    args = service_args(two_datasets, tmp_path / "state", None, "old=1,new=1")
    # Started without waiting: /healthz answers over HTTPS only, so the wait is for an HTTPS batch instead.
    proc = ServiceProcess([*args, f"--ssl-keyfile={key}", f"--ssl-certfile={cert}"]).start(wait=False)
    try:
        with httpx.Client(verify=str(cert), headers=reader.headers, timeout=5) as https:
            deadline = time.monotonic() + 60
            while True:
                try:
                    response = https.get(f"https://127.0.0.1:{proc.port}/v1/batches/0")
                    break
                except httpx.TransportError:
                    assert proc.proc.poll() is None and time.monotonic() < deadline, "the HTTPS service did not come up"
                    time.sleep(0.2)
            assert response.status_code == 200 and decode_batch(response.content).tokens.shape == (8, 17)
    finally:
        proc.stop()
    assert refused_start([*args, f"--ssl-keyfile={key}"]).returncode == 2
