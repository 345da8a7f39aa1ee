"""The learning-rate schedules against their formulas at the key points."""

import math

import pytest

from trainer.schedules import CosineSchedule, InfiniteSchedule, ScheduleConfig, WSDSchedule, build_schedule


def test_cosine_warms_up_linearly_then_decays_to_min():
    s = CosineSchedule(max_lr=1e-3, min_lr=1e-4, warmup_steps=10, total_steps=110)
    assert s(0) == pytest.approx(1e-4)  # (0 + 1) / 10 of max
    assert s(4) == pytest.approx(5e-4)
    assert s(9) == pytest.approx(1e-3)
    assert s(10) == pytest.approx(1e-3)
    assert s(60) == pytest.approx(1e-4 + 0.5 * 9e-4)  # half way through the decay: the mean
    assert s(35) == pytest.approx(1e-4 + 0.5 * 9e-4 * (1 + math.cos(math.pi * 0.25)))
    assert s(110) == pytest.approx(1e-4)
    assert s(500) == pytest.approx(1e-4)  # past the end it holds min_lr


def test_continued_cosine_run_rewarms_to_its_own_max():
    first = build_schedule(ScheduleConfig("cosine", max_lr=1e-3, min_lr=1e-4, warmup_steps=5), steps=100)
    second = build_schedule(ScheduleConfig("cosine", max_lr=5e-4, min_lr=5e-5, warmup_steps=5), steps=100)
    assert first(99) == pytest.approx(1e-4, rel=1e-2)
    assert second(0) == pytest.approx(1e-4)  # warming up again from near zero
    assert second(4) == pytest.approx(5e-4)
    assert second(99) == pytest.approx(5e-5, rel=1e-2)


def test_infinite_schedule_phases():
    s = InfiniteSchedule(max_lr=3e-4, const_lr=1.65e-4, min_lr=3e-5, warmup_steps=10,
                         cooldown_steps=50, anneal_steps=40, total_steps=200)
    assert s(9) == pytest.approx(3e-4)
    assert s(10) == pytest.approx(3e-4)  # cooldown starts at max
    assert s(35) == pytest.approx(1.65e-4 + 0.5 * (3e-4 - 1.65e-4) * (1 + math.cos(math.pi * 25 / 50)))
    assert s(60) == pytest.approx(1.65e-4)  # constant from the end of the cooldown ...
    assert s(159) == pytest.approx(1.65e-4)  # ... to the anneal
    k = math.log(1.65e-4 / 3e-5) / 40
    assert s(170) == pytest.approx(1.65e-4 * math.exp(-k * 10))
    assert s(200) == pytest.approx(3e-5)


def test_infinite_inverse_sqrt_cooldown_meets_its_ends():
    s = InfiniteSchedule(3e-4, 1.65e-4, 3e-5, 0, 50, 10, 100, cooldown_shape="inv_sqrt")
    assert s(0) == pytest.approx(3e-4)
    assert 1.65e-4 < s(25) < 3e-4
    assert s(50) == pytest.approx(1.65e-4)


def test_infinite_defaults_follow_the_paper_fractions():
    s = build_schedule(ScheduleConfig("infinite", max_lr=3e-4, min_lr=3e-5), steps=1000)
    assert (s.warmup_steps, s.warmup_steps + s.cooldown_steps, s.anneal_start) == (10, 600, 850)
    assert s.const_lr == pytest.approx(1.65e-4)


def test_infinite_continued_with_offset_does_not_rewarm():
    """A run continued from the pre-anneal checkpoint at step 850 of the first run's schedule starts at the
    constant rate; its own anneal takes the last 100 of its 400 steps."""
    config = ScheduleConfig("infinite", max_lr=3e-4, min_lr=3e-5, warmup_steps=10, cooldown_steps=590,
                            decay_steps=100, start_step=850)
    s = build_schedule(config, steps=400)
    lrs = [s(850 + step) for step in range(400)]
    assert lrs[0] == pytest.approx(1.65e-4)
    assert max(lrs) == pytest.approx(1.65e-4)
    assert lrs[299] == pytest.approx(1.65e-4)
    assert s(850 + 400) == pytest.approx(3e-5)


def test_infinite_rejects_overlapping_phases():
    with pytest.raises(ValueError, match="overlap"):
        InfiniteSchedule(3e-4, 1e-4, 3e-5, warmup_steps=10, cooldown_steps=90, anneal_steps=20, total_steps=100)


def test_wsd_one_minus_sqrt_cooldown():
    s = WSDSchedule(max_lr=1e-3, min_lr=0.0, warmup_steps=10, decay_steps=100, total_steps=300)
    assert s(9) == pytest.approx(1e-3)
    assert s(150) == pytest.approx(1e-3)
    assert s(200) == pytest.approx(1e-3)  # decay starts here
    assert s(225) == pytest.approx(1e-3 * (1 - math.sqrt(0.25)))
    assert s(264) == pytest.approx(1e-3 * (1 - math.sqrt(0.64)))
    assert s(300) == pytest.approx(0.0)


def test_unknown_schedule_is_named():
    with pytest.raises(ValueError, match="--lr-schedule 'linear'"):
        build_schedule(ScheduleConfig("linear"), steps=10)
