"""The extension report: what was added, how each new piece splits under the base, and what it buys.

`extend` writes it as `<out stem>.report.json` beside the extended model. The trainer reads
`new_pieces[].base_ids` to start each new embedding row as the mean of the rows of its base pieces;
`bytes_per_token` shows the effect on held-out new text and held-out old text, and
`unknown_token_rate` the share of their tokens that are `<unk>`, which after extending should be left
only by characters too rare for the donor's character coverage (a byte-fallback model spells those as
bytes instead, so its rate stays 0).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import sentencepiece as spm

from pipeline.tokenizer.model_proto import TokenizerError

# Lines are encoded in batches: one call per line is slow, one huge string slower still.
ENCODE_BATCH = 4096


@dataclass(frozen=True)
class TextMeasure:
    """Held-out text cut by one model."""

    lines: int
    bytes: int  # UTF-8 bytes of the lines, newlines not counted
    tokens: int
    unknown: int  # tokens that are <unk>: text the model cannot represent, lost on decoding

    @property
    def bytes_per_token(self) -> float:
        return self.bytes / self.tokens if self.tokens else 0.0


def encode_lines(processor: spm.SentencePieceProcessor, lines: Sequence[str]) -> list[list[int]]:
    ids: list[list[int]] = []
    for start in range(0, len(lines), ENCODE_BATCH):
        ids.extend(processor.encode(list(lines[start : start + ENCODE_BATCH])))
    return ids


def measure(processor: spm.SentencePieceProcessor, lines: Sequence[str]) -> TextMeasure:
    """Bytes and tokens of `lines` under `processor` (no BOS/EOS: they cost the same in both models)."""
    encoded = encode_lines(processor, lines)
    tokens = sum(len(ids) for ids in encoded)
    unknown = sum(ids.count(processor.unk_id()) for ids in encoded)
    return TextMeasure(len(lines), sum(len(line.encode("utf-8")) for line in lines), tokens, unknown)


def comparison(before: TextMeasure, after: TextMeasure) -> dict:
    """The report's entry for one held-out text: bytes per token before and after, and the change."""
    return {
        "before": round(before.bytes_per_token, 4),
        "after": round(after.bytes_per_token, 4),
        "change": round(after.bytes_per_token / before.bytes_per_token - 1, 4) if before.tokens else 0.0,
        "lines": before.lines,
        "bytes": before.bytes,
        "tokens_before": before.tokens,
        "tokens_after": after.tokens,
    }


def unknown_comparison(before: TextMeasure, after: TextMeasure) -> dict:
    """The report's `unknown_token_rate` entry for one held-out text (token counts are in its
    `bytes_per_token` entry)."""
    return {
        "before": round(before.unknown / before.tokens, 6) if before.tokens else 0.0,
        "after": round(after.unknown / after.tokens, 6) if after.tokens else 0.0,
        "unknown_before": before.unknown,
        "unknown_after": after.unknown,
    }


def report_path(model_out: str | Path) -> Path:
    """`extended.model` -> `extended.report.json`, in the same folder."""
    model_out = Path(model_out)
    return model_out.with_name(model_out.stem + ".report.json")


@dataclass(frozen=True)
class ExtensionReport:
    """The parts of the report a consumer needs, read back with the fields checked."""

    base_vocab_size: int
    extended_vocab_size: int
    new_pieces: tuple[tuple[int, str, tuple[int, ...]], ...]  # (id, piece, base_ids)
    raw: dict

    @property
    def base_ids(self) -> dict[int, list[int]]:
        """New piece id -> its ids under the base tokenizer."""
        return {piece_id: list(ids) for piece_id, _, ids in self.new_pieces}


def load_extension_report(path: str | Path) -> ExtensionReport:
    """Read and check an extension report; raises TokenizerError naming the file and the bad field."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise TokenizerError(f"{path}: no such report; `python -m pipeline.tokenizer extend` writes it") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{path}: not valid JSON ({e}); re-run `python -m pipeline.tokenizer extend`") from e
    try:
        base, extended = int(raw["base"]["vocab_size"]), int(raw["extended"]["vocab_size"])
        pieces = tuple(
            (int(p["id"]), str(p["piece"]), tuple(int(i) for i in p["base_ids"])) for p in raw["new_pieces"]
        )
    except (KeyError, TypeError, ValueError) as e:
        raise TokenizerError(
            f"{path}: field {e} missing or malformed; expected base.vocab_size, extended.vocab_size and "
            "new_pieces[{id, piece, base_ids}]"
        ) from e
    ids = [piece_id for piece_id, _, _ in pieces]
    if ids != list(range(base, extended)):
        raise TokenizerError(f"{path}: new_pieces ids are not exactly {base}..{extended - 1} in order")
    for piece_id, piece, base_ids in pieces:
        if not base_ids or not all(0 <= i < base for i in base_ids):
            raise TokenizerError(
                f"{path}: new_pieces id {piece_id} ({piece!r}): base_ids {list(base_ids)} must be non-empty "
                f"ids below the base vocabulary size {base}"
            )
    return ExtensionReport(base, extended, pieces, raw)


def write_report(path: Path, report: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(path)
