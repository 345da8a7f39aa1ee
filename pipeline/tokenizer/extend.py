"""`python -m pipeline.tokenizer extend`: append new-corpus pieces to an existing SentencePiece model.

1. Normalize the new text exactly as the base does (its own normalizer, whatever it is) and train a
   donor model of the base's type on it, with the base's splitting rules and user-defined symbols.
2. Choose up to N donor pieces the base lacks: every character, then longer pieces the extended model
   actually produces (`pieces.py`).
3. Append them, check that ids 0..V-1 are unchanged, measure bytes per token and the `<unk>` share on
   held-out new and old text, and only then write the model and its report (`report.py`).
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from pipeline.atomic_file import write_atomically
from pipeline.dataset import sha256_file
from pipeline.readers import check_split_used, select_inputs
from pipeline.tokenizer.model_proto import (
    ModelProto,
    NewPiece,
    PieceType,
    TokenizerError,
    append_pieces,
    check_ids_stable,
    load_model_proto,
    model_type_name,
    piece_text,
    processor_from_proto,
    verbatim_processor,
)
from pipeline.tokenizer.pieces import check_piece_count, choose_pieces
from pipeline.tokenizer.report import (
    comparison,
    encode_lines,
    measure,
    report_path,
    unknown_comparison,
    write_report,
)
from pipeline.tokenizer.sample import HOLDOUT_FRACTION, read_lines
from pipeline.tokenizer.train import load_sample, refuse_existing, train_sentencepiece

# Old text may lose at most this share of its bytes per token (the bound).
MAX_OLD_TEXT_LOSS = 0.01
# Trainer settings that decide where pieces may start and end; the donor copies them from the base.
_SPLITTING_RULES = (
    "split_by_unicode_script",
    "split_by_number",
    "split_by_whitespace",
    "split_digits",
    "treat_whitespace_as_suffix",
    "allow_whitespace_only_pieces",
    "max_sentencepiece_length",
    "character_coverage",
)


@dataclass(frozen=True)
class ExtendConfig:
    base: Path
    inputs: tuple[str, ...]
    old_inputs: tuple[str, ...]
    new_pieces: int
    out: Path
    text_field: str = "text"
    split: str | None = None  # of `datasets` DatasetDict inputs, new or old
    max_sample_bytes: int = 200_000_000
    max_heldout_bytes: int = 20_000_000
    holdout_fraction: float = HOLDOUT_FRACTION
    overwrite: bool = False
    address: str | None = None
    num_cpus: int | None = None


@dataclass(frozen=True)
class Extension:
    """An extended model and how it was made."""

    base: ModelProto
    model: ModelProto
    added: list[NewPiece]
    skipped: int  # candidates dropped because the extended model would never produce them
    donor_vocab_size: int


def donor_options(base: ModelProto) -> dict:
    """Trainer options that make donor pieces fit text as the base cuts it.

    The donor trains on text the base has already normalized, so its own normalizer must do nothing.
    """
    spec = base.trainer_spec
    options: dict = {name: getattr(spec, name) for name in _SPLITTING_RULES}
    options.update(normalization_rule_name="identity", add_dummy_prefix=False, remove_extra_whitespaces=False)
    user_defined = [p.piece for p in base.pieces if p.type == PieceType.USER_DEFINED and "," not in p.piece]
    if user_defined:
        # The base always cuts these out first, so donor pieces must not straddle them.
        options["user_defined_symbols"] = user_defined
    return options


def normalize_file(base: ModelProto, source: Path, target: Path) -> int:
    """Write `source`'s lines as the base normalizes them; returns the number of lines written."""
    processor = processor_from_proto(base, "base model")
    lines = read_lines(source)
    written = 0
    with open(target, "w", encoding="utf-8") as out:
        for start in range(0, len(lines), 4096):
            for line in processor.normalize(lines[start : start + 4096]):
                if line.strip("\u2581 "):
                    out.write(line + "\n")
                    written += 1
    return written


def extend_model(base: ModelProto, new_text: Path, new_pieces: int, scratch: Path) -> Extension:
    """Train a donor on `new_text` (lines) and append up to `new_pieces` of its pieces to `base`."""
    check_piece_count(new_pieces)  # before the donor's training, which is the slow part
    kind = model_type_name(base)
    normalized = scratch / "donor-input.txt"
    normalize_file(base, new_text, normalized)
    # The donor offers more than N pieces: some it shares with the base, some prove unproducible.
    donor_bytes = train_sentencepiece(
        normalized, len(base.pieces) + new_pieces, kind, fit_vocab=True, **donor_options(base)
    )
    donor = ModelProto()
    donor.ParseFromString(donor_bytes)
    added, skipped = choose_pieces(base, donor, new_pieces)
    extended = append_pieces(base, added)
    check_ids_stable(base, extended)
    return Extension(base, extended, added, skipped, len(donor.pieces))


def new_piece_entries(extension: Extension) -> list[dict]:
    """Each new piece with its id and its segmentation under the base (for embedding initialisation)."""
    segmenter = verbatim_processor(extension.base)
    first = len(extension.base.pieces)
    texts = [piece_text(extension.base, p.piece) for p in extension.added]
    return [
        {"id": first + i, "piece": p.piece, "score": p.score, "base_ids": ids}
        for i, (p, ids) in enumerate(zip(extension.added, encode_lines(segmenter, texts)))
    ]


