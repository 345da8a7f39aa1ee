"""Tokenizer train and extend, with real SentencePiece models trained here and real local Ray.

The bases cover what a user may bring: BPE, unigram, and a Llama-style BPE with byte fallback,
user-defined and control pieces. Every check compares against sentencepiece itself.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from itertools import accumulate
from pathlib import Path

import pytest
import ray
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as model_pb2

from conftest import CYRILLIC_LETTERS, train_spm, write_jsonl
from pipeline.tokenizer.__main__ import main
from pipeline.tokenizer.extend import (
    MAX_OLD_TEXT_LOSS,
    ExtendConfig,
    StagedExtension,
    build_report,
    check_old_text,
    extend_tokenizer,
)
from pipeline.tokenizer.sentencepiece_extension import extend_model, new_piece_entries
from pipeline.tokenizer.load import load_tokenizer
from pipeline.tokenizer.model_proto import TokenizerError, append_pieces, check_ids_stable, load_model_proto
from pipeline.tokenizer.report import ExtensionReport
from pipeline.tokenizer.pieces import producible
from pipeline.tokenizer.sample import is_heldout, text_lines, write_lines
from pipeline.tokenizer.train import TokenizerTrainConfig, train_tokenizer
from test_tokenize import REPO, assert_one_error_line

BASES = {
    "bpe": dict(model_type="bpe", vocab_size=200),
    "unigram": dict(model_type="unigram", vocab_size=70),
    "llama-style": dict(
        model_type="bpe",
        vocab_size=450,
        byte_fallback=True,
        user_defined_symbols=["<tool>", "der"],
        control_symbols=["<ctl>"],
        split_digits=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
    ),
}
NEW_PIECES = {"bpe": 150, "unigram": 40, "llama-style": 150}
NEVER_SEEN = "ѣ"  # a Cyrillic letter the generated corpus lacks, so no donor can cover it


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def extend_english(tmp_path_factory, kind: str, english_lines, new_lines, new_pieces: int):
    """(kind, base path, Extension): an English base of `kind` extended with pieces of `new_lines[:1800]`."""
    folder = tmp_path_factory.mktemp(f"extend-{kind}")
    base_path = train_spm(english_lines, folder / "base", **dict(BASES[kind]))
    write_lines(folder / "new.txt", new_lines[:1800])
    return kind, base_path, extend_model(load_model_proto(base_path), folder / "new.txt", new_pieces, folder)


@pytest.fixture(scope="module", params=sorted(BASES))
def extension(request, tmp_path_factory, english_lines, german_lines):
    """(kind, base path, Extension) for each base kind, extended with German pieces."""
    return extend_english(tmp_path_factory, request.param, english_lines, german_lines, NEW_PIECES[request.param])


@pytest.fixture(scope="module", params=["bpe", "unigram"])
def new_script(request, tmp_path_factory, english_lines, cyrillic_lines):
    """(kind, base path, Extension): an English base extended with pieces of Cyrillic text it never saw."""
    return extend_english(tmp_path_factory, request.param, english_lines, cyrillic_lines, 150)


def loaded(result) -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_proto=result.model.SerializeToString())


def unknown_tokens(sp: spm.SentencePieceProcessor, lines: list[str]) -> int:
    return sum(ids.count(sp.unk_id()) for ids in sp.encode(lines))


def assert_keeps_the_base(base_path: Path, extended: spm.SentencePieceProcessor, old_lines: list[str]) -> None:
    """Hold the extended model to the base read from its own file by plain sentencepiece: every base
    id keeps its piece, and old text, token for token, cuts into the base's pieces or (BPE, where every
    new merge ranks below the base's) into runs of them."""
    base = spm.SentencePieceProcessor(model_file=str(base_path))
    kinds = ("id_to_piece", "get_score", "is_unknown", "is_control", "is_unused", "is_byte")
    for i in range(base.vocab_size()):
        assert [getattr(extended, k)(i) for k in kinds] == [getattr(base, k)(i) for k in kinds], f"id {i}"
    spec = model_pb2.ModelProto.FromString(base_path.read_bytes()).trainer_spec
    for before, after in zip(base.encode(old_lines), extended.encode(old_lines)):
        assert extended.decode(before) == base.decode(before)  # text tokenized with the base reads the same
        assert "".join(map(extended.id_to_piece, after)) == "".join(map(base.id_to_piece, before))
        if spec.model_type == spec.BPE:
            ends_before = set(accumulate(len(base.id_to_piece(i)) for i in before))
            assert set(accumulate(len(extended.id_to_piece(i)) for i in after)) <= ends_before, (before, after)


