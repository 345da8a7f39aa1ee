"""StreamClient and StreamDataset against a real service: order, equality with the mixer, retries."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from pipeline.dataset import TokenDataset
from service.client import StreamClient, StreamDataset, StreamError
from service.mixer import Mixer, MixerConfig
from service.mix_schedule import MixSchedule
from tests.test_service import READ_TOKEN, ServiceProcess, free_port, service_args


@pytest.fixture
def datasets(english_lines, english_model, token_dataset_factory):
    old = token_dataset_factory("old", english_lines[:80], english_model)
    new = token_dataset_factory("new", english_lines[80:200], english_model)
    return {"old": old.root, "new": new.root}


@pytest.fixture
def service(tmp_path, datasets):
    proc = ServiceProcess(service_args(datasets, tmp_path / "state", None, "old=0.25,new=0.75"), free_port())
    yield proc.start()
    proc.stop()


def in_process_mixer(datasets) -> Mixer:
    opened = {name: TokenDataset(path) for name, path in datasets.items()}
    return Mixer(opened, MixerConfig(seq_len=16, global_batch=8, seed=5), MixSchedule.constant({"old": 0.25, "new": 0.75}))


def test_client_yields_the_mixers_batches_in_order(service, datasets):
    mixer = in_process_mixer(datasets)
    # 9 steps, 4 per request: ranges of 4, 4 and 1
    with StreamClient(service.url, token=READ_TOKEN, rank=1, world_size=2, start_step=3, prefetch=2, stop_step=12, range_steps=4) as client:
        assert client.info["seq_len"] == 16 and client.info["vocab_size"] == mixer.vocab_size
        assert {name: d["path"] for name, d in client.info["datasets"].items()} == {
            name: str(p.resolve()) for name, p in datasets.items()}
        batches = list(client)
        np.testing.assert_array_equal(client.fetch_range(20, 2)[1].tokens, client.fetch(21).tokens)
    assert [b.step for b in batches] == list(range(3, 12))
    for b in batches:
        assert b.tokens.dtype == np.int64 and b.sources.dtype == np.uint8 and b.tokens.shape == (4, 17)
        expected = mixer.batch(b.step, 1, 2)
        np.testing.assert_array_equal(b.tokens, expected.tokens)
        np.testing.assert_array_equal(b.sources, expected.sources)


def test_client_retries_through_a_server_restart(service):
    # one step per request and little read-ahead, so that steps 8.. are requested while the service is down
    client = StreamClient(service.url, token=READ_TOKEN, prefetch=1, retry_for=60, range_steps=1)
    first = [next(client) for _ in range(3)]
    service.kill9()
    # restart after a while, on the same port and state dir, while the client is retrying
    restarter = threading.Timer(1.0, service.start)
    restarter.start()
    later = [next(client) for _ in range(10)]
    restarter.join()
    client.close()
    assert [b.step for b in first + later] == list(range(13))
    with StreamClient(service.url, token=READ_TOKEN, start_step=0, stop_step=13) as again:
        assert all(np.array_equal(a.tokens, b.tokens) for a, b in zip(again, first + later))


def test_client_errors_are_actionable(service):
    with pytest.raises(StreamError, match="HTTP 422.*does not divide global_batch"):
        StreamClient(service.url, token=READ_TOKEN, world_size=3).fetch(0)
    with pytest.raises(StreamError, match="HTTP 401.*read token"):
        StreamClient(service.url)
    with pytest.raises(StreamError, match="failed for"):  # gives up instead of hanging
        StreamClient(f"http://127.0.0.1:{free_port()}", retry_for=0.5)


def test_dataloader_with_workers_keeps_step_order(service, datasets):
    mixer = in_process_mixer(datasets)
    loader = torch.utils.data.DataLoader(StreamDataset(service.url, stop_step=6, token=READ_TOKEN), batch_size=None,
                                         num_workers=2)
    got = list(loader)
    assert [item["step"] for item in got] == list(range(6))
    assert all(np.array_equal(item["tokens"].numpy(), mixer.batch(item["step"]).tokens) for item in got)


class OwnDataset(torch.utils.data.IterableDataset):
    """What a user might write first: a StreamClient in a dataset of their own."""

    def __init__(self, url: str):
        self.url = url

    def __iter__(self):
        with StreamClient(self.url, stop_step=4, token=READ_TOKEN) as client:
            yield from (batch.tokens for batch in client)


def test_a_client_in_a_dataset_of_ones_own_cannot_yield_every_step_twice(service):
    loader = torch.utils.data.DataLoader(OwnDataset(service.url), batch_size=None, num_workers=2)
    with pytest.raises(StreamError, match="Use service.client.StreamDataset"):
        list(loader)
