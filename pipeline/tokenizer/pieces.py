"""Choosing which of a donor model's pieces to append to a base model, and with what scores.

The donor is a model of the same type trained on the new corpus (normalized as the base normalizes).
Its pieces that the base lacks are candidates. Single characters come first, all of them, and count
against the limit: a character missing from the model encodes as `<unk>` wherever it appears, and a
BPE donor lists its characters last, below every merge, so taking its top N pieces would leave the new
script's letters unknown. The limit stays a hard cap on how much the vocabulary grows (it sizes the
embedding matrix); one too small to hold the characters is refused. Longer candidates follow in the
donor's own order (merge rank for BPE, log-probability for unigram). A candidate is kept only if the
extended model, cutting the candidate's own text, produces exactly that piece: a piece the model can
never produce would waste an id.

Scores:
- BPE: a score is a merge priority. New pieces score below every base piece, in donor order, so on any
  text the extended model first performs every merge the base would and only then the new ones. Each
  merge removes a token, so old text can never take more tokens than under the base. The new
  characters score highest among the new pieces: SentencePiece never uses a character's score (text
  starts out as characters), but converters that rebuild a merge list from scores and ids, such as
  Hugging Face's, need both halves of a merge to exist before it.
- Unigram: a score is a log-probability; new pieces keep the donor's, which is the same scale.
"""

from __future__ import annotations

from typing import Sequence

from pipeline.tokenizer.model_proto import (
    BYTE_PIECE,
    ModelProto,
    NewPiece,
    PieceType,
    TokenizerError,
    append_pieces,
    model_type_name,
    piece_text,
    verbatim_processor,
)

SUPPORTED_MODEL_TYPES = ("bpe", "unigram")
# Pieces are validated in batches: a batch a bit larger than the remaining budget absorbs rejects
# without one model rebuild per rejected piece.
MIN_BATCH = 64


def check_piece_count(limit: int) -> None:
    if limit <= 0:
        raise TokenizerError(f"--new-pieces {limit}: must be a positive number of pieces to add")


def candidate_pieces(base: ModelProto, donor: ModelProto) -> list[NewPiece]:
    """The donor's ordinary pieces that the base lacks, best first, with the donor's scores."""
    taken = {p.piece for p in base.pieces}  # NORMAL, USER_DEFINED and UNUSED share one lookup table
    fresh = [
        NewPiece(p.piece, p.score)
        for p in donor.pieces
        if p.type == PieceType.NORMAL and p.piece not in taken and not BYTE_PIECE.match(p.piece)
    ]
    return sorted(fresh, key=lambda p: -p.score)  # stable: equal scores keep the donor's id order


def is_character(piece: NewPiece) -> bool:
    return len(piece.piece) == 1


def scored_for_base(base: ModelProto, pieces: Sequence[NewPiece]) -> list[NewPiece]:
    """The scores the pieces get in the extended model (see the module docstring for why)."""
    if model_type_name(base) == "unigram":
        return list(pieces)
    floor = min(p.score for p in base.pieces if p.type in (PieceType.NORMAL, PieceType.USER_DEFINED))
    return [NewPiece(p.piece, floor - 1.0 - rank) for rank, p in enumerate(pieces)]


def producible(base: ModelProto, pieces: Sequence[NewPiece]) -> list[bool]:
    """For each appended piece: does the extended model cut the piece's own text into just that piece?"""
    extended = append_pieces(base, scored_for_base(base, pieces))
    processor = verbatim_processor(extended)
    texts = [piece_text(extended, p.piece) for p in pieces]
    first_new = len(base.pieces)
    return [ids == [first_new + i] for i, ids in enumerate(processor.encode(texts))]


def choose_pieces(
    base: ModelProto, donor: ModelProto, limit: int, blocked: frozenset[str] = frozenset()
) -> tuple[list[NewPiece], int]:
    """Every donor character the base lacks, then longer candidates that the extended model produces,
    `limit` pieces at most, scored for the base; returns them and how many candidates were skipped as
    unproducible. `blocked` pieces are never chosen (`--keep-old-encoding`: they change old text).

    Raises TokenizerError when `limit` is not positive, exceeds the candidates the donor offers, or
    cannot hold the donor's characters.
    """
    kind = model_type_name(base)
    if kind not in SUPPORTED_MODEL_TYPES:
        raise TokenizerError(f"base model type is {kind!r}; extend supports {', '.join(SUPPORTED_MODEL_TYPES)}")
    check_piece_count(limit)
    offered = candidate_pieces(base, donor)
    candidates = [p for p in offered if p.piece not in blocked]
    if limit > len(offered):
        raise TokenizerError(
            f"--new-pieces {limit}: the new corpus yields only {len(offered)} pieces the base lacks "
            f"(donor model of {len(donor.pieces)} pieces); pass --new-pieces {len(offered)} or less, "
            "or give more new text"
        )
    characters = [p for p in candidates if is_character(p)]
    if limit < len(characters):
        raise TokenizerError(
            f"--new-pieces {limit}: the new text has {len(characters)} characters the base lacks "
            f"(such as {' '.join(p.piece for p in characters[:10])}) and each must be added, or text with it "
            f"loses it to <unk>; pass --new-pieces {len(characters)} or more"
        )
    longer = [p for p in candidates if not is_character(p)]
    # A character is always producible (it is where segmentation starts), so none is ever dropped below.
    accepted: list[NewPiece] = characters
    next_candidate, skipped = 0, 0
    while len(accepted) < limit and next_candidate < len(longer):
        batch_size = max(limit - len(accepted), MIN_BATCH)
        trial = accepted + longer[next_candidate : next_candidate + batch_size]
        next_candidate += batch_size
        # Dropping a piece can strand pieces built on it, so re-check until every survivor is producible.
        while not all(keep := producible(base, trial)):
            skipped += keep.count(False)
            trial = [p for p, ok in zip(trial, keep) if ok]
        # Cutting from the end is safe: a later piece never helps an earlier one get produced.
        accepted = trial[:limit]
    return scored_for_base(base, accepted), skipped