def test_old_ids_keep_their_pieces(extension, english_lines):
    kind, base_path, result = extension
    base = spm.SentencePieceProcessor(model_file=str(base_path))
    extended = loaded(result)
    assert extended.vocab_size() == base.vocab_size() + len(result.added) > base.vocab_size()
    assert_keeps_the_base(base_path, extended, english_lines[1800:])
    if kind == "llama-style":
        assert extended.is_byte(extended.piece_to_id("<0x41>"))
        assert extended.encode("<tool>")[-1] == base.piece_to_id("<tool>")  # user-defined still wins
        assert extended.is_control(base.piece_to_id("<ctl>"))


def test_every_added_piece_is_produced_and_used(extension, german_lines):
    _, _, result = extension
    assert all(producible(result.base, result.added))
    first_new = len(result.base.pieces)
    extended = loaded(result)
    used = {i for ids in extended.encode(german_lines[1800:]) for i in ids if i >= first_new}
    assert len(used) > 10


def test_extended_model_decodes_what_it_encodes(extension, english_lines, german_lines):
    kind, _, result = extension
    extended = loaded(result)
    texts = german_lines[1800:1900] + english_lines[1800:1900] + ["Größe: 42 Äpfel, 3.5 ℃ – naïve"]
    decoded = extended.decode(extended.encode(texts))
    if kind == "llama-style":  # identity normalization and byte fallback: every byte survives
        assert decoded == texts
    else:
        assert decoded[:200] == texts[:200]


def test_new_text_gets_better_and_old_text_no_worse(extension, english_lines, german_lines):
    _, base_path, result = extension
    base = spm.SentencePieceProcessor(model_file=str(base_path))
    extended = loaded(result)

    def tokens(sp, lines):
        return sum(map(len, sp.encode(lines)))

    new, old = german_lines[1800:], english_lines[1800:]
    assert tokens(extended, new) < 0.8 * tokens(base, new)
    assert tokens(extended, old) <= (1 + MAX_OLD_TEXT_LOSS) * tokens(base, old)


def test_id_check_catches_a_moved_piece(extension):
    _, base_path, result = extension
    tampered = append_pieces(result.base, [])
    tampered.pieces[5].piece, tampered.pieces[6].piece = tampered.pieces[6].piece, tampered.pieces[5].piece
    with pytest.raises(TokenizerError, match="id 5"):
        check_ids_stable(result.base, tampered)
    check_ids_stable(model_pb2.ModelProto.FromString(base_path.read_bytes()), result.model)


def test_bpe_pieces_score_below_every_base_piece(extension):
    kind, _, result = extension
    if kind == "unigram":
        pytest.skip("unigram keeps the donor's log-probabilities")
    lowest = min(p.score for p in result.base.pieces)
    scores = [p.score for p in result.added]
    assert max(scores) < lowest and scores == sorted(scores, reverse=True)


@pytest.fixture(scope="module")
def corpora(tmp_path_factory, english_lines, german_lines):
    folder = tmp_path_factory.mktemp("corpora")
    return folder, str(write_jsonl(folder / "en.jsonl", english_lines)), str(write_jsonl(folder / "de.jsonl", german_lines))


@pytest.fixture(scope="module")
def trained_base(local_ray, corpora):
    folder, en, _ = corpora
    # A base without byte fallback, as `train` made before it became the default: text it lacks is <unk>.
    summary = train_tokenizer(TokenizerTrainConfig(inputs=(en,), out=folder / "en.model", vocab_size=200,
                                                   byte_fallback=False))
    return folder / "en.model", summary


def test_train_command_samples_with_ray_and_reports_the_sample(trained_base, english_lines):
    model, summary = trained_base
    assert spm.SentencePieceProcessor(model_file=str(model)).vocab_size() == 200
    heldout = sum(is_heldout(line) for line in english_lines)
    assert 0 < heldout < 0.1 * len(english_lines)
    assert summary["corpus_documents"] == len(english_lines)
    assert summary["sample_documents"] == len(english_lines) - heldout


