"""The mix schedule: normalisation, validation, append-only rules and an exact JSON round trip."""

import json
import math

import pytest

from service.mix_schedule import WEIGHT_UNITS, MixSchedule, ScheduleError, Stage, check_weight_names, quantize_weights


def test_weights_are_normalised_and_quantised_idempotently():
    stage = Stage(0, {"old": 1, "new": 19})
    assert stage.weights == {"old": 0.05, "new": 0.95}
    thirds = Stage(3, {"a": 1, "b": 1, "c": 1})
    assert sum(thirds.units.values()) == WEIGHT_UNITS
    assert sorted(thirds.units.values()) == [3333, 3333, 3334]
    assert math.fsum(thirds.weights.values()) == pytest.approx(1.0, abs=1e-12)
    # normalising normalised weights changes nothing, bit for bit
    assert Stage(3, thirds.weights) == thirds


@pytest.mark.parametrize(
    "weights, field",
    [
        ({"a": -0.1, "b": 1}, "weights.a"),
        ({"a": float("nan")}, "weights.a"),
        ({"a": float("inf")}, "weights.a"),
        ({"a": 0, "b": 0.0}, "all zero"),
        ({}, "empty"),
        ({"a": "0.5"}, "not a number"),
        ({"a": True}, "not a number"),
    ],
)
def test_bad_weights_are_refused_naming_the_field(weights, field):
    with pytest.raises(ScheduleError, match=field):
        Stage(0, weights)


def test_bad_start_steps_are_refused():
    with pytest.raises(ScheduleError, match="start_step"):
        Stage(-1, {"a": 1})
    with pytest.raises(ScheduleError, match="must start at 0"):
        MixSchedule([Stage(5, {"a": 1})])
    with pytest.raises(ScheduleError, match="must increase"):
        MixSchedule([Stage(0, {"a": 1}), Stage(10, {"a": 1}), Stage(10, {"a": 1})])


def test_stage_at_and_append_only():
    schedule = MixSchedule.constant({"old": 0.5, "new": 0.5})
    schedule = schedule.appended(Stage(100, {"old": 0.05, "new": 0.95}))
    schedule = schedule.appended(Stage(250, {"old": 0.25, "new": 0.75}))
    assert [schedule.stage_at(s).start_step for s in (0, 99, 100, 249, 250, 10**9)] == [0, 0, 100, 100, 250, 250]
    with pytest.raises(ScheduleError, match="append-only"):
        schedule.appended(Stage(200, {"old": 1}))
    # a stage at the last stage's own start step does not silently replace it: cancelling is explicit
    with pytest.raises(ScheduleError, match="append-only"):
        schedule.appended(Stage(250, {"old": 1, "new": 0}))
    replaced = schedule.cancelled(250).appended(Stage(250, {"old": 1, "new": 0}))
    assert len(replaced) == 3 and replaced.stage_at(300).weights == {"new": 0.0, "old": 1.0}
    assert len(schedule) == 3 and schedule.stage_at(300).weights["old"] == 0.25
    with pytest.raises(ScheduleError, match="no stage starts at step 251"):
        schedule.cancelled(251)
    with pytest.raises(ScheduleError, match="first stage"):
        schedule.cancelled(0)


def test_weights_do_not_depend_on_the_order_datasets_are_named_in():
    # 1/3 each cannot be exact: the extra unit goes to the same dataset whatever order they are written in
    forward, backward = Stage(0, {"a": 1, "b": 1, "c": 1}), Stage(0, {"c": 1, "b": 1, "a": 1})
    assert forward.units == backward.units == {"a": 3334, "b": 3333, "c": 3333}
    assert list(backward.weights) == ["a", "b", "c"]


def test_every_dataset_is_named_in_every_weight_set():
    check_weight_names({"en": 1, "de": 0}, ["de", "en"])
    with pytest.raises(ScheduleError, match=r"no weight for \['de'\] \(give 0"):
        check_weight_names({"en": 1}, ["de", "en"])
    with pytest.raises(ScheduleError, match=r"unknown dataset\(s\) \['fr'\]"):
        check_weight_names({"en": 1, "de": 1, "fr": 1}, ["de", "en"])


def test_json_round_trip_is_exact():
    schedule = MixSchedule.constant({"a": 1, "b": 2, "c": 4})
    for i in range(1, 100):
        schedule = schedule.appended(Stage(i * 17, {"a": i, "b": 0.3 * i, "c": 1 / i}))
    data = json.loads(json.dumps(schedule.to_json()))
    again = MixSchedule.from_json(data)
    assert again == schedule
    assert [s.units for s in again.stages] == [s.units for s in schedule.stages]


def test_from_json_names_the_bad_entry():
    with pytest.raises(ScheduleError, match=r"stages\[1\]\.weights\.b"):
        MixSchedule.from_json([{"start_step": 0, "weights": {"a": 1}}, {"start_step": 3, "weights": {"b": -1}}])
    with pytest.raises(ScheduleError, match="list of stages"):
        MixSchedule.from_json({"start_step": 0})


def test_quantize_keeps_tiny_positive_weights_honest():
    units = quantize_weights({"a": 1e-9, "b": 1.0})
    assert units == {"a": 0, "b": WEIGHT_UNITS}
