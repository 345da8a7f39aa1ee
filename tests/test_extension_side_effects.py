"""Extension without side effects (issue 28): no character ever unknown, old text's encoding kept where asked.

Real SentencePiece models and byte-level BPE folders trained here, extended by the real command on
local Ray; every claim is checked against sentencepiece or tokenizers themselves.
"""

from __future__ import annotations

import json
from collections import Counter

import pytest
import sentencepiece as spm
from tokenizers import Tokenizer
from transformers import AutoTokenizer

from conftest import ENGLISH_WORDS, GERMAN_WORDS, make_lines, train_spm, write_jsonl
from hf_tokenizers import gpt2_folder, sentencepiece_folder
from pipeline.tokenizer.__main__ import main
from pipeline.tokenizer.extend import ExtendConfig, extend_tokenizer
from pipeline.tokenizer.load import load_tokenizer
from pipeline.tokenizer.model_proto import TokenizerError
from pipeline.tokenizer.report import ExtensionReport, lost_characters
from pipeline.tokenizer.sample import is_heldout
from pipeline.tokenizer.train import SP_FOLDER_CONFIG, TokenizerTrainConfig, train_sentencepiece, train_tokenizer
from test_hf_extend import local_ray  # noqa: F401 - the module's local Ray
from test_tokenize import assert_one_error_line

# Characters no donor sees: they stand only in held-out documents of the new text.
UNSEEN = "ѣ★中🙂"


@pytest.fixture(scope="module")
def corpora(tmp_path_factory, english_lines, cyrillic_lines):
    """English (old) and Cyrillic (new) JSONL corpora; a few held-out Cyrillic documents carry UNSEEN."""
    folder = tmp_path_factory.mktemp("side-effects")
    rare = [text for text in (f"{line} {UNSEEN}{i}" for i, line in enumerate(cyrillic_lines)) if is_heldout(text)][:5]
    assert len(rare) == 5
    en = write_jsonl(folder / "en.jsonl", english_lines)
    ru = write_jsonl(folder / "ru.jsonl", cyrillic_lines + rare)
    return folder, str(en), str(ru), rare


def heldout_lines(path: str) -> list[str]:
    return [json.loads(line)["text"] for line in open(path, encoding="utf-8") if is_heldout(json.loads(line)["text"])]


def test_an_extension_of_a_trained_base_loses_no_character(local_ray, corpora):
    folder, en, ru, rare = corpora
    base_path, out = folder / "en.model", folder / "en+ru.model"
    train_tokenizer(TokenizerTrainConfig(inputs=(en,), out=base_path, vocab_size=320))  # byte fallback by default
    report = extend_tokenizer(ExtendConfig(base=base_path, inputs=(ru,), old_inputs=(en,), new_pieces=60, out=out))
    base, extended = spm.SentencePieceProcessor(model_file=str(base_path)), spm.SentencePieceProcessor(model_file=str(out))
    assert [base.is_byte(i) for i in range(base.vocab_size())].count(True) == 256
    for i in range(base.vocab_size()):  # the byte pieces keep the ids they hold
        assert (extended.id_to_piece(i), extended.is_byte(i)) == (base.id_to_piece(i), base.is_byte(i))
    texts = heldout_lines(ru) + heldout_lines(en)
    assert set(rare) <= set(texts)
    assert extended.decode(extended.encode(texts)) == texts
    assert extended.unk_id() not in {i for ids in extended.encode(texts) for i in ids}
    for name in ("new_text", "old_text"):
        assert report["unknown_token_rate"][name]["after"] == 0
        assert report["unknown_characters"][name]["unknown_after"] == 0
    assert report["unknown_characters"]["new_text"]["characters"] > sum(map(len, rare))
    assert report["unknown_characters"]["possible"] is False and report["extended"]["byte_fallback"] is True


