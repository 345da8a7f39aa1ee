"""Datasets of one mix tokenized by a base tokenizer and by its extension: said once, with what it means.

Such a mix is allowed (an extension only appends ids, so every id means the same piece in both), and
is what replay with an extended tokenizer looks like: new text tokenized by the extension, old text
often left as it was tokenized by the base. But the extension may cut old text otherwise than the base
did (a new merge or piece fires on it), so the old dataset then replays old text in an encoding the model
will never meet once it reads text through the extension, and the forgetting it measures is not the
forgetting the model will show. `find_encoding_mixes` finds each such pair from the datasets' own
tokenizer records (`pipeline/FORMAT.md`: the tokenizer copy and its `source_path`) and takes the share of
held-out old lines the extension encodes differently from the extension's report
(`old_text_changed_lines`), found beside the tokenizer the extended dataset was made with; without a
report the share is said to be unknown. `warn_encoding_mixes` is the one warning, called where a mix is
opened: the service's start-up and the trainer's in-process mixer.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from typing import Mapping, TextIO

from pipeline import storage
from pipeline.dataset import TokenDataset
from pipeline.errors import PipelineError
from pipeline.tokenizer.report import FOLDER_REPORT_NAME, report_path


@dataclass(frozen=True)
class EncodingMix:
    """Two datasets of a mix: one tokenized by a base tokenizer, one by an extension of it."""

    base: str  # the dataset names
    extended: str
    base_vocab_size: int
    extended_vocab_size: int
    report: str | None  # the extension report the share was read from
    changed_lines: int | None  # held-out old lines the extension encodes differently, of...
    lines: int | None  # ...this many (None: no report found)
    kept: bool = False  # the extension was made with --keep-old-encoding
    looked_at: tuple[str, ...] = ()  # where a report was looked for, when none was found

    @property
    def changed_share(self) -> float | None:
        return self.changed_lines / self.lines if self.lines else None

    def message(self) -> str:
        """The warning line (without its `warning: ` prefix)."""
        head = (f"datasets {self.base!r} and {self.extended!r} mix two encodings: {self.extended!r} is tokenized by "
                f"an extension ({self.extended_vocab_size} ids) of the tokenizer of {self.base!r} "
                f"({self.base_vocab_size} ids)")
        if self.changed_share is None:
            where = f" ({', '.join(self.looked_at)})" if self.looked_at else ""
            share = (f"the share of old-text lines the extension encodes differently is unknown: no extension "
                     f"report found{where}")
        else:
            kept = ", made with --keep-old-encoding" if self.kept else ""
            share = (f"the extension encodes {self.changed_share:.1%} of held-out old-text lines differently "
                     f"({self.changed_lines}/{self.lines}, report {self.report}{kept})")
        return (f"{head}; {share}; {self.base!r} replays old text in the base's encoding, which the model will not "
                f"meet through the extension where they differ; re-tokenize {self.base!r} with the extension to "
                "replay in its encoding")


def _identity(dataset: TokenDataset) -> tuple[str, ...]:
    """The tokenizer as its files' hashes: equal for datasets made with the same tokenizer files."""
    return tuple(sorted(dataset.tokenizer.files.values()))


def _vocabulary(dataset: TokenDataset) -> list[str | None]:
    from pipeline.tokenizer.load import load_tokenizer, vocabulary_pieces

    return vocabulary_pieces(load_tokenizer(dataset.tokenizer_path))


def extends(base: list[str | None], extended: list[str | None]) -> bool:
    """Whether `extended` is `base` with ids appended."""
    return len(extended) > len(base) and extended[: len(base)] == base


def report_candidates(dataset: TokenDataset) -> list[str]:
    """Where the extension report of a dataset's tokenizer may be: beside the `.model` the dataset was made
    with (`x.model` -> `x.report.json`), or inside the folder; and in the dataset's own tokenizer copy."""
    source = dataset.tokenizer.source_path
    folder = not source.endswith(".model")
    candidates = [str(report_path(source, folder=folder))]
    if dataset.location.is_local:
        candidates.append(str(dataset.root / dataset.tokenizer.folder / FOLDER_REPORT_NAME))
    return candidates


def read_report(dataset: TokenDataset) -> tuple[str | None, dict | None, tuple[str, ...]]:
    """(where, report) of the extension report that belongs to the dataset's tokenizer (its extended files'
    hashes are the dataset's), or (None, None, the places looked at)."""
    looked = []
    for candidate in report_candidates(dataset):
        looked.append(candidate)
        try:
            report = json.loads(storage.read_bytes(storage.parse_location(candidate)))
            hashes = tuple(sorted(report["extended"]["files_sha256"].values()))
        except (OSError, PipelineError, ValueError, KeyError, TypeError, AttributeError, storage.MissingObject):
            continue
        if hashes == _identity(dataset):
            return candidate, report, ()
    return None, None, tuple(looked)


def find_encoding_mixes(datasets: Mapping[str, TokenDataset]) -> list[EncodingMix]:
    """Every (base, extension) pair among the datasets, by name order."""
    names = sorted(datasets)
    if len({_identity(datasets[name]) for name in names}) < 2:
        return []  # one tokenizer for all
    vocabularies: dict[tuple[str, ...], list[str | None]] = {}

    def vocabulary(name: str) -> list[str | None]:
        key = _identity(datasets[name])
        if key not in vocabularies:
            vocabularies[key] = _vocabulary(datasets[name])
        return vocabularies[key]

    mixes = []
    for base in names:
        for extended in names:
            small, large = datasets[base], datasets[extended]
            if small.tokenizer.vocab_size >= large.tokenizer.vocab_size:
                continue
            if not extends(vocabulary(base), vocabulary(extended)):
                continue
            where, report, looked = read_report(large)
            changed = report["old_text_changed_lines"] if report and "old_text_changed_lines" in report else None
            mixes.append(EncodingMix(
                base=base, extended=extended,
                base_vocab_size=small.tokenizer.vocab_size, extended_vocab_size=large.tokenizer.vocab_size,
                report=where, changed_lines=changed["changed"] if changed else None,
                lines=changed["lines"] if changed else None,
                kept=bool(report and report.get("keep_old_encoding")), looked_at=looked,
            ))
    return mixes


def warn_encoding_mixes(datasets: Mapping[str, TokenDataset], stream: TextIO | None = None) -> list[EncodingMix]:
    """Write one `warning:` line per base/extension pair of the mix (call it once, where the mix is opened);
    returns the pairs."""
    mixes = find_encoding_mixes(datasets)
    for mix in mixes:
        print(f"warning: {mix.message()}", file=stream or sys.stderr, flush=True)
    return mixes
