"""The learning-rate schedules against their formulas at the key points, each a step that a run trains
(a run of total_steps trains steps 0 .. total_steps - 1)."""

import math

import pytest

from trainer.train_config import parse_args
from trainer.lr_schedules import (
    CosineSchedule,
    InfiniteSchedule,
    RunSchedule,
    ScheduleConfig,
    WSDSchedule,
    build_schedule,
    continue_schedule,
)


def schedule_from_flags(*flags: str):
    """The schedule a fresh run given these flags trains with, built the way the trainer builds it."""
    config = parse_args(["--dataset=en=unused", "--out=unused", *flags])
    return build_schedule(config.schedule, config.steps)


def anneal(const_lr: float, min_lr: float, steps_in: int, anneal_steps: int) -> float:
    """The infinite schedule's exponential anneal, `steps_in` steps after it started."""
    return const_lr * (min_lr / const_lr) ** (steps_in / anneal_steps)


def test_cosine_warms_up_linearly_then_decays_to_min():
    s = CosineSchedule(max_lr=1e-3, min_lr=1e-4, warmup_steps=10, total_steps=110)
    assert s(0) == pytest.approx(1e-4)  # (0 + 1) / 10 of max
    assert s(4) == pytest.approx(5e-4)
    assert s(9) == pytest.approx(1e-3)
    assert s(10) == pytest.approx(1e-3)
    assert s(60) == pytest.approx(1e-4 + 0.5 * 9e-4)  # half way through the decay: the mean
    assert s(35) == pytest.approx(1e-4 + 0.5 * 9e-4 * (1 + math.cos(math.pi * 0.25)))
    assert s(109) == pytest.approx(1e-4 + 0.5 * 9e-4 * (1 + math.cos(math.pi * 99 / 100)))  # the last trained step
    assert s(500) == pytest.approx(1e-4)  # past the end (a resumed run given more --steps) it holds min_lr


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
    assert s(160) == pytest.approx(1.65e-4)  # the anneal's first step
    assert s(170) == pytest.approx(1.65e-4 * math.exp(-k * 10))
    assert s(199) == pytest.approx(1.65e-4 * math.exp(-k * 39))  # the last trained step


def test_infinite_inverse_sqrt_cooldown_meets_its_ends():
    s = InfiniteSchedule(3e-4, 1.65e-4, 3e-5, 0, 50, 10, 100, cooldown_shape="inv_sqrt")
    assert s(0) == pytest.approx(3e-4)
    assert 1.65e-4 < s(25) < 3e-4
    assert s(50) == pytest.approx(1.65e-4)


def test_default_phases_follow_the_paper_fractions():
    """Flags as the CLI parses them, phase lengths left to their defaults: fractions of --steps."""
    s = schedule_from_flags("--lr-schedule", "infinite", "--steps", "1000")
    assert (s.warmup_steps, s.warmup_steps + s.cooldown_steps, s.anneal_start) == (10, 600, 850)
    assert s.const_lr == pytest.approx(1.65e-4)  # (max + min) / 2 of the default 3e-4 and 3e-5
    assert s(0) == pytest.approx(3e-5) and s(9) == pytest.approx(3e-4)  # warmup: 1%
    assert s(599) > s(600) == pytest.approx(1.65e-4) == s(849) == s(850)  # cooldown to 60%, constant to 85%
    assert s(999) == pytest.approx(anneal(1.65e-4, 3e-5, 149, 150))  # the anneal: the last 15%

    cosine = schedule_from_flags("--steps", "200")  # the default schedule
    assert cosine.warmup_steps == 2 and cosine(1) == pytest.approx(3e-4)
    assert cosine(199) == pytest.approx(3e-5 + 0.5 * 2.7e-4 * (1 + math.cos(math.pi * 197 / 198)))

    wsd = schedule_from_flags("--lr-schedule", "wsd", "--steps", "200")
    assert wsd.warmup_steps == 2 and wsd(159) == wsd(160) == pytest.approx(3e-4)  # stable to 80%
    assert wsd(199) == pytest.approx(3e-5 + 2.7e-4 * (1 - math.sqrt(39 / 40)))


def test_continued_infinite_schedule_does_not_rewarm():
    """Issue 11: phase 1 (--steps 1000, default phases) checkpoints at 850, before its anneal; a 2000-step
    continuation starts at the constant rate, stays there, and anneals over the recorded 150 steps at its
    own end. Rebuilding the phases from the new run's length put step 850 back in the cooldown (1.92e-4)."""
    phase1 = RunSchedule(schedule_from_flags("--lr-schedule", "infinite", "--steps", "1000"))
    recorded = RunSchedule.from_record(phase1.record())  # what the checkpoint holds
    assert recorded == phase1
    s = continue_schedule(recorded, at_step=850, steps=2000, decay_steps=None)
    lrs = [s(step) for step in range(2000)]
    assert lrs[0] == pytest.approx(1.65e-4) and max(lrs) == pytest.approx(1.65e-4)
    assert lrs[1849] == lrs[1850] == pytest.approx(1.65e-4) and lrs[1851] < lrs[1850]  # the anneal's first step
    assert lrs[1999] == pytest.approx(anneal(1.65e-4, 3e-5, 149, 150))
    # A continuation of a continuation picks up where the first one checkpointed.
    again = continue_schedule(RunSchedule.from_record(s.record()), at_step=1000, steps=500, decay_steps=50)
    assert again(0) == s(1000) == pytest.approx(1.65e-4) and again(499) == pytest.approx(anneal(1.65e-4, 3e-5, 49, 50))


def test_continuation_refuses_what_it_cannot_continue():
    infinite = RunSchedule(InfiniteSchedule(3e-4, 1.65e-4, 3e-5, warmup_steps=10, cooldown_steps=50,
                                            anneal_steps=40, total_steps=200))
    with pytest.raises(ValueError, match=r"saved at step 170 .* starts at step 160; .*--save-at 160"):
        continue_schedule(infinite, at_step=170, steps=100, decay_steps=None)
    with pytest.raises(ValueError, match="final decay of 40 steps does not fit in this run's --steps 30"):
        continue_schedule(infinite, at_step=160, steps=30, decay_steps=None)
    with pytest.raises(ValueError, match=r"\(cosine\) has no constant phase"):
        continue_schedule(RunSchedule(CosineSchedule(3e-4, 3e-5, 10, 200)), at_step=100, steps=100, decay_steps=None)


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
    assert s(299) == pytest.approx(1e-3 * (1 - math.sqrt(0.99)))  # the last trained step


def test_unknown_schedule_is_named():
    with pytest.raises(ValueError, match="--lr-schedule 'linear'"):
        build_schedule(ScheduleConfig("linear"), steps=10)