def build_report(
    extension: Extension,
    base_path: Path,
    out: Path,
    new_heldout: Sequence[str],
    old_heldout: Sequence[str],
) -> dict:
    """The report dict (see `report.py`); `out` must already hold the extended model."""
    base_sp = processor_from_proto(extension.base, str(base_path))
    extended_sp = processor_from_proto(extension.model, str(out))
    first_new = len(extension.base.pieces)
    new_ids = encode_lines(extended_sp, new_heldout)
    used = {i for ids in new_ids for i in ids if i >= first_new}
    measures = {
        name: (measure(base_sp, lines), measure(extended_sp, lines))
        for name, lines in (("new_text", new_heldout), ("old_text", old_heldout))
    }
    return {
        "base": {
            "path": str(base_path),
            "sha256": sha256_file(base_path),
            "vocab_size": len(extension.base.pieces),
            "model_type": model_type_name(extension.base),
            "byte_fallback": extension.base.trainer_spec.byte_fallback,
        },
        "extended": {"path": str(out), "sha256": sha256_file(out), "vocab_size": len(extension.model.pieces)},
        "donor_vocab_size": extension.donor_vocab_size,
        "pieces_added": len(extension.added),
        "candidates_skipped_unproducible": extension.skipped,
        "added_pieces_used_on_new_text": len(used),
        "bytes_per_token": {name: comparison(*pair) for name, pair in measures.items()},
        "unknown_token_rate": {name: unknown_comparison(*pair) for name, pair in measures.items()},
        "new_pieces": new_piece_entries(extension),
    }


def check_old_text(report: dict, where: Path) -> None:
    old = report["bytes_per_token"]["old_text"]
    if old["change"] < -MAX_OLD_TEXT_LOSS:
        raise TokenizerError(
            f"{where}: not written: old text would drop from {old['before']} to {old['after']} bytes per "
            f"token ({old['change']:+.1%}, more than the {MAX_OLD_TEXT_LOSS:.0%} allowed); "
            "pass a smaller --new-pieces"
        )


def extend_tokenizer(config: ExtendConfig) -> dict:
    """Run the extend command: returns the report it wrote beside `config.out`."""
    started = time.perf_counter()
    base = load_model_proto(config.base)
    check_piece_count(config.new_pieces)
    report_file = report_path(config.out)
    for path in (config.out, report_file):
        refuse_existing(path, config.overwrite)
    new_inputs, old_inputs = (select_inputs(inputs, config.split) for inputs in (config.inputs, config.old_inputs))
    check_split_used(config.split, new_inputs, old_inputs)
    print(f"{new_inputs.describe('--input')}\n{old_inputs.describe('--old-input')}", flush=True)
    with tempfile.TemporaryDirectory(prefix="replaymix-extend-") as scratch_dir:
        scratch = Path(scratch_dir)
        new, old = (
            load_sample(selection.files, config.text_field, scratch / name, train_bytes, config.max_heldout_bytes,
                        config.holdout_fraction, config.address, config.num_cpus)
            # Old text is only measured, never trained on: its sample is the held-out slice alone.
            for name, selection, train_bytes in (("new", new_inputs, config.max_sample_bytes),
                                                 ("old", old_inputs, 0))
        )
        for name, sample in (("--input", new), ("--old-input", old)):
            if sample.heldout_lines == 0:
                raise TokenizerError(
                    f"{name}: its held-out slice ({config.holdout_fraction:.0%} of documents by hash) is empty, "
                    f"so bytes per token cannot be measured; give more documents ({sample.corpus_documents} now)"
                )
        print(new.summary())
        extension = extend_model(base, new.train_file, config.new_pieces, scratch)
        new_heldout, old_heldout = read_lines(new.heldout_file), read_lines(old.heldout_file)
        # Measure before writing: a model that hurts old text must never reach `out`.
        staged = scratch / "extended.model"
        staged.write_bytes(extension.model.SerializeToString())
        report = build_report(extension, config.base, staged, new_heldout, old_heldout)
        check_old_text(report, config.out)
        refuse_existing(config.out, config.overwrite)
        write_atomically(config.out, staged.read_bytes())
    report["extended"]["path"] = str(config.out)
    report["sample"] = {
        "new_train_documents": new.train_documents,
        "new_train_bytes": new.train_bytes,
        "new_heldout_documents": new.heldout_documents,
        "old_heldout_documents": old.heldout_documents,
        "holdout_fraction": config.holdout_fraction,
    }
    write_report(report_file, report)
    gains = report["bytes_per_token"]
    unknown = report["unknown_token_rate"]
    print(
        f"extended {config.base} ({report['base']['vocab_size']}) -> {config.out} "
        f"({report['extended']['vocab_size']}): {report['pieces_added']} pieces added, "
        f"{report['added_pieces_used_on_new_text']} used on held-out new text; bytes/token new "
        f"{gains['new_text']['before']} -> {gains['new_text']['after']} ({gains['new_text']['change']:+.1%}), "
        f"old {gains['old_text']['before']} -> {gains['old_text']['after']} ({gains['old_text']['change']:+.1%}); "
        f"<unk> share new {unknown['new_text']['before']:.2%} -> {unknown['new_text']['after']:.2%}, "
        f"old {unknown['old_text']['before']:.2%} -> {unknown['old_text']['after']:.2%} "
        f"in {time.perf_counter() - started:.1f} s; report {report_file.resolve()}"
    )
    return report
