"""Replay that steers itself: the control laws, and a controller in a real service fed real HTTP feedback."""

from __future__ import annotations

import httpx
import pytest

from service.client import StreamClient
from service.control_laws import ExcessLossWeights, Feedback, ForgettingBudget
from tests.test_service import READ_TOKEN, TOKEN, ServiceProcess, free_port, reader, service_args


def old_loss_sequence() -> list[float]:
    """The old set's loss: flat, then rising well past a 2% budget, then falling back below it."""
    return [2.0, 2.0, 2.02, 2.08, 2.12, 2.12, 2.1, 2.05, 2.0, 1.98, 1.97, 1.97, 1.97, 1.97, 1.97, 1.97]


def test_forgetting_budget_raises_replay_over_budget_lowers_it_with_slack_and_stays_in_bounds():
    law = ForgettingBudget(old="old", budget=0.02, min_share=0.05, max_share=0.3, kp=0.05, ki=0.05)
    weights, shares = {"old": 0.1, "new": 0.9}, []
    for step, loss in enumerate(old_loss_sequence()):
        decision = law.observe(Feedback(step * 10, {"old": loss, "new": 3.0}), weights)
        if decision is not None:
            assert abs(sum(decision.weights.values()) - 1) < 1e-9 and "budget" in decision.reason
            weights = decision.weights
        shares.append(weights["old"])
    assert max(shares[:6]) > 0.1  # forgetting past the budget raised the share
    assert shares[-1] < max(shares)  # slack afterwards lowered it again
    assert all(0.05 <= s <= 0.3 for s in shares) and 0.3 in shares  # clamped, and it did reach the bound
    # the same observations give the same decisions: a law is a pure fold
    again = ForgettingBudget(old="old", budget=0.02, min_share=0.05, max_share=0.3, kp=0.05, ki=0.05)
    replayed = {"old": 0.1, "new": 0.9}
    for step, loss in enumerate(old_loss_sequence()):
        decision = again.observe(Feedback(step * 10, {"old": loss, "new": 3.0}), replayed)
        replayed = decision.weights if decision else replayed
    assert replayed == weights


def test_excess_loss_weights_move_towards_the_source_whose_loss_rose():
    law = ExcessLossWeights(step_size=2.0, smoothing=0.1)
    weights = {"a": 0.5, "b": 0.5}
    assert law.observe(Feedback(0, {"a": 2.0, "b": 2.0}), weights) is None  # the reference
    decision = law.observe(Feedback(10, {"a": 2.4, "b": 2.0}), weights)
    assert decision.weights["a"] > 0.5 > decision.weights["b"] and "excess loss" in decision.reason


@pytest.fixture
def datasets(english_lines, english_model, token_dataset_factory) -> dict:
    return {"old": token_dataset_factory("old", english_lines[:80], english_model).root,
            "new": token_dataset_factory("new", english_lines[80:200], english_model).root}


def controlled_service(tmp_path, datasets, state_name: str) -> ServiceProcess:
    (tmp_path / "admin-token").write_text(TOKEN)
    args = service_args(datasets, tmp_path / state_name, tmp_path / "admin-token", "old=0.1,new=0.9", reserve_steps=1)
    args += ["--controller", "forgetting-budget", "--old", "old", "--budget", "0.02", "--min-share", "0.05",
             "--max-share", "0.4"]
    return ServiceProcess(args, free_port()).start()


def run_with_feedback(service: ServiceProcess, kill_at: int | None = None) -> list[dict]:
    """Read steps as a trainer does and report the old loss every 10 steps; kill -9 and restart once."""
    client = StreamClient(service.url, token=READ_TOKEN, prefetch=1, range_steps=1)
    try:
        for index, loss in enumerate(old_loss_sequence()):
            for step in range(index * 10, index * 10 + 10):
                assert client.fetch(step).step == step
            if index == kill_at:
                service.kill9()
                service.start()
            client.send_feedback(index * 10 + 9, {"old": loss, "new": 3.0})
    finally:
        client.close()
    return reader.get(f"{service.url}/v1/mix").json()["schedule"]


