"""`extend --keep-old-encoding`: new pieces that never change how the old corpus sample is cut.

A new piece can fire on old text: a BPE merge joins two of a word's final tokens where the base had no
merge for them, a unigram piece outscores the base's cut, a byte-level BPE word is taken whole from the
vocabulary. The model then meets old text in ids it was never trained on, and replay in the base's
encoding hides that. With `--keep-old-encoding` the extension is built, the old sample is encoded by it
and by the base, and every new piece found in a line whose ids changed is blocked; the extension is
built again without them (other candidates take their places) until no sample line changes. After
`MAX_REFILL_ROUNDS` rounds the places of blocked pieces are no longer refilled, so the loop ends.

The guarantee is for the sample: held-out old lines keep their ids up to what the sample missed, which
the extension report measures (`old_text_changed_lines`). Both extensions (SentencePiece in
`extend.py`, BPE `tokenizer.json` in `bpe.py`) use this one loop through two callbacks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Generic, Sequence, TypeVar

from pipeline.tokenizer.model_proto import TokenizerError

# Rounds in which a blocked piece's place goes to the next candidate; later rounds only remove pieces.
MAX_REFILL_ROUNDS = 8

Candidate = TypeVar("Candidate")


@dataclass(frozen=True)
class OldSample:
    """The old corpus sample and its ids under the reference (the base, with byte pieces if they were added)."""

    lines: Sequence[str]
    reference_ids: list[list[int]]


@dataclass(frozen=True)
class KeptEncoding:
    """What keeping the old encoding cost, for the report."""

    sample_lines: int
    sample_bytes: int
    changed_without_keeping: int  # sample lines whose ids the unconstrained extension changed
    pieces_blocked: int  # new pieces left out because they changed a sample line's ids
    rounds: int

    def as_report(self) -> dict:
        return {
            "old_sample_lines": self.sample_lines,
            "old_sample_bytes": self.sample_bytes,
            "old_sample_changed_lines_without_keeping": self.changed_without_keeping,
            "old_sample_changed_lines": 0,
            "pieces_blocked": self.pieces_blocked,
            "rounds": self.rounds,
        }


@dataclass(frozen=True)
class Built(Generic[Candidate]):
    """One try: the extension, its whole vocabulary (id -> string) and the old sample's ids under it."""

    extension: Candidate
    pieces: Sequence[str]
    old_ids: list[list[int]]


# (blocked piece strings, at most this many new pieces) -> a try.
Build = Callable[[frozenset, int], Built]


def keep_old_encoding(build: Build, sample: OldSample, first_new: int, limit: int) -> tuple[Candidate, KeptEncoding]:
    """Build extensions, blocking the new pieces that change a sample line, until none does."""
    blocked: set[str] = set()
    count, rounds, changed_first = limit, 0, None
    while True:
        rounds += 1
        built = build(frozenset(blocked), count)
        changed = [i for i, (was, now) in enumerate(zip(sample.reference_ids, built.old_ids)) if was != now]
        if changed_first is None:
            changed_first = len(changed)
        if not changed:
            size = sum(len(line.encode("utf-8")) for line in sample.lines)
            return built.extension, KeptEncoding(len(sample.lines), size, changed_first, len(blocked), rounds)
        fresh = culprits(built, sample, changed, first_new) - blocked
        if not fresh:
            raise TokenizerError(
                f"--keep-old-encoding: {len(changed)} old sample lines change without any new piece to blame "
                f"(first: {sample.lines[changed[0]][:80]!r}); nothing was written"
            )
        blocked |= fresh
        if rounds >= MAX_REFILL_ROUNDS:
            count = len(built.pieces) - first_new - len(fresh)
            if count <= 0:
                raise TokenizerError(
                    "--keep-old-encoding: every new piece changes the ids of some old sample line; nothing was "
                    "written (extend without --keep-old-encoding, or give old text less like the new)"
                )


def culprits(built: Built, sample: OldSample, changed: Sequence[int], first_new: int) -> set[str]:
    """The new pieces behind the changed lines: those in their new ids. SentencePiece BPE may join a new
    piece with a neighbour into an old piece, leaving no new id in the line; then every new piece inside
    a piece the base did not use there is blamed."""
    pieces = built.pieces
    found: set[str] = set()
    for i in changed:
        new = {pieces[t] for t in built.old_ids[i] if t >= first_new}
        if not new:
            before = {pieces[t] for t in sample.reference_ids[i]}
            joined = [pieces[t] for t in built.old_ids[i] if pieces[t] not in before]
            new = {p for p in pieces[first_new:] if any(p in s for s in joined)}
        found |= new
    return found