def test_a_base_without_byte_fallback_is_not_called_lossless_until_byte_fallback_is_added(
    local_ray, corpora, english_lines, capsys
):
    folder, en, ru, rare = corpora
    base_path = train_spm(english_lines, folder / "bare" / "en", vocab_size=200)  # no byte fallback
    flags = ["extend", "--base", str(base_path), "--input", ru, "--old-input", en, "--new-pieces", "60"]
    assert main([*flags, "--out", str(folder / "lossy.model")]) == 0
    lossy = json.loads((folder / "lossy.report.json").read_text())["unknown_characters"]
    assert lossy["possible"] is True
    # Every held-out character the model has no piece for is counted: the unseen ones of each rare
    # document, and the digits the English base never saw.
    lossy_model = spm.SentencePieceProcessor(model_file=str(folder / "lossy.model"))
    lost = [c for line in heldout_lines(ru) for c in line if lossy_model.piece_to_id(c) == lossy_model.unk_id()
            and not c.isspace()]
    assert lossy["new_text"]["unknown_after"] == len(lost) >= len(UNSEEN) * len(rare)
    assert set(UNSEEN) <= set(lossy["new_text"]["examples_after"])
    assert f"characters left <unk>: new {len(lost)}/" in capsys.readouterr().out

    out = folder / "bytes-added.model"
    assert main([*flags, "--byte-fallback", "--out", str(out)]) == 0
    assert "byte fallback added (256 byte pieces after the old ids)" in capsys.readouterr().out
    base, extended = spm.SentencePieceProcessor(model_file=str(base_path)), spm.SentencePieceProcessor(model_file=str(out))
    size = base.vocab_size()
    assert [extended.id_to_piece(i) for i in range(size)] == [base.id_to_piece(i) for i in range(size)]
    assert [extended.id_to_piece(size + b) for b in range(256)] == [f"<0x{b:02X}>" for b in range(256)]
    assert all(extended.is_byte(size + b) for b in range(256))
    texts = heldout_lines(ru) + heldout_lines(en)
    assert extended.decode(extended.encode(texts)) == texts
    report = ExtensionReport.load(folder / "bytes-added.report.json")  # the trainer's reader accepts it
    assert [p.piece for p in report.new_pieces[:256]] == [f"<0x{b:02X}>" for b in range(256)]
    assert report.base_ids[size + ord("e")] == (base.piece_to_id("e"),)  # an ASCII byte starts as its letter
    assert report.base_ids[size + 0xD1] == (base.unk_id(),)  # a byte of a lost character, as <unk>
    raw = report.raw
    assert raw["unknown_characters"]["possible"] is False and raw["unknown_characters"]["byte_fallback_added"]
    assert raw["unknown_characters"]["new_text"]["unknown_after"] == 0
    assert raw["unknown_characters"]["new_text"]["unknown_before"] >= len(UNSEEN) * len(rare)


@pytest.fixture(scope="module")
def mixed_corpora(tmp_path_factory, english_lines):
    """New text that shares words with the old: unconstrained, its pieces fire on English lines too."""
    folder = tmp_path_factory.mktemp("keep-old")
    new = make_lines(GERMAN_WORDS + ENGLISH_WORDS, 2000, seed=2)
    return folder, str(write_jsonl(folder / "en.jsonl", english_lines)), str(write_jsonl(folder / "mixed.jsonl", new))


