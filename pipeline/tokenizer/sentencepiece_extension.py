"""Extending a SentencePiece model: a donor trained on the new text, its pieces appended after every old id.

1. Normalize the new text exactly as the base does (its own normalizer, whatever it is) and train a donor
   model of the base's type on it, with the base's splitting rules and user-defined symbols.
2. Choose up to N donor pieces the base lacks: every character, then longer pieces the extended model
   actually produces (`pieces.py`); with `--keep-old-encoding` none that changes how the old sample is
   cut (`old_encoding.py`).
3. Append them (after the 256 byte pieces, when `--byte-fallback` adds them to a base without) and check
   that ids 0..V-1 are unchanged.
`extend.py` runs this for a `.model` or a folder's `tokenizer.model`, and measures and writes the result.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from pipeline.tokenizer.model_proto import (
    ModelProto,
    NewPiece,
    PieceType,
    append_pieces,
    byte_piece,
    check_ids_stable,
    has_byte_fallback,
    model_type_name,
    piece_text,
    processor_from_proto,
    verbatim_processor,
    with_byte_fallback,
)
from pipeline.tokenizer.old_encoding import Built, KeptEncoding, OldSample, keep_old_encoding
from pipeline.tokenizer.pieces import check_piece_count, choose_pieces
from pipeline.tokenizer.report import Encode, encode_lines
from pipeline.tokenizer.sample import read_lines
from pipeline.tokenizer.train import train_sentencepiece

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
class Extension:
    """An extended model and how it was made."""

    base: ModelProto
    model: ModelProto
    added: list[NewPiece]  # the donor's pieces, after `reference`'s ids
    skipped: int  # candidates dropped because the extended model would never produce them
    donor_vocab_size: int
    reference: ModelProto | None = None  # the base with byte pieces appended, when they were; else None
    kept: KeptEncoding | None = None  # with --keep-old-encoding

    @property
    def start(self) -> ModelProto:
        """The model the donor's pieces are appended to: the base, or the base with byte fallback added."""
        return self.reference if self.reference is not None else self.base


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


def extend_model(
    base: ModelProto,
    new_text: Path,
    new_pieces: int,
    scratch: Path,
    byte_fallback: bool = False,
    old_lines: Sequence[str] | None = None,
    encoder_of: Callable[[ModelProto], Encode] | None = None,
) -> Extension:
    """Train a donor on `new_text` (lines) and append up to `new_pieces` of its pieces to `base`.

    `byte_fallback`: a base without it first gets the 256 byte pieces (`with_byte_fallback`). `old_lines`
    (`--keep-old-encoding`): no piece that changes how they are cut is appended (`old_encoding.py`), cut
    by `encoder_of(model)`: the encoder the tokenizer's users get (sentencepiece's own by default).
    """
    check_piece_count(new_pieces)  # before the donor's training, which is the slow part
    reference = with_byte_fallback(base) if byte_fallback and not has_byte_fallback(base) else None
    start = reference if reference is not None else base
    kind = model_type_name(base)
    normalized = scratch / "donor-input.txt"
    normalize_file(base, new_text, normalized)
    # The donor offers more than N pieces: some it shares with the base, some prove unproducible.
    donor_bytes = train_sentencepiece(
        normalized, len(base.pieces) + new_pieces, kind, fit_vocab=True, **donor_options(base)
    )
    donor = ModelProto()
    donor.ParseFromString(donor_bytes)
    kept = None
    if old_lines is None:
        added, skipped = choose_pieces(start, donor, new_pieces)
    else:
        old_lines = list(old_lines)
        encoder_of = encoder_of or (lambda model: processor_from_proto(model, "extended model").encode)
        sample = OldSample(old_lines, encode_lines(encoder_of(start), old_lines))

        def build(blocked: frozenset, limit: int) -> Built:
            chosen = choose_pieces(start, donor, limit, blocked)
            model = append_pieces(start, chosen[0])
            return Built(chosen, [p.piece for p in model.pieces], encode_lines(encoder_of(model), old_lines))

        (added, skipped), kept = keep_old_encoding(build, sample, len(start.pieces), new_pieces)
    extended = append_pieces(start, added)
    check_ids_stable(base, extended)
    return Extension(base, extended, added, skipped, len(donor.pieces), reference, kept)


def new_piece_entries(extension: Extension) -> list[dict]:
    """Each new piece with its id and its segmentation under the base (for embedding initialisation):
    byte pieces (when byte fallback was added) first, then the donor's pieces."""
    segmenter = verbatim_processor(extension.base)
    first = len(extension.start.pieces)
    texts = [piece_text(extension.base, p.piece) for p in extension.added]
    return byte_piece_entries(extension) + [
        {"id": first + i, "piece": p.piece, "score": p.score, "base_ids": ids}
        for i, (p, ids) in enumerate(zip(extension.added, encode_lines(segmenter.encode, texts)))
    ]


def byte_piece_entries(extension: Extension) -> list[dict]:
    """The appended byte pieces, if any. An ASCII byte's row starts as the base's piece for that character;
    any other byte stood for text the base lost to <unk>, so its row starts as the <unk> row."""
    if extension.reference is None:
        return []
    segmenter = verbatim_processor(extension.base)
    unk = segmenter.unk_id()
    first = len(extension.base.pieces)
    entries = []
    for byte in range(256):
        ids = segmenter.encode(chr(byte)) if byte < 0x80 else []
        entries.append({"id": first + byte, "piece": byte_piece(byte), "score": 0.0, "base_ids": ids or [unk]})
    return entries
