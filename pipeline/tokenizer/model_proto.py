"""Reading, appending to and checking SentencePiece `ModelProto`s.

A `.model` file is a serialized `ModelProto`: a list of pieces (string, score, type) whose position is
the token id, plus the normalizer and trainer settings that decide how text is cut. Extending a
tokenizer means appending pieces to that list and nothing else, so every old id keeps its piece.
This module is the only place that touches the proto; it assumes nothing about who trained the model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import sentencepiece as spm
from google.protobuf.message import DecodeError
from sentencepiece import sentencepiece_model_pb2 as model_pb2

from pipeline.errors import PipelineError

ModelProto = model_pb2.ModelProto
PieceType = model_pb2.ModelProto.SentencePiece.Type  # NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE
BYTE_PIECE = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")
WHITESPACE = "\u2581"  # how SentencePiece writes a space inside a piece


class TokenizerError(PipelineError):
    """A tokenizer file or option is unusable; the message names the file or flag and what to do."""


@dataclass(frozen=True)
class NewPiece:
    """A piece to append: its string as stored in the model and the score it gets there."""

    piece: str
    score: float


def load_model_proto(path: str | Path) -> ModelProto:
    """Parse a `.model` file, raising TokenizerError when it is not a loadable SentencePiece model."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise TokenizerError(f"{path}: cannot read the tokenizer model ({e.strerror}); check the path") from e
    return parse_model_proto(data, where=str(path))


def parse_model_proto(data: bytes, where: str = "<bytes>") -> ModelProto:
    proto = ModelProto()
    try:
        proto.ParseFromString(data)
    except DecodeError as e:
        raise TokenizerError(
            f"{where}: not a SentencePiece model ({e}); pass the `.model` file written by "
            "spm_train / SentencePieceTrainer (not the `.vocab` file, not a Hugging Face tokenizer.json)"
        ) from e
    if len(proto.pieces) == 0:
        raise TokenizerError(
            f"{where}: parses as protobuf but holds no pieces, so it is not a SentencePiece model; "
            "pass the `.model` file written by spm_train / SentencePieceTrainer"
        )
    processor_from_proto(proto, where)  # sentencepiece's own checks (duplicates, byte pieces, ...)
    return proto


def processor_from_proto(proto: ModelProto, where: str = "<model>") -> spm.SentencePieceProcessor:
    try:
        return spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
    except RuntimeError as e:
        raise TokenizerError(f"{where}: sentencepiece refuses to load the model: {e}") from e


def model_type_name(proto: ModelProto) -> str:
    """'bpe', 'unigram', 'char' or 'word'."""
    return model_pb2.TrainerSpec.ModelType.Name(proto.trainer_spec.model_type).lower()


def append_pieces(base: ModelProto, pieces: Sequence[NewPiece]) -> ModelProto:
    """A copy of `base` with `pieces` appended as NORMAL pieces; ids 0..V-1 are untouched."""
    extended = ModelProto()
    extended.CopyFrom(base)
    for new in pieces:
        entry = extended.pieces.add()
        entry.piece, entry.score, entry.type = new.piece, new.score, PieceType.NORMAL
    extended.trainer_spec.vocab_size = len(extended.pieces)
    return extended


def byte_piece(byte: int) -> str:
    return f"<0x{byte:02X}>"


def has_byte_fallback(proto: ModelProto) -> bool:
    return proto.trainer_spec.byte_fallback


