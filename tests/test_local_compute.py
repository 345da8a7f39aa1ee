"""compute="local": rows computed in the client under leases are byte for byte what the service sends,
across mix changes and ranks; a change lands past every lease; a client that cannot renew stops at its
bound; a node that sees other data, or has no token, is refused."""

from __future__ import annotations

import shutil

import httpx
import numpy as np
import pytest

from service.client import StreamClient, StreamError
from service.local_compute import LocalComputeError
from tests.test_service import READ_TOKEN, TOKEN, ServiceProcess, free_port, put_mix, service_args


@pytest.fixture
def datasets(english_lines, german_lines, english_model, token_dataset_factory):
    old = token_dataset_factory("old", english_lines[:120], english_model)
    new = token_dataset_factory("new", german_lines[:200], english_model)
    return {"old": old.root, "new": new.root}


@pytest.fixture
def service(tmp_path, datasets):
    token_file = tmp_path / "admin-token"
    token_file.write_text(TOKEN + "\n")
    proc = ServiceProcess(service_args(datasets, tmp_path / "state", token_file, "old=0.25,new=0.75",
                                       global_batch=8, reserve_steps=4), free_port())
    yield proc.start()
    proc.stop()


def status(url: str) -> dict:
    return httpx.get(f"{url}/v1/status", headers={"Authorization": f"Bearer {READ_TOKEN}"}).json()


def test_local_rows_equal_served_rows_across_mix_changes_and_ranks(service):
    world = 4
    local = [StreamClient(service.url, token=READ_TOKEN, rank=r, world_size=world, compute="local", lease_steps=8)
             for r in range(world)]
    served = [StreamClient(service.url, token=READ_TOKEN, rank=r, world_size=world) for r in range(world)]
    computed: dict[tuple[int, int], np.ndarray] = {}
    changes = [{"old": 0.05, "new": 0.95}, {"old": 0.5, "new": 0.5}, {"old": 0.0, "new": 1.0}]
    step = 0
    for change in [*changes, None]:
        for _ in range(13):  # local ranks run ahead of the served ones, as fast nodes would
            for rank, client in enumerate(local):
                batch = client.fetch(step)
                computed[step, rank] = batch.tokens
                sources = batch.sources
                assert (batch.step, batch.rank, batch.world_size) == (step, rank, world)
                assert sources.shape == (8 // world,)
            step += 1
        if change is not None:
            leased = max(client._local.until for client in local)
            stage = put_mix(service.url, {"weights": change}).json()["stage"]
            # The change lands at the first step no lease covers: nothing computed so far can differ.
            assert stage["start_step"] >= leased >= step
    for (s, rank), tokens in computed.items():
        np.testing.assert_array_equal(tokens, served[rank].fetch(s).tokens, err_msg=f"step {s} rank {rank}")
    # The ranks' rows tile the global batch: no row computed twice, none missing.
    mixer = local[0]._local.mixer
    for s in range(step):
        full = mixer.batch(s, 0, 1).tokens
        np.testing.assert_array_equal(np.concatenate([computed[s, r] for r in range(world)]), full)
    assert len(status(service.url)["schedule"]) == 1 + len(changes)
    for client in local + served:
        client.close()


def test_a_client_that_cannot_renew_stops_at_its_lease(service):
    client = StreamClient(service.url, token=READ_TOKEN, compute="local", lease_steps=6, retry_for=1.0, prefetch=1, stop_step=50,
                          range_steps=1)
    steps = [next(client).step]  # the first lease, taken while the service is up
    service.kill9()
    with pytest.raises(LocalComputeError, match="could not be renewed"):
        for batch in client:
            steps.append(batch.step)
    # It computed every leased step, early renewals failing quietly, and not one step more.
    assert steps == list(range(client._local.until)) and client._local.until == 1 + 6
    client.close()


def test_a_node_that_sees_other_data_or_has_no_token_is_refused(tmp_path, service, datasets, english_lines,
                                                                  english_model, token_dataset_factory):
    # Anonymous callers are not told where the datasets are.
    with pytest.raises((StreamError, LocalComputeError)):
        StreamClient(service.url, compute="local")
    # The path the service reports now holds other data (another copy on this node's storage).
    other = token_dataset_factory("other", english_lines[500:600], english_model)
    shutil.rmtree(datasets["old"])
    shutil.copytree(other.root, datasets["old"])
    with pytest.raises(LocalComputeError, match="is not the one the service serves from"):
        StreamClient(service.url, token=READ_TOKEN, compute="local")
