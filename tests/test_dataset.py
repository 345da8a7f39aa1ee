"""The on-disk format: round trip, reads across shard boundaries, shard cutting, and damage detection."""

import json

import numpy as np
import pytest

from pipeline.dataset import DatasetError, ShardWriter, TokenDataset


def test_round_trip_and_cross_shard_reads(tmp_path, english_lines, english_model, token_dataset_factory):
    ds = token_dataset_factory("en", english_lines[:120], english_model, english_lines[120:130])
    assert len(ds.train.shards) == 3 and ds.train.num_documents == 120 and ds.val.num_documents == 10
    stream = np.concatenate(list(ds.train.documents()))
    assert len(stream) == ds.train.num_tokens
    # every document ends in EOS; a read crossing shard boundaries equals the concatenated stream
    assert all(doc[-1] == ds.tokenizer.eos_id for doc in ds.train.documents())
    boundary = ds.train.shards[0].tokens
    np.testing.assert_array_equal(ds.train.read(boundary - 7, 500), stream[boundary - 7 : boundary + 493])
    with pytest.raises(IndexError):
        ds.train.read(ds.train.num_tokens - 1, 2)


@pytest.mark.parametrize("damage", ["truncate", "flip", "missing", "lying_manifest"])
def test_damage_is_reported_with_the_file(tmp_path, english_lines, english_model, token_dataset_factory, damage):
    ds = token_dataset_factory("en", english_lines[:60], english_model)
    shard = ds.root / ds.train.shards[0].file
    if damage == "truncate":
        shard.write_bytes(shard.read_bytes()[:-2])
    elif damage == "flip":
        data = bytearray(shard.read_bytes())
        data[10] ^= 0xFF
        shard.write_bytes(bytes(data))
    elif damage == "missing":
        shard.unlink()
    else:
        manifest = json.loads((ds.root / "manifest.json").read_text())
        manifest["splits"]["train"]["tokens"] += 1
        (ds.root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DatasetError) as err:
        TokenDataset(ds.root, verify="full")
    assert ("manifest.json" if damage == "lying_manifest" else shard.name) in str(err.value)


def test_commit_refuses_to_overwrite_a_valid_dataset(tmp_path, english_lines, english_model, token_dataset_factory):
    token_dataset_factory("en", english_lines[:10], english_model)
    with pytest.raises(DatasetError, match="already exists"):
        token_dataset_factory("en", english_lines[:10], english_model)


def test_shards_are_cut_at_the_first_document_boundary_past_max_tokens_however_documents_arrive(tmp_path):
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 40, size=300)
    lengths[[17, 150]] = 250  # documents longer than a shard get one to themselves
    tokens = rng.integers(0, 1000, size=int(lengths.sum())).astype(np.uint16)
    results = []
    for name, group_sizes in (("one-by-one", [1] * len(lengths)), ("ragged", rng.integers(1, 60, size=300))):
        (tmp_path / name).mkdir()
        writer, start, doc = ShardWriter(tmp_path / name, "train", np.dtype("<u2"), max_tokens=100), 0, 0
        for size in group_sizes:
            group = lengths[doc : doc + size]
            writer.add(tokens[start : start + group.sum()], group)
            start, doc = start + int(group.sum()), doc + len(group)
        shards = writer.close()
        results.append([(tmp_path / name / s.file).read_bytes() + (tmp_path / name / s.index).read_bytes()
                        for s in shards])
    assert results[0] == results[1]
    ends = np.cumsum(lengths)
    first_doc = 0
    for shard in shards[:-1]:
        last_doc = first_doc + shard.documents - 1
        within = ends[last_doc] - (ends[first_doc - 1] if first_doc else 0)
        before_last = within - lengths[last_doc]
        assert within == shard.tokens and within >= 100 > before_last
        first_doc = last_doc + 1
    assert sum(s.tokens for s in shards) == tokens.size and sum(s.documents for s in shards) == len(lengths)