def with_byte_fallback(base: ModelProto, where: str = "base model") -> ModelProto:
    """A copy of `base` (which has no byte fallback) with the 256 byte pieces appended after every old id
    and byte fallback switched on: a character outside the pieces is then spelled as its UTF-8 bytes
    instead of `<unk>`. sentencepiece finds byte pieces by their string, wherever they stand, so no id
    moves; only text that held `<unk>` is cut differently."""
    taken = {p.piece for p in base.pieces}
    clashing = [byte_piece(b) for b in range(256) if byte_piece(b) in taken]
    if clashing:
        raise TokenizerError(
            f"{where}: already has pieces named like byte pieces ({', '.join(clashing[:3])}) but no byte "
            "fallback; byte fallback cannot be added to it: extend without --byte-fallback"
        )
    extended = ModelProto()
    extended.CopyFrom(base)
    for b in range(256):
        entry = extended.pieces.add()
        entry.piece, entry.score, entry.type = byte_piece(b), 0.0, PieceType.BYTE
    extended.trainer_spec.byte_fallback = True
    extended.trainer_spec.vocab_size = len(extended.pieces)
    processor_from_proto(extended, f"{where} with byte fallback added")  # sentencepiece's own checks
    return extended


def verbatim_processor(proto: ModelProto) -> spm.SentencePieceProcessor:
    """The model with normalization switched off, to segment strings that are already normalized.

    Pieces are stored normalized (spaces as '▁', no dummy prefix added yet), so asking "how does this
    model cut this piece?" must skip normalization, or a piece without '▁' would gain a dummy prefix.
    """
    raw = ModelProto()
    raw.CopyFrom(proto)
    spec = raw.normalizer_spec
    spec.name, spec.precompiled_charsmap = "identity", b""
    spec.add_dummy_prefix, spec.remove_extra_whitespaces = False, False
    return processor_from_proto(raw, "verbatim copy of the model")


def piece_text(proto: ModelProto, piece: str) -> str:
    """The text a piece stands for, as the model's encoder sees it before escaping whitespace."""
    return piece.replace(WHITESPACE, " ") if proto.normalizer_spec.escape_whitespaces else piece


def check_ids_stable(base: ModelProto, extended: ModelProto, where: str = "extended model") -> None:
    """Raise TokenizerError unless ids 0..V-1 of `extended` are exactly the base's pieces.

    Compares the protos entry by entry and then what sentencepiece itself reports after loading both,
    so a model that only looks right on paper (say a duplicate piece that shadows another) is caught.
    """
    size = len(base.pieces)
    if len(extended.pieces) < size:
        raise TokenizerError(f"{where}: {len(extended.pieces)} pieces, fewer than the base's {size}")
    for i in range(size):
        old, new = base.pieces[i], extended.pieces[i]
        if (old.piece, old.type, old.score) != (new.piece, new.type, new.score):
            raise TokenizerError(
                f"{where}: id {i} is {new.piece!r} (type {new.type}, score {new.score}) but the base has "
                f"{old.piece!r} (type {old.type}, score {old.score}); old token ids would change meaning"
            )
    old_sp, new_sp = processor_from_proto(base, "base model"), processor_from_proto(extended, where)
    if new_sp.vocab_size() != len(extended.pieces):
        raise TokenizerError(f"{where}: loads with {new_sp.vocab_size()} ids, not {len(extended.pieces)}")
    for name in ("unk_id", "bos_id", "eos_id", "pad_id"):
        if getattr(old_sp, name)() != getattr(new_sp, name)():
            raise TokenizerError(f"{where}: {name} is {getattr(new_sp, name)()}, base has {getattr(old_sp, name)()}")
    kinds = ("is_unknown", "is_control", "is_unused", "is_byte")
    for i in range(size):
        if old_sp.id_to_piece(i) != new_sp.id_to_piece(i) or any(
            getattr(old_sp, k)(i) != getattr(new_sp, k)(i) for k in kinds
        ):
            raise TokenizerError(
                f"{where}: after loading, id {i} is {new_sp.id_to_piece(i)!r} but the base's is "
                f"{old_sp.id_to_piece(i)!r}; old token ids would change meaning"
            )
    for piece_id in range(size, len(extended.pieces)):
        if new_sp.piece_to_id(extended.pieces[piece_id].piece) != piece_id:
            raise TokenizerError(
                f"{where}: new piece {extended.pieces[piece_id].piece!r} at id {piece_id} is shadowed by id "
                f"{new_sp.piece_to_id(extended.pieces[piece_id].piece)}"
            )
