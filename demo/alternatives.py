"""Merge or grow instead of replay? The report's section and findings rows for the other strategies.

Each alternative (a merge of phase 1 and replay-0, a run grown by block expansion or upcycled into a mixture
of experts) is set beside `replay-5` and `replay-25`, the replay runs a team would choose between, on both
losses, with the compute each path spent. A comparison with a replay run says *better* or *worse* only when
the alternative is no worse on either language and better on one (or the reverse) by more than the judge's
tolerance (the seed spread, or 1% of the loss); otherwise *a trade-off* (it forgets less and adapts less, or
the reverse) or *no real difference*.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

from demo.findings import Judge, Point

REFERENCES = ("replay-5", "replay-25")
LITERATURE = {
    "merge": "continued pretraining compares favourably with merging at similar compute (the paper); TIES "
             "(Yadav et al. 2023) merges task vectors by trim, sign election and disjoint mean",
    "blocks": "LLaMA Pro (Wu et al. 2024): identity blocks inserted, only they trained on the new data, keep "
              "the old abilities while learning the new, without replay",
    "experts": "sparse upcycling (Komatsuzaki et al. 2023): a dense model's MLPs copied into experts learn more "
               "per active parameter than the dense model continued",
}


@dataclass(frozen=True)
class Alternative:
    """A point beside the replay runs, with what it cost: FLOPs of its own step (0 for a merge) and of its
    whole path from scratch, its parameters and those a token passes through."""

    point: Point
    family: str  # "merge", "blocks" or "experts"
    about: str
    flops: float
    path_flops: float
    parameters: int
    active: int
    note: str  # what else the reader needs: how long a merge took, what a grown run trained


def compare(point: Point, reference: Point, judge: Judge) -> str:
    """How `point` stands against `reference`, English (forgetting) and German (adaptation) both counted."""
    better, worse = [], []
    for lang in ("en", "de"):
        difference = point.loss[lang] - reference.loss[lang]
        if judge.real(lang, difference, reference.loss[lang]):
            (worse if difference > 0 else better).append(lang)
    if not better and not worse:
        return f"no real difference from {reference.name}"
    if not worse:
        return f"better than {reference.name}"
    if not better:
        return f"worse than {reference.name}"
    return (f"a trade-off against {reference.name} (forgets {'less' if 'en' in better else 'more'}, adapts "
            f"{'more' if 'de' in better else 'less'})")


def _references(points: Mapping[str, Point]) -> list[Point]:
    return [points[name] for name in REFERENCES if name in points]


def alternative_rows(alternatives: Sequence[Alternative], points: Mapping[str, Point], start: Mapping[str, float],
                     judge: Judge) -> list[tuple[str, str, str, str, str]]:
    """One findings row per alternative: the literature's claim, the figures, the verdict against replay-5 and
    replay-25 (judged against the seed spread), and the compute that explains it."""
    references = _references(points)
    rows = []
    for alt in alternatives:
        p = alt.point
        measured = (f"English {p.loss['en']:.3f} ({p.loss['en'] - start['en']:+.3f} since the checkpoint), German "
                    f"{p.loss['de']:.3f}; " + "; ".join(
                        f"{r.name} {r.loss['en']:.3f} / {r.loss['de']:.3f}" for r in references))
        verdict = "; ".join(compare(p, r, judge) for r in references) or "no replay run to compare with"
        rows.append((f"`{p.name}` instead of replay: {alt.about}", LITERATURE[alt.family], measured, verdict,
                     alt.note))
    return rows


def alternative_lines(alternatives: Sequence[Alternative], points: Mapping[str, Point], start: Mapping[str, float],
                      replay_flops: float, phase1_flops: float, parameters: int) -> list[str]:
    """The section: each alternative beside the replay runs, with its losses, bits per byte and compute."""
    if not alternatives:
        return []
    lines = ["## Merge or grow instead of replay?", "",
             "The other strategies the literature sets beside replay, each from the same phase-1 model: merges of "
             "phase 1's final model and `replay-0` (no training: built from runs that exist and scored on the same "
             "windows), and phase-2 runs that grow the model first without replay (block expansion training only "
             "the new blocks and the new tokens' rows; a mixture of experts upcycled from every MLP). FLOPs: "
             "training FLOPs of the step itself (a merge: none) and of its whole path from scratch (phase 1 "
             "included; a merge's path is phase 1 and replay-0's run). A grown model's FLOPs count the experts a "
             "token passes through, and leave out the weight gradients of frozen layers.", "",
             "| path | what | English val | German val | average | EN / DE bits/byte | forgetting (EN rise) "
             "| FLOPs (this step) | FLOPs (whole path) | parameters (active) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name in REFERENCES:
        if name in points:
            p = points[name]
            lines.append(_line(p, "replay (the recipe)", start, replay_flops, phase1_flops + replay_flops,
                               parameters, parameters))
    for alt in alternatives:
        lines.append(_line(alt.point, alt.about, start, alt.flops, alt.path_flops, alt.parameters, alt.active))
    return lines + [""]


def _line(p: Point, what: str, start: Mapping[str, float], flops: float, path: float, parameters: int,
          active: int) -> str:
    size = f"{parameters / 1e6:.2f}M" + (f" ({active / 1e6:.2f}M)" if active != parameters else "")
    return (f"| {p.name} | {what} | {p.cell('en')} | {p.cell('de')} | {p.average:.3f} | {p.bpb['en']:.3f} / "
            f"{p.bpb['de']:.3f} | {p.loss['en'] - start['en']:+.3f} | {flops:.3g} | {path:.3g} | {size} |")
