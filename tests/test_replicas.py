"""Read replicas (issue 27): real `python -m service --replica-of` processes beside a real owner. Every
replica serves the owner's bytes; a change made through one replica is served by the other from the same
step; a client given two replica URLs goes on at the other when one is killed, at the step it was at; a
replica whose datasets are not the owner's is refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from service.client import StreamClient
from service.launcher import ServiceProcess
from service.wire import decode_batch
from tests.test_service import READ_TOKEN, get_batch, put_mix, reader, refused_in_process, service_args


@pytest.fixture
def two_datasets(english_lines, english_model, token_dataset_factory) -> dict[str, Path]:
    return {"old": token_dataset_factory("old", english_lines[:80], english_model).root,
            "new": token_dataset_factory("new", english_lines[80:200], english_model).root}


@pytest.fixture
def owner_and_replicas(tmp_path, two_datasets):
    admin = tmp_path / "admin-token"
    admin.write_text("replica-admin-token\n")
    owner = ServiceProcess(service_args(two_datasets, tmp_path / "state", admin, "old=0.25,new=0.75")).start()
    read_token = tmp_path / "state.read-token"  # written by service_args
    replica_flags = [f"--replica-of={owner.url}", f"--read-token-file={read_token}", f"--admin-token-file={admin}",
                     "--lease-steps=16"]
    replicas = [ServiceProcess(replica_flags).start() for _ in range(2)]
    yield owner, replicas, "replica-admin-token"
    for process in (*replicas, owner):
        process.stop()


def test_a_change_through_one_replica_is_served_by_the_other_from_the_same_step(owner_and_replicas):
    owner, (a, b), admin = owner_and_replicas
    assert [get_batch(a.url, step, 1, 2) for step in range(5)] == [get_batch(b.url, step, 1, 2) for step in range(5)]
    change = put_mix(a.url, {"weights": {"old": 1, "new": 0}, "reason": "more replay"}, token=admin)
    assert change.status_code == 200, change.text
    start = change.json()["stage"]["start_step"]
    assert start >= 5  # past every step leased to any replica
    steps = range(start - 2, start + 3)
    from_a = {step: get_batch(a.url, step) for step in steps}
    assert {step: get_batch(b.url, step) for step in steps} == from_a == {step: get_batch(owner.url, step) for step in steps}
    old = sorted(["old", "new"]).index("old")  # sources index the datasets in their canonical (name) order
    for step in steps:
        sources = decode_batch(from_a[step]).sources
        assert (np.all(sources == old)) == (step >= start)
    assert reader.get(f"{b.url}/v1/mix").json()["log"][-1]["reason"] == "more replay"
    assert put_mix(b.url, {"weights": {"old": 1, "new": 1}}, token="wrong").status_code == 403


def test_a_client_with_two_replica_urls_goes_on_when_one_dies(owner_and_replicas):
    owner, (a, b), _ = owner_and_replicas
    expected = [get_batch(owner.url, step) for step in range(40)]
    with StreamClient([a.url, b.url], token=READ_TOKEN, stop_step=40, range_steps=4, prefetch=2,
                      retry_for=30) as client:
        got = []
        for batch in client:
            got.append(batch)
            if batch.step == 10:
                a.kill9()
        assert client.url == b.url
    assert [batch.step for batch in got] == list(range(40))
    assert [(batch.tokens.tolist(), batch.sources.tolist()) for batch in got] == \
        [(decode_batch(body).tokens.tolist(), decode_batch(body).sources.tolist()) for body in expected]


def test_a_replica_of_other_data_or_without_a_token_is_refused(tmp_path, owner_and_replicas, german_lines,
                                                              english_model, token_dataset_factory, capsys):
    owner, _, _ = owner_and_replicas
    other = token_dataset_factory("other", german_lines[:40], english_model).root
    read_token = tmp_path / "state.read-token"
    result = refused_in_process([f"--replica-of={owner.url}", f"--read-token-file={read_token}",
                                 f"--dataset=new={other}"], capsys)
    assert result.returncode == 2 and "is not the one the service serves from" in result.stderr, result.stderr
    result = refused_in_process([f"--replica-of={owner.url}", "--allow-anonymous-reads"], capsys)
    assert result.returncode == 2 and "needs --read-token-file" in result.stderr
    result = refused_in_process([f"--replica-of={owner.url}", f"--read-token-file={read_token}", "--state-dir=x"],
                                capsys)
    assert result.returncode == 2 and "belong to the owner" in result.stderr
