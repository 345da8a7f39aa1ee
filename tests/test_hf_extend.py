"""Extending and training Hugging Face tokenizer folders: SentencePiece-backed (Llama 2 layout) and
byte-level BPE (GPT-2 and Llama 3 layouts), each checked against transformers' own loading of the result."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import ray
import sentencepiece as spm
from tokenizers import Tokenizer
from transformers import AutoTokenizer

from hf_tokenizers import gpt2_folder, llama3_folder, sentencepiece_folder, wordlevel_folder
from pipeline.tokenizer.__main__ import main
from pipeline.tokenizer.extend import ExtendConfig, extend_tokenizer
from pipeline.tokenizer.load import load_tokenizer, vocabulary_pieces
from pipeline.tokenizer.model_proto import TokenizerError
from pipeline.tokenizer.report import ExtensionReport
from pipeline.tokenizer.sample import is_heldout
from pipeline.tokenizer.train import SP_FOLDER_CONFIG, TokenizerTrainConfig, train_tokenizer
from conftest import train_spm, write_jsonl

FOLDERS = {"sentencepiece": sentencepiece_folder, "gpt2": gpt2_folder, "llama3": llama3_folder}


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def corpora(tmp_path_factory, english_lines, german_lines):
    folder = tmp_path_factory.mktemp("corpora")
    return str(write_jsonl(folder / "en.jsonl", english_lines)), str(write_jsonl(folder / "de.jsonl", german_lines))


@pytest.fixture(scope="module", params=sorted(FOLDERS))
def extended(request, local_ray, tmp_path_factory, corpora, english_lines):
    """(kind, base folder, extended folder, report) for each folder kind, extended with German."""
    folder = tmp_path_factory.mktemp(f"hf-extend-{request.param}")
    base = FOLDERS[request.param](english_lines, folder / "base")
    en, de = corpora
    out = folder / "extended"
    report = extend_tokenizer(ExtendConfig(base=base, inputs=(de,), old_inputs=(en,), new_pieces=120, out=out))
    return request.param, base, out, report


def heldout(lines: list[str]) -> list[str]:
    return [line for line in lines if is_heldout(line)]


def test_old_ids_keep_their_strings_and_new_ones_follow(extended):
    _, base, out, report = extended
    before, after = load_tokenizer(base), load_tokenizer(out)
    assert after.vocab_size == before.vocab_size + report["pieces_added"] > before.vocab_size
    old_pieces, new_pieces = vocabulary_pieces(before), vocabulary_pieces(after)
    assert new_pieces[: before.vocab_size] == old_pieces
    assert (after.bos_id, after.eos_id, after.add_bos) == (before.bos_id, before.eos_id, before.add_bos)
    # The report the trainer reads, inside the folder: ids base..extended-1, each with a base segmentation.
    loaded = ExtensionReport.load(out / "extension_report.json")
    assert (loaded.base_vocab_size, loaded.extended_vocab_size) == (before.vocab_size, after.vocab_size)
    assert [p.piece for p in loaded.new_pieces] == new_pieces[before.vocab_size :]


def test_each_new_piece_splits_under_the_base_into_its_own_text(extended):
    kind, base, _, report = extended
    auto = AutoTokenizer.from_pretrained(str(base))
    for piece in ExtensionReport.load(Path(report["extended"]["path"]) / "extension_report.json").new_pieces:
        text = auto.convert_tokens_to_string(auto.convert_ids_to_tokens(list(piece.base_ids)))
        expected = auto.convert_tokens_to_string([piece.piece]) if kind != "sentencepiece" else piece.piece.replace("\u2581", " ")
        assert text.strip() == expected.strip(), piece


def test_transformers_loads_the_folder_and_new_text_compresses_better(extended, german_lines, english_lines):
    kind, base, out, report = extended
    auto_base, auto_ext = AutoTokenizer.from_pretrained(str(base)), AutoTokenizer.from_pretrained(str(out))
    german, english = heldout(german_lines), heldout(english_lines)
    tokens = lambda auto, lines: sum(len(auto(line, add_special_tokens=False)["input_ids"]) for line in lines)  # noqa: E731
    assert tokens(auto_ext, german) < 0.9 * tokens(auto_base, german)
    assert tokens(auto_ext, english) <= tokens(auto_base, english)
    gains = report["bytes_per_token"]
    assert gains["new_text"]["tokens_after"] == tokens(auto_ext, german)
    for line in german[:50]:
        assert auto_ext.decode(auto_ext(line, add_special_tokens=False)["input_ids"]) == line


def test_old_text_keeps_its_ids_or_the_report_counts_each_line_that_changed(extended, english_lines):
    _, base, out, report = extended
    auto_base, auto_ext = AutoTokenizer.from_pretrained(str(base)), AutoTokenizer.from_pretrained(str(out))
    english = heldout(english_lines)
    changed = [line for line in english if auto_base(line)["input_ids"] != auto_ext(line)["input_ids"]]
    counted = report["old_text_changed_lines"]
    assert (counted["lines"], counted["changed"]) == (len(english), len(changed))
    assert counted["examples"] == [line[:200] for line in changed[:3]]


def test_a_folder_whose_files_disagree_is_extended_and_the_disagreement_counted(local_ray, tmp_path, english_lines,
                                                                                german_lines):
    # A SentencePiece model with its defaults (NFKC, runs of spaces collapsed): the tokenizer.json
    # transformers converts cuts spaced text otherwise than the model, in the base already.
    spaced = tmp_path / "spaced"
    spaced.mkdir()
    lines = [f"{e}   ({i})    {g}" for i, (e, g) in enumerate(zip(english_lines, german_lines))]
    model = train_spm(lines, tmp_path / "spm-defaults" / "sp", vocab_size=400, byte_fallback=True)
    (spaced / "tokenizer.model").write_bytes(model.read_bytes())
    (spaced / "tokenizer_config.json").write_text(json.dumps(SP_FOLDER_CONFIG))
    AutoTokenizer.from_pretrained(str(spaced)).save_pretrained(str(spaced))
    spaced_de = str(write_jsonl(tmp_path / "de-spaced.jsonl", [f"{g}    {i}  x" for i, g in enumerate(german_lines)]))
    spaced_en = str(write_jsonl(tmp_path / "en-spaced.jsonl", lines))
    report = extend_tokenizer(ExtendConfig(base=spaced, inputs=(spaced_de,), old_inputs=(spaced_en,), new_pieces=60,
                                           out=tmp_path / "out"))
    counted = report["tokenizer_json_vs_model"]
    assert counted["base_disagreeing"] > 0.5 * counted["lines"]
    assert 0 < counted["extended_disagreeing"] <= counted["base_disagreeing"]


def test_a_sentencepiece_folder_encodes_alike_with_its_model_and_its_tokenizer_json(extended, german_lines, english_lines):
    kind, _, out, _ = extended
    if kind != "sentencepiece":
        pytest.skip("a folder without tokenizer.model")
    model = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    fast = Tokenizer.from_file(str(out / "tokenizer.json"))
    # Man-page text: runs of spaces, tabs, digits, accents.
    lines = german_lines[:300] + english_lines[:300] + [f"NAME(1)      {g}\t 1984  Größe   {e}" for g, e in
                                                        zip(german_lines[:50], english_lines[:50])]
    assert [e.ids for e in fast.encode_batch(lines, add_special_tokens=False)] == model.encode(lines)


def test_unsupported_bases_are_refused_and_nothing_is_written(local_ray, tmp_path, corpora, english_lines):
    en, de = corpora
    wordlevel = wordlevel_folder(sorted(set(" ".join(english_lines).split())), tmp_path / "wordlevel")
    out = tmp_path / "out"
    with pytest.raises(TokenizerError, match=r"wordlevel/tokenizer.json: a WordLevel model; extension supports BPE"):
        extend_tokenizer(ExtendConfig(base=wordlevel, inputs=(de,), old_inputs=(en,), new_pieces=10, out=out))
    assert not out.exists()


def test_train_writes_either_kind_as_a_folder_transformers_loads(local_ray, tmp_path, corpora, english_lines):
    en, _ = corpora
    for kind, vocab in (("bpe", 400), ("sentencepiece", 300)):
        out = tmp_path / f"{kind}-folder"
        assert main(["train", "--kind", kind, "--input", en, "--vocab-size", str(vocab), "--out", str(out)]) == 0
        auto = AutoTokenizer.from_pretrained(str(out))
        assert len(auto) == vocab and auto.eos_token_id is not None
        ids = auto(english_lines[0])["input_ids"]
        assert ids[0] == auto.bos_token_id and auto.decode(ids, skip_special_tokens=True) == english_lines[0]
    with pytest.raises(TokenizerError, match="byte-level BPE tokenizer is a folder"):
        train_tokenizer(TokenizerTrainConfig(inputs=(en,), out=tmp_path / "x.model", vocab_size=300, kind="bpe"))
