"""A base-tokenized dataset mixed with one tokenized by its extension is said once, with the share of old
lines the extension encodes differently (from its report), where the mix is opened: the service's
start-up and the trainer's in-process mixer. Real SentencePiece models, a real extension, real datasets."""

from __future__ import annotations

import io
import shutil

import pytest

from conftest import ENGLISH_WORDS, GERMAN_WORDS, make_lines, train_spm, write_token_dataset
from pipeline.tokenizer.encoding_mix import find_encoding_mixes, warn_encoding_mixes
from pipeline.tokenizer.extend import StagedExtension, build_report
from pipeline.tokenizer.sentencepiece_extension import extend_model, new_piece_entries
from pipeline.tokenizer.load import load_tokenizer
from pipeline.tokenizer.model_proto import load_model_proto
from pipeline.tokenizer.report import report_path, write_report
from pipeline.tokenizer.sample import write_lines


@pytest.fixture(scope="module")
def mix(tmp_path_factory, english_lines):
    """Datasets en (base tokenizer), en-again (the same), de (its extension, with a report beside it)."""
    folder = tmp_path_factory.mktemp("encoding-mix")
    base = train_spm(english_lines, folder / "base", vocab_size=120)
    # German with English words in it: the extension's new pieces also fire on English lines.
    new_lines = make_lines(GERMAN_WORDS + ENGLISH_WORDS, 1200, seed=5)
    write_lines(folder / "new.txt", new_lines)
    extension = extend_model(load_model_proto(base), folder / "new.txt", 120, folder)
    extended = folder / "en+de.model"
    extended.write_bytes(extension.model.SerializeToString())
    staged = StagedExtension(extended, new_piece_entries(extension), extension.donor_vocab_size, extension.skipped, {})
    report = build_report(load_tokenizer(base), load_tokenizer(extended), staged, new_lines[:100], english_lines[:300])
    write_report(report_path(extended, folder=False), report)
    datasets = {
        "en": write_token_dataset(folder / "en", english_lines[:40], base),
        "en-again": write_token_dataset(folder / "en-again", english_lines[40:80], base),
        "de": write_token_dataset(folder / "de", new_lines[:40], extended),
    }
    return folder, datasets, report


def test_a_base_dataset_beside_its_extensions_is_said_once_with_the_share(mix):
    _, datasets, report = mix
    changed = report["old_text_changed_lines"]
    assert 0 < changed["changed"] < changed["lines"]
    stream = io.StringIO()
    found, _ = warn_encoding_mixes(datasets, stream)  # en and en-again share the base: one pair each, with de
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2 and all(line.startswith("warning: datasets ") for line in lines)
    assert (found.base, found.extended, found.changed_lines, found.lines) == ("en", "de", changed["changed"],
                                                                                 changed["lines"])
    assert f"{changed['changed'] / changed['lines']:.1%} of held-out old-text lines" in lines[0]
    assert "'en' and 'de'" in lines[0] and "'en-again' and 'de'" in lines[1]
    assert found.report.endswith("en+de.report.json")


def test_one_tokenizer_is_no_mix(mix):
    _, datasets, _ = mix
    stream = io.StringIO()
    assert warn_encoding_mixes({"en": datasets["en"], "en-again": datasets["en-again"]}, stream) == []
    assert stream.getvalue() == ""


def test_without_the_report_the_share_is_unknown(mix, tmp_path):
    folder, datasets, _ = mix
    report = report_path(folder / "en+de.model", folder=False)
    moved = tmp_path / "moved.json"
    shutil.move(report, moved)
    try:
        [found] = find_encoding_mixes({"en": datasets["en"], "de": datasets["de"]})
    finally:
        shutil.move(moved, report)
    assert found.changed_share is None
    assert "is unknown: no extension report found" in found.message() and str(report) in found.message()


def test_a_report_of_another_extension_is_not_taken(mix):
    folder, datasets, _ = mix
    report = report_path(folder / "en+de.model", folder=False)
    original = report.read_text()
    other = original.replace('"files_sha256": {\n      "en+de.model": "', '"files_sha256": {\n      "en+de.model": "0')
    assert other != original
    report.write_text(other)
    try:
        [found] = find_encoding_mixes({"en": datasets["en"], "de": datasets["de"]})
    finally:
        report.write_text(original)
    assert found.changed_share is None


def test_the_in_process_mixer_says_it_once_on_rank_zero(mix, capsys):
    from trainer.data import MixerSource
    from trainer.train_config import DataConfig

    _, datasets, _ = mix
    config = DataConfig(datasets={name: str(datasets[name].root) for name in ("en", "de")},
                        weights={"en": 0.5, "de": 0.5}, seq_len=16, global_batch=4)
    for rank in (0, 1):
        MixerSource(config, rank=rank, world_size=2).close()
    err = capsys.readouterr().err
    assert err.count("warning: datasets 'en' and 'de' mix two encodings") == 1


def test_the_service_says_it_once_at_start_up(mix, tmp_path, capsys):
    from service.__main__ import build_service
    from service.service_config import parse_args

    _, datasets, _ = mix
    config = parse_args([f"--dataset=en={datasets['en'].root}", f"--dataset=de={datasets['de'].root}",
                         "--weights=en=0.5,de=0.5", "--seq-len=16", "--global-batch=4",
                         f"--state-dir={tmp_path / 'state'}", "--allow-anonymous-reads"])
    build_service(config).close()
    assert capsys.readouterr().err.count("warning: datasets 'en' and 'de' mix two encodings") == 1
