"""The service as a real uvicorn process: bytes stable across kill -9, mix changes, auth, errors."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from service.wire import MEDIA_TYPE, decode_batch

REPO = Path(__file__).resolve().parents[1]
TOKEN = "s3cret-admin-token-for-tests"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServiceProcess:
    """`python -m service` in a subprocess on a free loopback port."""

    def __init__(self, args: list[str], port: int):
        self.args, self.port = args, port
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None

    def start(self, wait: bool = True) -> "ServiceProcess":
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "service", *self.args, "--port", str(self.port), "--log-level", "warning"],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, limit: float = 60.0) -> None:
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"service exited {self.proc.returncode}: {self.proc.stdout.read().decode()}")
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.1)
        raise RuntimeError("service did not become ready")

    def kill9(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill9()


def service_args(datasets: dict[str, Path], state_dir: Path, token_file: Path | None, weights: str,
                 seq_len: int = 16, global_batch: int = 8) -> list[str]:
    args = [f"--dataset={name}={path}" for name, path in datasets.items()]
    args += [f"--weights={weights}", f"--seq-len={seq_len}", f"--global-batch={global_batch}", "--seed=5",
             f"--state-dir={state_dir}"]
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


def get_batch(url: str, step: int, rank: int = 0, world_size: int = 1) -> bytes:
    response = httpx.get(f"{url}/v1/batches/{step}", params={"rank": rank, "world_size": world_size})
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
    assert put_mix(url, {"weights": {"old": 1}, "start_step": 20}).status_code == 200
    served.update({step: get_batch(url, step) for step in (6, 7, 19, 20, 21)})
    service.kill9()
    service.start()
    for step, body in served.items():
        assert get_batch(url, step) == body, f"step {step} changed across kill -9"
    assert all(get_batch(url, 3, r, 4) == body for r, body in ranks.items())
    mix = httpx.get(f"{url}/v1/mix").json()
    assert [s["start_step"] for s in mix["schedule"]] == [0, 6, 20] and mix["served_frontier"] == 22
    assert set(decode_batch(served[20]).sources.tolist()) == {0}
    # a served step can never be rewritten, also not after the restart
    assert put_mix(url, {"weights": {"old": 0.5, "new": 0.5}, "start_step": 21}).status_code == 409


def test_binary_and_json_bodies_agree_and_ranks_cover_the_batch(service):
    url = service.url
    whole = decode_batch(get_batch(url, 4))
    parts = [decode_batch(get_batch(url, 4, r, 2)) for r in range(2)]
    np.testing.assert_array_equal(np.concatenate([p.tokens for p in parts]), whole.tokens)
    assert whole.tokens.shape == (8, 17) and whole.dataset_names == ("old", "new")
    as_json = httpx.get(f"{url}/v1/batches/4", headers={"Accept": "application/json"}).json()
    assert as_json["tokens"] == whole.tokens.tolist() and as_json["sources"] == whole.sources.tolist()
    status = httpx.get(f"{url}/v1/status").json()
    assert status["served_frontier"] == 5 and status["seq_len"] == 16 and status["global_batch"] == 8
    assert list(status["datasets"]) == ["old", "new"]
    assert sum(d["samples_served"] for d in status["datasets"].values()) == 5 * 8
    assert abs(status["datasets"]["old"]["share_served"] - 0.25) <= 1 / 40
    metrics = httpx.get(f"{url}/metrics").text
    assert 'replaymix_mix_weight{dataset="old"} 0.25' in metrics
    assert 'replaymix_tokens_served_total{dataset="new"}' in metrics
    assert 'route="/v1/batches/{step}"' in metrics


BAD_CHANGES = [
    ({"weights": {"old": -1, "new": 1}}, 422),
    ({"weights": {"old": 0, "new": 0}}, 422),
    ({"weights": {"other": 1}}, 422),
    ({"weights": {"old": "a lot"}}, 422),
    ({"weights": {}}, 422),
    ({"weights": {"old": 1}, "start_step": -3}, 422),
    ({"weights": {"old": 1}, "start_step": 1}, 409),
]


def test_bad_mix_changes_are_refused_and_change_nothing(service):
    get_batch(service.url, 2)
    before = httpx.get(f"{service.url}/v1/mix").json()
    for body, status in BAD_CHANGES:
        response = put_mix(service.url, body)
        assert response.status_code == status, (body, response.text)
        assert response.json()["detail"]
    response = httpx.put(f"{service.url}/v1/mix", content=b'{"weights": {"old": NaN, "new": 1}}',
                         headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
    assert response.status_code == 422 and "weights.old" in response.text
    assert httpx.get(f"{service.url}/v1/mix").json() == before
    # a stage scheduled ahead cannot be undercut, only followed
    assert put_mix(service.url, {"weights": {"old": 1}, "start_step": 50}).status_code == 200
    assert put_mix(service.url, {"weights": {"new": 1}}).status_code == 409
    assert put_mix(service.url, {"weights": {"new": 1}, "start_step": 60}).status_code == 200


def test_mutations_need_the_admin_token(service):
    assert put_mix(service.url, {"weights": {"old": 1}}, token=None).status_code == 401
    assert put_mix(service.url, {"weights": {"old": 1}}, token="wrong-token-0000000").status_code == 403
    assert httpx.get(f"{service.url}/v1/batches/0", params={"world_size": 3}).status_code == 422
    assert httpx.get(f"{service.url}/v1/batches/-1").status_code == 422
    assert httpx.get(f"{service.url}/healthz").json()["ok"] is True


def test_start_is_refused_with_clear_messages(tmp_path, two_datasets, german_lines, token_dataset_factory):
    from tests.conftest import train_spm

    german = train_spm(german_lines, tmp_path / "spm" / "german", vocab_size=200)
    foreign = token_dataset_factory("foreign", german_lines[:40], german).root
    args = service_args({"old": two_datasets["old"], "foreign": foreign}, tmp_path / "s1", None, "old=1")
    result = subprocess.run([sys.executable, "-m", "service", *args], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 2 and "do not share a vocabulary" in result.stderr
    assert not (tmp_path / "s1").exists()
    # a state dir made for other inputs is refused rather than silently changing served steps
    state = tmp_path / "s2"
    ServiceProcess(service_args(two_datasets, state, None, "old=1"), free_port()).start().stop()
    other = service_args(two_datasets, state, None, "old=1", seq_len=32)
    result = subprocess.run([sys.executable, "-m", "service", *other], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 2 and "seq_len" in result.stderr and "identity.json" in result.stderr