def test_report_matches_a_recount(trained_base, corpora, english_lines, german_lines):
    base_path, _ = trained_base
    folder, en, de = corpora
    out = folder / "en+de.model"
    extend_tokenizer(ExtendConfig(base=base_path, inputs=(de,), old_inputs=(en,), new_pieces=120, out=out))
    report = ExtensionReport.load(folder / "en+de.report.json")
    raw = report.raw
    base = spm.SentencePieceProcessor(model_file=str(base_path))
    extended = spm.SentencePieceProcessor(model_file=str(out))
    assert raw["base"]["vocab_size"] == base.vocab_size() == report.base_vocab_size
    assert raw["extended"]["vocab_size"] == extended.vocab_size() == base.vocab_size() + raw["pieces_added"]
    assert raw["base"]["model_type"] == "bpe" and raw["pieces_added"] == 120
    heldout = {
        name: [line for doc in docs if is_heldout(doc) for line in text_lines(doc)]
        for name, docs in (("new_text", german_lines), ("old_text", english_lines))
    }
    for name, lines in heldout.items():
        entry = raw["bytes_per_token"][name]
        size = sum(len(line.encode()) for line in lines)
        before, after = sum(map(len, base.encode(lines))), sum(map(len, extended.encode(lines)))
        assert (entry["bytes"], entry["tokens_before"], entry["tokens_after"]) == (size, before, after)
        assert entry["before"] == pytest.approx(size / before, abs=1e-4)
        assert entry["after"] == pytest.approx(size / after, abs=1e-4)
        assert_unknown_recount(raw, name, lines, base, extended)
        if name == "new_text":
            used = {i for ids in extended.encode(lines) for i in ids if i >= base.vocab_size()}
            assert raw["added_pieces_used_on_new_text"] == len(used) > 0
    assert raw["bytes_per_token"]["new_text"]["after"] > 1.2 * raw["bytes_per_token"]["new_text"]["before"]
    assert raw["unknown_token_rate"]["new_text"]["after"] == 0 < raw["unknown_token_rate"]["new_text"]["before"]
    assert_keeps_the_base(base_path, extended, heldout["old_text"])
    for added in report.new_pieces:
        assert extended.id_to_piece(added.id) == added.piece
        if base.unk_id() not in added.base_ids:  # characters the base lacks come back as <unk>
            assert "".join(base.id_to_piece(i) for i in added.base_ids) == added.piece
        if added.piece.startswith("\u2581"):  # a word's start: the base cuts the word alone the same way
            assert base.encode(added.piece[1:]) == list(added.base_ids), added.piece


def assert_unknown_recount(report: dict, name: str, lines: list[str], base, extended) -> None:
    entry, tokens = report["unknown_token_rate"][name], report["bytes_per_token"][name]
    counts = unknown_tokens(base, lines), unknown_tokens(extended, lines)
    assert (entry["unknown_before"], entry["unknown_after"]) == counts
    rates = counts[0] / tokens["tokens_before"], counts[1] / tokens["tokens_after"]
    assert (entry["before"], entry["after"]) == pytest.approx(rates, abs=1e-6)


def test_new_script_letters_all_become_pieces(new_script, english_lines, cyrillic_lines):
    """A BPE donor lists its characters below every merge: taking its top pieces left letters <unk>."""
    _, base_path, result = new_script
    base, extended = spm.SentencePieceProcessor(model_file=str(base_path)), loaded(result)
    letters = Counter("".join(cyrillic_lines[:1800]))
    # Even the rarest letter is far above what the donor's 99.95% character coverage may leave out.
    assert min(letters[c] for c in CYRILLIC_LETTERS) > 0.002 * sum(letters.values())
    assert all(base.piece_to_id(c) == base.unk_id() for c in CYRILLIC_LETTERS)  # the script is new to the base
    assert all(extended.piece_to_id(c) != extended.unk_id() for c in CYRILLIC_LETTERS)
    heldout = cyrillic_lines[1800:]
    assert unknown_tokens(extended, heldout) == 0
    assert extended.decode(extended.encode(heldout)) == heldout  # generated lines are already normalized
    # What the donor never saw is all that stays unknown.
    cut = extended.encode(f"{heldout[0]} {NEVER_SEEN}{heldout[1]}", out_type="proto")
    assert [p.surface for p in cut.pieces if p.id == extended.unk_id()] == [NEVER_SEEN]
    assert_keeps_the_base(base_path, extended, english_lines[1800:])


def test_report_gives_the_unknown_share_before_and_after(new_script, tmp_path, english_lines, cyrillic_lines):
    _, base_path, result = new_script
    out = tmp_path / "extended.model"
    out.write_bytes(result.model.SerializeToString())
    new, old = cyrillic_lines[1800:] + [NEVER_SEEN], english_lines[1800:]
    staged = StagedExtension(out, new_piece_entries(result), result.donor_vocab_size, result.skipped, {})
    report = build_report(load_tokenizer(base_path), load_tokenizer(out), staged, new, old)
    base, extended = spm.SentencePieceProcessor(model_file=str(base_path)), loaded(result)
    for name, lines in (("new_text", new), ("old_text", old)):
        assert_unknown_recount(report, name, lines, base, extended)
    unknown = report["unknown_token_rate"]
    assert unknown["new_text"]["before"] > 0.3  # under the base, every word is <unk> but for its leading space
    assert unknown["new_text"]["unknown_after"] == 1  # the letter no donor saw
    assert unknown["old_text"]["unknown_before"] == unknown["old_text"]["unknown_after"] == 0