def test_a_controlled_run_killed_midway_makes_the_same_schedule_as_an_uninterrupted_one(tmp_path, datasets):
    uninterrupted = controlled_service(tmp_path, datasets, "state-a")
    try:
        schedule = run_with_feedback(uninterrupted)
        status = reader.get(f"{uninterrupted.url}/v1/status").json()
        state = reader.get(f"{uninterrupted.url}/v1/controller").json()
    finally:
        uninterrupted.stop()
    killed = controlled_service(tmp_path, datasets, "state-b")
    try:
        assert run_with_feedback(killed, kill_at=5) == schedule
    finally:
        killed.stop()
    assert status["feedback"] == {"wanted": True, "controller": "forgetting-budget", "enabled": True}
    shares = [stage["weights"]["old"] for stage in schedule]
    assert len(schedule) > 2 and max(shares) > 0.1 and all(0.05 <= s <= 0.4 for s in shares[1:])
    assert len(state["observations"]) == len(old_loss_sequence()) and len(state["decisions"]) == len(schedule) - 1
    assert all("budget" in d["reason"] and d["by"] == "controller forgetting-budget" for d in state["decisions"])


def test_an_operator_suspends_the_controller_and_bad_feedback_changes_nothing(tmp_path, datasets):
    service = controlled_service(tmp_path, datasets, "state")
    url, admin = service.url, {"Authorization": f"Bearer {TOKEN}"}
    try:
        client = StreamClient(url, token=READ_TOKEN, range_steps=1)
        for step in range(20):
            client.fetch(step)
        assert client.send_feedback(5, {"old": 2.0, "new": 3.0})["stage"] is None  # the reference
        before = reader.get(f"{url}/v1/controller").json()
        bad = [
            ({"step": 9, "losses": {"fr": 2.0}}, 422),  # an unknown set
            ({"step": 500, "losses": {"old": 2.0}}, 422),  # a step not served yet
            ({"step": 3, "losses": {"old": 2.0}}, 409),  # older than the latest
            ({"step": 5, "losses": {"old": 2.0}}, 409),  # the same step again (a flood from one rank)
            ({"step": 9, "losses": {"old": -1.0}}, 422),
            ({"step": 9, "losses": {}}, 422),
        ]
        for body, status in bad:
            response = reader.post(f"{url}/v1/feedback", json=body)
            assert response.status_code == status, (body, response.text)
        nan = reader.post(f"{url}/v1/feedback", content=b'{"step": 9, "losses": {"old": NaN}}',
                          headers={"Content-Type": "application/json"})
        assert nan.status_code == 422
        assert httpx.post(f"{url}/v1/feedback", json={"step": 9, "losses": {"old": 2.0}}).status_code == 401
        assert reader.get(f"{url}/v1/controller").json() == before
        # forgetting past the budget: the controller raises replay ...
        decided = client.send_feedback(9, {"old": 2.2, "new": 3.0})["stage"]
        assert decided["weights"]["old"] > 0.1 and decided["start_step"] == 20
        # ... until an operator changes the mix: then a human has the last word
        assert httpx.put(f"{url}/v1/mix", json={"weights": {"old": 0.5, "new": 0.5}}, headers=admin).status_code == 200
        assert reader.get(f"{url}/v1/controller").json()["enabled"] is False
        assert client.send_feedback(15, {"old": 2.4, "new": 3.0})["stage"] is None
        resumed = httpx.put(f"{url}/v1/controller", json={"enabled": True}, headers=admin)
        assert resumed.status_code == 200 and resumed.json()["enabled"] is True
        assert client.send_feedback(19, {"old": 2.4, "new": 3.0})["stage"] is not None
        metrics = httpx.get(f"{url}/metrics").text
        assert 'replaymix_controller{quantity="forgetting"}' in metrics and 'quantity="target"} 0.02' in metrics
        client.close()
    finally:
        service.stop()


def test_a_streaming_trainer_reports_each_evaluation_to_the_controller(tmp_path, english_lines, german_lines,
                                                                        english_model, token_dataset_factory):
    from tests.test_trainer import SMALL
    from trainer.train import train
    from trainer.train_config import parse_args

    datasets = {"en": token_dataset_factory("en", english_lines[:600], english_model, english_lines[1900:]).root,
                "de": token_dataset_factory("de", german_lines[:600], english_model, german_lines[1900:]).root}
    args = service_args(datasets, tmp_path / "state", None, "en=0.1,de=0.9", seq_len=32, global_batch=8)
    service = ServiceProcess(args + ["--controller", "forgetting-budget", "--old", "en", "--budget", "0.02"],
                             free_port()).start()
    try:
        train(parse_args(SMALL + ["--stream", service.url, "--stream-token-file", str(tmp_path / "state.read-token"),
                                  "--steps", "6", "--eval-every", "2", "--max-lr", "2e-3", "--out", str(tmp_path / "run")]))
        observations = reader.get(f"{service.url}/v1/controller").json()["observations"]
    finally:
        service.stop()
    assert [o["data"]["step"] for o in observations] == [0, 2, 4, 6]  # the first evaluation is the reference
    assert all(set(o["data"]["losses"]) == {"en", "de"} and o["by"].startswith("trainer") for o in observations)
