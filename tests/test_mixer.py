"""The in-process mixer: exact per-prefix shares, rank slices, epochs, random access, vocabularies."""

from pathlib import Path

import numpy as np
import pytest
from sentencepiece import sentencepiece_model_pb2

from service.mixer import Mixer, MixerConfig
from service.mix_schedule import WEIGHT_UNITS, MixSchedule, ScheduleError, Stage
from service.vocabulary import VocabularyError
from tests.conftest import train_spm


@pytest.fixture
def three_datasets(english_lines, english_model, token_dataset_factory):
    return {
        "a": token_dataset_factory("a", english_lines[:40], english_model),
        "b": token_dataset_factory("b", english_lines[40:100], english_model),
        "c": token_dataset_factory("c", english_lines[100:130], english_model),
    }


def sources_of(mixer: Mixer, steps: range) -> np.ndarray:
    return mixer.locate_steps(list(steps))[0].reshape(-1)


def assert_tijdeman_bound(sources: np.ndarray, units: list[int]) -> None:
    """Every prefix of n samples holds c_i of dataset i with |c_i - w_i n| <= 1 - 1/(2(k - 1)), k the
    datasets of positive weight; checked in exact integers (w_i = units_i / WEIGHT_UNITS)."""
    k = sum(1 for u in units if u > 0)
    counts = np.cumsum(np.eye(len(units), dtype=np.int64)[sources], axis=0)  # (n, datasets)
    n = np.arange(1, len(sources) + 1, dtype=np.int64)[:, None]
    deviation = np.abs(counts * WEIGHT_UNITS - np.asarray(units, dtype=np.int64) * n)  # WEIGHT_UNITS x |c - w n|
    if k <= 1:
        assert deviation.max() == 0
        return
    scale = 2 * (k - 1)
    worst = int(deviation.max())
    assert worst * scale <= (scale - 1) * WEIGHT_UNITS, (
        f"a prefix is {worst / WEIGHT_UNITS:.4f} samples off, above the bound {1 - 1 / scale:.4f} for k = {k}")


def dataset_pool(count: int, english_lines, english_model, token_dataset_factory) -> dict:
    return {f"d{i:02d}": token_dataset_factory(f"d{i:02d}", english_lines[i * 10 : i * 10 + 10], english_model)
            for i in range(count)}


# Megatron's greedy rule is 1.05 samples off on a prefix of 3,211 samples with these weights.
GREEDY_COUNTEREXAMPLE = [0.0001, 0.5064, 0.0008, 0.4927]