def test_not_a_sentencepiece_file_is_refused(tmp_path):
    for name, data in (("text.model", b"hello, I am not a model\n"), ("empty.model", b""), ("junk.model", b"\x00\xff" * 50)):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(TokenizerError, match="not a SentencePiece model"):
            load_model_proto(tmp_path / name)
    with pytest.raises(TokenizerError, match="cannot read"):
        load_model_proto(tmp_path / "missing.model")


def test_bad_piece_counts_are_refused(tmp_path, english_lines, german_lines, cyrillic_lines):
    base = load_model_proto(train_spm(english_lines, tmp_path / "base", vocab_size=200))
    write_lines(tmp_path / "de.txt", german_lines[:300])
    for count in (0, -3):
        with pytest.raises(TokenizerError, match="must be a positive number"):
            extend_model(base, tmp_path / "de.txt", count, tmp_path)
    with pytest.raises(TokenizerError, match=r"yields only \d+ pieces the base lacks"):
        extend_model(base, tmp_path / "de.txt", 100_000, tmp_path)
    write_lines(tmp_path / "ru.txt", cyrillic_lines[:300])
    with pytest.raises(TokenizerError, match=f"has {len(CYRILLIC_LETTERS)} characters the base lacks"):
        extend_model(base, tmp_path / "ru.txt", len(CYRILLIC_LETTERS) - 1, tmp_path)


def test_cli_reports_bad_input_without_a_traceback(tmp_path, capsys, english_lines):
    (tmp_path / "base.model").write_text("not a model")
    new = str(write_jsonl(tmp_path / "de.jsonl", english_lines[:10]))
    code = main(["extend", "--base", str(tmp_path / "base.model"), "--input", new, "--old-input", new,
                 "--new-pieces", "10", "--out", str(tmp_path / "out.model")])
    assert code == 2
    assert "base.model: not a SentencePiece model" in capsys.readouterr().err
    assert not (tmp_path / "out.model").exists()


def test_cli_shows_a_wrong_text_field_in_one_line(tmp_path, english_lines):
    """A task error that Ray Data would report with a traceback and "please open an issue on the Ray
    project" is the one line naming file, line and flag (run in a process of its own, as a user runs it)."""
    source = str(write_jsonl(tmp_path / "en.jsonl", english_lines[:20]))
    command = subprocess.run([sys.executable, "-m", "pipeline.tokenizer", "train", "--input", source, "--text-field",
                              "body", "--vocab-size", "50", "--out", str(tmp_path / "en.model"), "--num-cpus", "1"],
                             cwd=REPO, capture_output=True, text=True, timeout=300)
    assert command.returncode == 2
    assert_one_error_line(command.stderr,
                          f"error: {source}:1: no 'body' field (found 'text'); choose the field with --text-field")


def test_old_text_guard_refuses_a_regression(tmp_path):
    report = {"bytes_per_token": {"old_text": {"before": 4.0, "after": 3.9, "change": -0.025}}}
    with pytest.raises(TokenizerError, match="not written"):
        check_old_text(report, tmp_path / "x.model")
    report["bytes_per_token"]["old_text"]["change"] = -0.005
    check_old_text(report, tmp_path / "x.model")


def test_report_loader_names_the_bad_field(tmp_path):
    path = tmp_path / "r.report.json"
    path.write_text(json.dumps({"base": {"vocab_size": 10}, "extended": {"vocab_size": 12}, "new_pieces": [
        {"id": 10, "piece": "ab", "base_ids": [1, 2]}, {"id": 11, "piece": "cd", "base_ids": [99]}]}))
    with pytest.raises(TokenizerError, match="id 11"):
        ExtensionReport.load(path)
    path.write_text(json.dumps({"base": {"vocab_size": 10}, "extended": {"vocab_size": 12}, "new_pieces": [
        {"id": 11, "piece": "cd", "base_ids": [3]}, {"id": 10, "piece": "ab", "base_ids": [1, 2]}]}))
    with pytest.raises(TokenizerError, match="exactly 10..11 in order"):
        ExtensionReport.load(path)
    path.write_text(json.dumps({"base": {"vocab_size": 10}, "extended": {"vocab_size": 11}, "new_pieces": [
        {"id": 10, "piece": "ab", "base_ids": [1.0]}]}))
    with pytest.raises(TokenizerError, match=r"base_ids\[\] is 1.0, not an integer"):
        ExtensionReport.load(path)
    path.write_text("{}")
    with pytest.raises(TokenizerError, match="'base'"):
        ExtensionReport.load(path)