@pytest.mark.parametrize("kind", ["sentencepiece", "sentencepiece-folder", "byte-level-bpe"])
def test_keep_old_encoding_keeps_old_ids_and_still_compresses_new_text(local_ray, mixed_corpora, english_lines, kind):
    folder, en, new = mixed_corpora
    if kind == "sentencepiece":
        base = train_spm(english_lines, folder / kind / "en", vocab_size=120)
        outs = folder / f"{kind}-default.model", folder / f"{kind}-kept.model"
    else:  # a folder: its users encode with tokenizer.json, so that is the encoding kept
        make = sentencepiece_folder if kind == "sentencepiece-folder" else gpt2_folder
        base = make(english_lines, folder / kind, vocab_size=320 if kind == "sentencepiece-folder" else 400)
        outs = folder / f"{kind}-default", folder / f"{kind}-kept"
    reports = [
        extend_tokenizer(ExtendConfig(base=base, inputs=(new,), old_inputs=(en,), new_pieces=100, out=out,
                                      keep_old_encoding=keep))
        for out, keep in zip(outs, (False, True))
    ]
    default, kept = reports
    assert default["old_text_changed_lines"]["changed"] > 0.2 * default["old_text_changed_lines"]["lines"]
    assert kept["old_text_changed_lines"]["changed"] == 0
    assert kept["bytes_per_token"]["new_text"]["change"] > 0.2  # the new text still gains
    record = kept["keep_old_encoding"]
    assert record["old_sample_changed_lines"] == 0 < record["pieces_blocked"]
    assert record["old_sample_changed_lines_without_keeping"] > 0 and default["keep_old_encoding"] is None
    # Every old line, sampled or held out, keeps its ids: checked with the libraries themselves.
    if kind == "sentencepiece":
        encoders = [spm.SentencePieceProcessor(model_file=str(path)).encode for path in (base, outs[1])]
    else:
        encoders = [lambda lines, t=Tokenizer.from_file(str(path / "tokenizer.json")): [e.ids for e in t.encode_batch(lines)]
                    for path in (base, outs[1])]
    assert encoders[0](english_lines) == encoders[1](english_lines)


def test_keep_old_encoding_without_old_input_is_one_error_line(tmp_path, capsys, english_lines):
    source = str(write_jsonl(tmp_path / "de.jsonl", english_lines[:10]))
    base = train_spm(english_lines, tmp_path / "en", vocab_size=100)
    code = main(["extend", "--base", str(base), "--input", source, "--new-pieces", "10", "--keep-old-encoding",
                 "--out", str(tmp_path / "out.model")])
    assert code == 2
    assert_one_error_line(capsys.readouterr().err,
                          "error: --keep-old-encoding needs --old-input: text like the base's corpus, whose encoding "
                          "is kept; nothing was written")
    assert not (tmp_path / "out.model").exists() and not (tmp_path / "out.report.json").exists()


def test_a_vocabulary_too_small_for_byte_fallback_names_the_size_and_the_switch(tmp_path, english_lines):
    (tmp_path / "en.txt").write_text("\n".join(english_lines) + "\n")
    with pytest.raises(TokenizerError, match=r"--vocab-size 100: the model needs 256 byte pieces \(byte fallback\), "
                                             r"every character .* \d+ ids in all; pass --vocab-size \d+ or more, "
                                             "or --no-byte-fallback"):
        train_sentencepiece(tmp_path / "en.txt", 100, "bpe", byte_fallback=True)


def test_a_sentencepiece_folder_without_byte_fallback_is_refused_and_its_losses_counted(tmp_path, english_lines):
    """transformers converts such a model to a tokenizer.json that drops unknown characters without a trace."""
    with pytest.raises(TokenizerError, match="--no-byte-fallback for a Hugging Face folder: transformers converts"):
        train_tokenizer(TokenizerTrainConfig(inputs=("x.jsonl",), out=tmp_path / "folder", vocab_size=300,
                                             byte_fallback=False))
    assert not (tmp_path / "folder").exists()
    with pytest.raises(TokenizerError, match="--no-byte-fallback: a byte-level BPE tokenizer spells every byte"):
        train_tokenizer(TokenizerTrainConfig(inputs=("x.jsonl",), out=tmp_path / "folder", vocab_size=300,
                                             kind="bpe", byte_fallback=False))
    folder = tmp_path / "lossy"
    folder.mkdir()
    (folder / "tokenizer.model").write_bytes(train_spm(english_lines, tmp_path / "sp" / "en", vocab_size=100).read_bytes())
    (folder / "tokenizer_config.json").write_text(json.dumps(SP_FOLDER_CONFIG))
    AutoTokenizer.from_pretrained(str(folder)).save_pretrained(str(folder))
    spec = load_tokenizer(folder)
    assert spec.encoder()([UNSEEN]) != [] and spec.decoder()(spec.encoder()([UNSEEN])) == [""]  # gone, no <unk>
    counts = Counter(f"the {UNSEEN} manual")
    assert lost_characters(spec, counts) == Counter({c: 1 for c in UNSEEN})