def test_every_prefix_holds_its_share_within_tijdemans_bound(english_lines, english_model, token_dataset_factory):
    pool = dataset_pool(16, english_lines, english_model, token_dataset_factory)
    rng = np.random.default_rng(0)
    global_batch, samples = 100, 100_000
    for k in range(2, 17):
        names = sorted(pool)[:k]
        trials = [rng.dirichlet(np.full(k, 0.3)), rng.random(k) * (rng.random(k) < 0.8)]
        if k == 4:
            trials.append(np.array(GREEDY_COUNTEREXAMPLE))
        for weights in trials:
            if not weights.any():
                weights[0] = 1.0
            stage = Stage(0, dict(zip(names, weights.tolist())))
            mixer = Mixer({n: pool[n] for n in names}, MixerConfig(seq_len=4, global_batch=global_batch),
                          MixSchedule([stage]))
            sources = sources_of(mixer, range(samples // global_batch))
            assert_tijdeman_bound(sources, [stage.units[n] for n in mixer.names])
            # the global batch is the same whatever the world size: ranks are slices of it
            for world in (2, 4, 5, 10):
                parts = [mixer.locate_steps([7, 999], rank, world)[0] for rank in range(world)]
                np.testing.assert_array_equal(np.concatenate(parts, axis=1).reshape(-1), sources_of(mixer, [7, 999]))


def test_five_percent_replay_is_five_percent_of_every_batch(three_datasets):
    weights = {"a": 0.05, "b": 0.95, "c": 0}
    wide = Mixer(three_datasets, MixerConfig(seq_len=16, global_batch=20), MixSchedule.constant(weights))
    assert all(np.count_nonzero(wide.locate(s)[0] == 0) == 1 for s in range(50))


def test_the_order_datasets_are_given_in_changes_nothing(three_datasets):
    forward = dict(three_datasets)
    backward = dict(reversed(list(three_datasets.items())))
    schedule = MixSchedule.constant({"c": 1, "b": 1, "a": 1}).appended(Stage(5, {"b": 0.5, "a": 0.25, "c": 0.25}))
    one = Mixer(forward, MixerConfig(seq_len=16, global_batch=6, seed=4), schedule)
    reordered = MixSchedule.constant({"a": 1, "b": 1, "c": 1}).appended(Stage(5, {"c": 0.25, "a": 0.25, "b": 0.5}))
    other = Mixer(backward, MixerConfig(seq_len=16, global_batch=6, seed=4), reordered)
    assert one.names == other.names == ("a", "b", "c")
    for a, b in zip(one.batches(range(12), 1, 2), other.batches(range(12), 1, 2)):
        np.testing.assert_array_equal(a.tokens, b.tokens)
        np.testing.assert_array_equal(a.sources, b.sources)


def test_shares_hold_inside_each_stage_and_counts_carry_over(three_datasets):
    schedule = MixSchedule.constant({"a": 0.5, "b": 0.5, "c": 0})
    schedule = schedule.appended(Stage(13, {"a": 0.1, "b": 0.2, "c": 0.7}))
    schedule = schedule.appended(Stage(40, {"a": 0, "b": 0, "c": 1}))
    schedule = schedule.appended(Stage(45, {"a": 0.25, "b": 0.25, "c": 0.5}))
    mixer = Mixer(three_datasets, MixerConfig(seq_len=16, global_batch=6), schedule)
    bounds = [0, 13, 40, 45, 120]
    for stage, lo, hi in zip(schedule.stages, bounds, bounds[1:]):
        sources = sources_of(mixer, range(lo, hi))
        assert_tijdeman_bound(sources, [stage.units[n] for n in mixer.names])
    # the cumulative counts kept at stage starts equal what the steps actually drew
    drawn = np.bincount(sources_of(mixer, range(0, 120)), minlength=3)
    assert list(mixer.samples_before(120).values()) == drawn.tolist()
    # ordinals are 0, 1, 2, ... per dataset across all stages: no sample skipped or repeated
    ordinals = {d: [] for d in range(3)}
    for step in range(120):
        for source, ordinal in zip(*mixer.locate(step)):
            ordinals[int(source)].append(int(ordinal))
    assert all(ordinals[d] == list(range(len(ordinals[d]))) for d in range(3))


def test_appending_a_stage_never_changes_earlier_steps(three_datasets):
    config = MixerConfig(seq_len=16, global_batch=4, seed=3)
    mixer = Mixer(three_datasets, config, MixSchedule.constant({"a": 0.2, "b": 0.8, "c": 0}))
    before = [mixer.batch(step).tokens.copy() for step in range(30)]
    mixer.set_schedule(mixer.schedule.appended(Stage(30, {"a": 0, "b": 0, "c": 1})))
    assert all(np.array_equal(before[s], mixer.batch(s).tokens) for s in range(30))
    assert set(mixer.batch(30).sources.tolist()) == {2}


def test_ranks_get_disjoint_slices_covering_the_global_batch(three_datasets):
    mixer = Mixer(three_datasets, MixerConfig(seq_len=16, global_batch=12, seed=1), MixSchedule.constant({"a": 1, "b": 2, "c": 3}))
    for step in (0, 5, 77):
        whole = mixer.batch(step)
        for world in (1, 2, 3, 4, 6, 12):
            parts = [mixer.batch(step, rank, world) for rank in range(world)]
            assert all(len(p.tokens) == 12 // world for p in parts)
            np.testing.assert_array_equal(np.concatenate([p.tokens for p in parts]), whole.tokens)
            np.testing.assert_array_equal(np.concatenate([p.sources for p in parts]), whole.sources)
    with pytest.raises(ValueError, match="does not divide global_batch 12"):
        mixer.batch(0, 0, 5)
    with pytest.raises(ValueError, match="rank"):
        mixer.batch(0, 4, 4)


def test_epochs_are_permutations_of_all_windows(english_lines, english_model, token_dataset_factory):
    dataset = token_dataset_factory("one", english_lines[:20], english_model)
    seq_len = 16
    mixer = Mixer({"one": dataset}, MixerConfig(seq_len=seq_len, global_batch=5, seed=7), MixSchedule.constant({"one": 1}))
    windows = int(mixer.windows[0])
    assert windows == (dataset.train.num_tokens - 1) // seq_len and windows > 10
    steps = range(0, (3 * windows) // 5 + 1)
    batches = [mixer.batch(step) for step in steps]
    rows = np.concatenate([b.tokens for b in batches])
    stream = dataset.train.read(0, dataset.train.num_tokens)
    all_windows = {tuple(stream[w * seq_len : w * seq_len + seq_len + 1]): w for w in range(windows)}
    order = [all_windows[tuple(row)] for row in rows]
    epochs = [order[e * windows : (e + 1) * windows] for e in range(3)]
    assert all(sorted(epoch) == list(range(windows)) for epoch in epochs)
    assert epochs[0] != epochs[1] and epochs[1] != epochs[2] and epochs[0] != epochs[2]
    assert epochs[0] != list(range(windows))
    assert mixer.epochs(0) == {"one": 0}
    assert mixer.epochs(len(steps)) == {"one": (len(steps) * 5) // windows}
    # another seed gives another order; the same seed the same bytes
    other = Mixer({"one": dataset}, MixerConfig(seq_len=seq_len, global_batch=5, seed=8), mixer.schedule)
    assert not np.array_equal(other.batch(0).tokens, batches[0].tokens)
    np.testing.assert_array_equal(Mixer({"one": dataset}, mixer.config, mixer.schedule).batch(3).tokens, batches[3].tokens)


def test_random_access_far_ahead_and_with_many_stages(three_datasets):
    schedule = MixSchedule.constant({"a": 1, "b": 1, "c": 0})
    for i in range(1, 100):
        schedule = schedule.appended(Stage(i * 100_003, {"a": i % 7 + 1, "b": 0.5, "c": (i % 3) * 0.37}))
    mixer = Mixer(three_datasets, MixerConfig(seq_len=16, global_batch=8), schedule)
    step = 10**7
    batch = mixer.batch(step)
    assert batch.tokens.shape == (8, 17) and batch.tokens.dtype == np.int64
    # counts reported before and after the step differ exactly by what the step drew
    before, after = mixer._counts_before(step), mixer._counts_before(step + 1)
    np.testing.assert_array_equal(after - before, np.bincount(batch.sources, minlength=3))
    assert sum(mixer.samples_before(step).values()) == step * 8
    np.testing.assert_array_equal(Mixer(three_datasets, mixer.config, schedule).batch(step).tokens, batch.tokens)


def extend_model(base: Path, donor: Path, out: Path) -> Path:
    """Append the donor's new pieces to the base, as `pipeline.tokenizer extend` does."""
    model = sentencepiece_model_pb2.ModelProto()
    model.ParseFromString(base.read_bytes())
    donor_model = sentencepiece_model_pb2.ModelProto()
    donor_model.ParseFromString(donor.read_bytes())
    known = {p.piece for p in model.pieces}
    lowest = min(p.score for p in model.pieces)
    for piece in donor_model.pieces:
        if piece.type == 1 and piece.piece not in known:
            model.pieces.add(piece=piece.piece, score=lowest - 1, type=1)
    out.write_bytes(model.SerializeToString())
    return out


def test_prefix_compatible_vocabularies_mix_and_others_are_refused(
    tmp_path, english_lines, german_lines, english_model, token_dataset_factory
):
    german_model = train_spm(german_lines, tmp_path / "spm" / "german", vocab_size=200)
    extended = extend_model(english_model, german_model, tmp_path / "spm" / "extended.model")
    old = token_dataset_factory("old", english_lines[:40], english_model)
    new = token_dataset_factory("new", german_lines[:40], extended)
    assert new.vocab_size > old.vocab_size
    mixer = Mixer({"old": old, "new": new}, MixerConfig(16, 4), MixSchedule.constant({"old": 0.25, "new": 0.75}))
    assert mixer.vocab_size == new.vocab_size
    assert int(mixer.batch(3).tokens.max()) < mixer.vocab_size

    foreign = token_dataset_factory("foreign", german_lines[:40], german_model)
    with pytest.raises(VocabularyError, match=r"'old'.*'foreign'|'foreign'.*'old'") as err:
        Mixer({"old": old, "foreign": foreign}, MixerConfig(16, 4), MixSchedule.constant({"old": 1, "foreign": 0}))
    assert "do not share a vocabulary: id" in str(err.value)


def test_bad_inputs_are_refused_clearly(three_datasets):
    with pytest.raises(ScheduleError, match=r"unknown dataset\(s\) \['z'\]"):
        Mixer(three_datasets, MixerConfig(16, 4), MixSchedule.constant({"a": 1, "b": 1, "c": 1, "z": 1}))
    with pytest.raises(ScheduleError, match=r"no weight for \['b', 'c'\]"):
        Mixer(three_datasets, MixerConfig(16, 4), MixSchedule.constant({"a": 1}))
    with pytest.raises(ValueError, match="fewer than seq_len"):
        Mixer(three_datasets, MixerConfig(100_000, 4), MixSchedule.constant({"a": 1, "b": 0, "c": 0}))
    with pytest.raises(ValueError, match="global_batch"):
        MixerConfig(seq_len=16, global_batch=0)


def test_permutation_keeps_its_values_on_both_paths():
    from service.permutation import SCALAR_LIMIT, FeistelPermutation, permutation_key, permute, permute_many, round_keys

    # Values of the pre-numpy implementation: served steps keep their bytes across versions.
    assert permute(range(12), 1000, permutation_key(5, "old", 3)).tolist() == [918, 402, 334, 84, 156, 610, 810, 870, 602, 806, 305, 543]
    assert permute(range(7), 7, permutation_key(0, "a", 0)).tolist() == [1, 5, 3, 6, 4, 0, 2]
    assert permute([0, 5, 2**40], 2**41 + 3, 77).tolist() == [1182151687490, 1398592390141, 345332422339]
    for n in (1, 2, 3, 1000, 4097):
        assert sorted(permute(range(n), n, 9).tolist()) == list(range(n))
    # many lookups of mixed domains and keys (the array path) agree with one-at-a-time (the int path)
    rng = np.random.default_rng(0)
    sizes = rng.choice([5, 1000, 65_537, 10**9 + 7], size=4 * SCALAR_LIMIT + 3)
    positions = (rng.random(len(sizes)) * sizes).astype(np.int64)
    keys = [permutation_key(1, "x", int(e)) for e in rng.integers(0, 3, len(sizes))]
    together = permute_many(positions, sizes, np.array([round_keys(k) for k in keys], dtype=np.uint64))
    assert together.tolist() == [FeistelPermutation(int(n), k)(int(p)) for p, n, k in zip(positions, sizes, keys)]
    with pytest.raises(ValueError, match=r"position 7 outside \[0, 7\)"):
        permute([7], 7, 1)


def test_a_range_of_steps_equals_its_steps_one_by_one(three_datasets):
    schedule = MixSchedule.constant({"a": 0.2, "b": 0.8, "c": 0}).appended(Stage(10, {"a": 0, "b": 0.5, "c": 0.5}))
    mixer = Mixer(three_datasets, MixerConfig(seq_len=16, global_batch=8, seed=2), schedule)
    steps = list(range(3, 19))  # crosses the stage start at 10
    for rank, world in ((0, 1), (1, 2), (3, 4)):
        together = mixer.batches(steps, rank, world)
        assert [b.step for b in together] == steps
        for b in together:
            one = mixer.batch(b.step, rank, world)
            np.testing.assert_array_equal(b.tokens, one.tokens)
            np.testing.assert_array_equal(b.sources, one.sources)
    narrow = mixer.batches(steps, dtype=np.uint16)
    assert narrow[0].tokens.dtype == np.uint16
    np.testing.assert_array_equal(narrow[-1].tokens, mixer.batch(18).tokens)
    with pytest.raises(ValueError, match="step"):
        mixer.batches([mixer.max_step + 1])
