"""The extension report: what was added, how each new piece splits under the base, and what it buys.

`extend` writes it as `<out stem>.report.json` beside an extended `.model`, or as
`extension_report.json` inside an extended Hugging Face folder (`report_path`); `ExtensionReport.load` is
its one reader. The trainer uses `new_pieces[].base_ids` to start each new embedding row as the mean
of the rows of its base pieces;
`bytes_per_token` shows the effect on held-out new text and held-out old text, and
`unknown_token_rate` the share of their tokens that are `<unk>`, which after extending should be left
only by characters too rare for the donor's character coverage (a byte-fallback model spells those as
bytes instead, so its rate stays 0). `unknown_characters` counts the held-out characters lost to `<unk>`
(or dropped without one) and says whether any character can be (`possible`: the extension has no byte fallback), so a 0 on the
held-out text is never read as "none ever". `keep_old_encoding` records what `--keep-old-encoding` cost.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

from pipeline.atomic_file import write_atomically
from pipeline.tokenizer.model_proto import TokenizerError

if TYPE_CHECKING:
    from pipeline.tokenizer.load import TokenizerSpec

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


# A batch encoder: texts -> the ids of each, no BOS/EOS (`TokenizerSpec.encoder()`, or a SentencePiece
# processor's `encode`).
Encode = Callable[[Sequence[str]], list[list[int]]]


def encode_lines(encode: Encode, lines: Sequence[str]) -> list[list[int]]:
    ids: list[list[int]] = []
    for start in range(0, len(lines), ENCODE_BATCH):
        ids.extend(encode(list(lines[start : start + ENCODE_BATCH])))
    return ids


def measure(encode: Encode, unk_id: int, lines: Sequence[str]) -> TextMeasure:
    """Bytes and tokens of `lines` (no BOS/EOS: they cost the same in both tokenizers)."""
    encoded = encode_lines(encode, lines)
    tokens = sum(len(ids) for ids in encoded)
    unknown = sum(ids.count(unk_id) for ids in encoded) if unk_id >= 0 else 0
    return TextMeasure(len(lines), sum(len(line.encode("utf-8")) for line in lines), tokens, unknown)


def differing(before: Encode, after: Encode, lines: Sequence[str]) -> list[bool]:
    """For each line, whether the two encoders give it other ids."""
    return [a != b for a, b in zip(encode_lines(before, lines), encode_lines(after, lines))]


def changed_lines(before: Encode, after: Encode, lines: Sequence[str], examples: int = 3) -> dict:
    """How many of `lines` get other ids from `after` than from `before`, with the first few of them."""
    changed = [line for line, differs in zip(lines, differing(before, after, lines)) if differs]
    return {
        "lines": len(lines),
        "changed": len(changed),
        "share": round(len(changed) / len(lines), 6) if lines else 0.0,
        "examples": [line[:200] for line in changed[:examples]],
    }


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


def share(count: int, total: int) -> float:
    """count / total to 6 decimals, or 3 significant digits below that: a rare <unk> shows as 1.2e-07,
    never as 0."""
    if not total:
        return 0.0
    rounded = round(count / total, 6)
    return rounded if rounded or not count else float(f"{count / total:.3g}")


def unknown_comparison(before: TextMeasure, after: TextMeasure) -> dict:
    """The report's `unknown_token_rate` entry for one held-out text (token counts are in its
    `bytes_per_token` entry)."""
    return {
        "before": share(before.unknown, before.tokens),
        "after": share(after.unknown, after.tokens),
        "unknown_before": before.unknown,
        "unknown_after": after.unknown,
    }


def lost_characters(spec: "TokenizerSpec", counts: Counter) -> Counter:
    """Of `counts` (character -> occurrences), the characters a tokenizer loses: cut into <unk>, or into
    nothing that decodes back to text (a `tokenizers` BPE without an unk token drops what it cannot spell,
    as transformers' conversion of a SentencePiece model without byte fallback does). Each character is
    encoded alone: a character the vocabulary lacks is lost wherever it stands."""
    characters = [c for c in sorted(counts) if not c.isspace()]
    ids = encode_lines(spec.encoder(), characters)
    decoded = spec.decoder()(ids) if characters else []
    return Counter({
        c: counts[c] for c, cut, text in zip(characters, ids, decoded)
        if (spec.unk_id >= 0 and spec.unk_id in cut) or not text.strip()
    })


def unknown_characters(base: "TokenizerSpec", extended: "TokenizerSpec", lines: Sequence[str]) -> dict:
    """The report's `unknown_characters` entry for one held-out text: characters lost (see `lost_characters`)
    under the base and the extension, and the commonest of those the extension still loses."""
    counts = Counter(c for line in lines for c in line)
    lost_before, lost_after = lost_characters(base, counts), lost_characters(extended, counts)
    return {
        "characters": sum(counts.values()),
        "unknown_before": sum(lost_before.values()),
        "unknown_after": sum(lost_after.values()),
        "distinct_unknown_after": len(lost_after),
        "examples_after": [c for c, _ in lost_after.most_common(10)],
    }


FOLDER_REPORT_NAME = "extension_report.json"


def report_path(out: str | Path, folder: bool) -> str | Path:
    """Where `extend` writes the report: inside an extended Hugging Face folder (`DIR/extension_report.json`,
    so the tokenizer and its report travel together), or beside an extended `.model`
    (`extended.model` -> `extended.report.json`). A store URI stays a string (a Path folds its `//`)."""
    from pipeline.storage import is_uri

    if is_uri(out):
        text = str(out).rstrip("/")
        if folder:
            return f"{text}/{FOLDER_REPORT_NAME}"
        return (text[: -len(".model")] if text.endswith(".model") else text) + ".report.json"
    out = Path(out)
    return out / FOLDER_REPORT_NAME if folder else out.with_name(out.stem + ".report.json")


class ExtensionReportError(TokenizerError):
    """An extension report is unreadable or malformed, or does not fit the model it is applied to; the
    message names the file and the field."""


@dataclass(frozen=True)
class AddedPiece:
    """One appended piece as the report records it."""

    id: int  # its id in the extended model
    piece: str
    base_ids: tuple[int, ...]  # how the base tokenizer cuts it: never empty


@dataclass(frozen=True)
class ExtensionReport:
    """The parts of the report a consumer needs, checked; `raw` is the whole report as written."""

    base_vocab_size: int
    extended_vocab_size: int
    new_pieces: tuple[AddedPiece, ...]  # ids base_vocab_size..extended_vocab_size - 1, in order
    raw: dict

    @property
    def base_ids(self) -> dict[int, tuple[int, ...]]:
        """New piece id -> its ids under the base tokenizer."""
        return {p.id: p.base_ids for p in self.new_pieces}

    @classmethod
    def load(cls, path: str | Path) -> "ExtensionReport":
        """Read and check a report; raises ExtensionReportError naming the file and the bad field.

        The one reader of the report (the tokenizer's tests and the trainer's vocabulary growth both use
        it), with the stricter of the rules two readers once applied: new_pieces ids are exactly
        base..extended-1, in order and each once, and every `base_ids` is a NON-EMPTY list of ids below
        the base vocabulary size. `extend` never writes an empty one (every piece has a character, and
        the base cuts any character into at least one id, `<unk>` or bytes), so an empty list means a
        damaged or hand-made report; growing from it (the mean of all rows) would hide that.
        """
        path = Path(path)
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as e:
            raise ExtensionReportError(
                f"{path}: no such report; pass the <model>.report.json that `python -m pipeline.tokenizer extend` "
                "wrote beside the extended model"
            ) from e
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ExtensionReportError(
                f"{path}: not readable as JSON ({e}); re-run `python -m pipeline.tokenizer extend`"
            ) from e
        try:
            base = _integer(raw["base"]["vocab_size"], "base.vocab_size")
            extended = _integer(raw["extended"]["vocab_size"], "extended.vocab_size")
            pieces = tuple(
                AddedPiece(
                    _integer(p["id"], "new_pieces[].id"),
                    _string(p["piece"], "new_pieces[].piece"),
                    tuple(_integer(i, "new_pieces[].base_ids[]") for i in p["base_ids"]),
                )
                for p in raw["new_pieces"]
            )
        except (KeyError, TypeError, ValueError) as e:
            problem = f"field {e} is missing" if isinstance(e, KeyError) else f"malformed ({e})"
            raise ExtensionReportError(
                f"{path}: {problem}; expected base.vocab_size, extended.vocab_size and "
                "new_pieces[{id, piece, base_ids}]"
            ) from e
        _check_ids(path, base, extended, [p.id for p in pieces])
        for p in pieces:
            if not p.base_ids:
                raise ExtensionReportError(f"{path}: new_pieces id {p.id} ({p.piece!r}): base_ids is empty")
            outside = [i for i in p.base_ids if not 0 <= i < base]
            if outside:
                raise ExtensionReportError(
                    f"{path}: new_pieces id {p.id} ({p.piece!r}): base_ids {outside} are outside the base "
                    f"vocabulary of {base}"
                )
        return cls(base, extended, pieces, raw)


def _integer(value: object, field: str) -> int:
    # JSON `true` is a bool, which is an int to Python; int() would quietly take floats and strings too.
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{field} is {value!r}, not an integer")
    return value


def _string(value: object, field: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{field} is {value!r}, not a string")
    return value


def _check_ids(path: Path, base: int, extended: int, ids: list[int]) -> None:
    expected = list(range(base, extended))
    if ids != expected:
        missing, unexpected = sorted(set(expected) - set(ids)), sorted(set(ids) - set(expected))
        problem = (
            f"missing {missing[:5]}, unexpected {unexpected[:5]}" if missing or unexpected
            else "some repeated or out of order"
        )
        raise ExtensionReportError(f"{path}: new_pieces ids must be exactly {base}..{extended - 1} in order; {problem}")


def write_report(path: Path, report: dict) -> None:
    write_atomically(path, json.dumps(report, indent=2, ensure_ascii=False) + "\n")
