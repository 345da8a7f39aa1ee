"""The demo's report.md: final losses, forgetting and adaptation per run, next to the paper's findings.

`demo.experiment` calls `write_report` once every run has finished; rerunning the demo rewrites it
from the runs' metrics alone. Forgetting is the rise of the English validation loss since the phase-1
checkpoint, adaptation the fall of the German one; the findings below the table are computed from
those figures and set beside the same figures computed from the paper's table.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

from demo.alternatives import Alternative, alternative_lines, alternative_rows
from demo.controller_report import average_share, controller_lines
from demo.experiment_config import ControllerRun, ExperimentConfig, GrownRun, Phase2Run
from demo.findings import (PAPER_PILE_BEFORE, PAPER_STRONG_SHIFT, Judge, Point, encoding_row, findings_table,
                           make_point, plot_losses, plot_rates, plot_tradeoff, point_of, seed_spread, union_lines)
from demo.measures import ValSplit, flops_per_token, grown_compute, model_parameters, val_split, vocab_size
from demo.merges import Merged
from demo.steps import growth
from trainer.metrics_log import read_metrics
from trainer.report import write_report as write_run_comparison

LIVE_CHANGE_NAME = "live-mix-change.json"  # the PUT /v1/mix response of the live ratio change



def validation_losses(run_dir: Path) -> list[dict[str, float]]:
    """Each evaluation's loss per validation set, in step order."""
    return [r["val_loss"] for r in read_metrics(run_dir) if r["kind"] == "eval"]


def write_report(cfg: ExperimentConfig, phase1: Path, runs: dict[Phase2Run, Path], union: Path | None = None,
                 pins: dict[str, dict] | None = None, merged: Sequence[Merged] = ()) -> Path:
    """Write cfg.work_dir/report.md and the plots beside it; return the report's path."""
    plots = cfg.work_dir / "plots"
    write_run_comparison([phase1, *runs.values(), *([union] if union else [])], plots)
    datasets, corpora = cfg.work_dir / "datasets", cfg.work_dir / "corpora"
    splits = {name: val_split(datasets / name, corpora / f"{name[:2]}.jsonl")
              for name in ("en", "en-base", "de", "de-base") if (datasets / name / "manifest.json").exists()}

    def ratio(spec: Phase2Run | None) -> dict[str, float]:  # tokens per byte of the val sets a run was scored on
        extended = spec is None or spec.extend_tokenizer
        return {"en": splits["en" if extended else "en-base"].tokens_per_byte,
                "de": splits["de" if extended else "de-base"].tokens_per_byte}

    # Runs differing only by seed make one point: their mean and range.
    groups: dict[str, list[Phase2Run]] = {}
    for spec in runs:
        groups.setdefault(spec.base, []).append(spec)
    points = {base: make_point(base, specs[0], [runs[s] for s in specs], ratio(specs[0]))
              for base, specs in groups.items()}
    union_point = make_point(cfg.union.name, None, [union], ratio(None), "union") if union and cfg.union else None
    judge = Judge(seed_spread(list(points.values())))
    losses = {spec: validation_losses(run_dir) for spec, run_dir in runs.items()}
    start = next(iter(losses.values()))[0]  # every run's first evaluation is of the phase-1 checkpoint
    # ... in the run's own encoding: a run without the extension scores the base one from its start
    own_start = {spec: losses[spec][0] for spec in runs}
    phase1_end = validation_losses(phase1)[-1]["en"]
    final = {spec: points[spec.base].loss for spec in runs if spec.seed == 0}
    tokens, compute = compute_spent(cfg)
    alternatives = alternatives_of(cfg, points, merged, ratio(None), tokens, compute)

    rows = ["| run | English replay | what differs | English val | German val | average | EN bits/byte "
            "| DE bits/byte | forgetting (EN rise) | adaptation (DE fall) | paper EN / DE at this replay |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for base, point in points.items():
        spec, paper = point.spec, PAPER_STRONG_SHIFT.get(point.spec.replay)
        rows.append(
            f"| {base}{f' (x{point.seeds} seeds)' if point.seeds > 1 else ''} | {replay_cell(spec, runs[spec])} "
            f"| {differs(cfg, spec)} | {point.cell('en')} | {point.cell('de')} | {point.average:.3f} "
            f"| {point.bpb['en']:.3f} | {point.bpb['de']:.3f} "
            f"| {point.loss['en'] - own_start[spec]['en']:+.3f} | {own_start[spec]['de'] - point.loss['de']:+.3f} "
            f"| {f'{paper[0]:.2f} / {paper[1]:.2f}' if paper and spec.recipe else '-'} |"
        )
    live = next((s for s in runs if s.switch_to is not None), None)
    table = {p.spec.replay: p for p in points.values() if p.spec.recipe}
    # Before the body lists the plots: these sections draw them.
    steered = [line for spec in runs if isinstance(spec, ControllerRun)
               for line in controller_lines(cfg, spec, runs, final, plots, points, judge)]
    plot_losses(plots / "loss_over_steps.png", cfg, phase1, runs, union)
    plot_rates(plots / "lr_over_steps.png", cfg, phase1, runs, union)
    start_bpb = {lang: start[lang] / math.log(2) * ratio(None)[lang] for lang in ("en", "de")}
    plot_tradeoff(plots / "tradeoff.png", [*points.values(), *(a.point for a in alternatives if a.family == "merge"),
                                           *([union_point] if union_point else [])], start_bpb)
    body = [
        "# replaymix demo: continual pretraining English -> German with replay",
        "",
        f"Model `{cfg.model}`, sequence length {cfg.seq_len}, global batch {cfg.global_batch}; phase 1: "
        f"{cfg.phase1_steps} steps on English man pages (infinite schedule, checkpoint at step "
        f"{cfg.phase1_anneal_start} before the anneal); phase 2: {cfg.phase2_steps} steps on German man pages "
        f"from that checkpoint, the vocabulary grown by the German extension of the tokenizer.",
        "",
        f"At the phase-1 checkpoint: English val {start['en']:.3f}, German val {start['de']:.3f} "
        f"(after phase 1's own anneal, English val {phase1_end:.3f}). Forgetting and adaptation are measured "
        f"from the checkpoint. The paper's numbers (405M model, 300B tokens; Pile loss {PAPER_PILE_BEFORE} before the "
        "shift) are there for the shape of the trade-off, not the values. Losses are nats per token of the run's "
        "own tokenizer; bits per byte (loss / ln 2 x tokens / UTF-8 bytes of the whole validation split) compare "
        "runs over different vocabularies." + (" Runs with seeds: mean (range)." if judge.spread else ""),
        "",
        *corpus_lines(pins, splits),
        *rows,
        "",
        *(union_lines(cfg, table, union_point, compute, tokens) if union_point and table else []),
        *alternative_lines(alternatives, points, start, compute["phase2"], compute["phase1"],
                           model_parameters(cfg.model, vocab_size(datasets / "de"), cfg.seq_len)),
        *findings_table(cfg, points, start, union_point, compute, judge,
                        ([row] if (row := encoding_row({p.spec.replay: runs[p.spec] for p in table.values()},
                                                        splits)) else [])
                        + alternative_rows(alternatives, points, start, judge)),
        *spread_lines(points, judge),
        *findings_lines(cfg, start, phase1_end, {p.spec: p.loss for p in points.values()}),
        *(live_switch_lines(runs[live], live) if live else []),
        *steered,
        "![English and German loss over steps](plots/loss_over_steps.png)",
        "![Learning rate over steps](plots/lr_over_steps.png)",
        "![Forgetting vs adaptation](plots/tradeoff.png)",
        "",
        "Plots: " + ", ".join(f"[{p.name}](plots/{p.name})" for p in sorted(plots.glob("*.png"))),
        "",
    ]
    report = cfg.work_dir / "report.md"
    report.write_text("\n".join(body))
    return report


def alternatives_of(cfg: ExperimentConfig, points: dict[str, Point], merged: Sequence[Merged],
                    tokens_per_byte: dict[str, float], tokens: dict[str, int],
                    compute: dict[str, float]) -> list[Alternative]:
    """The merges (no training; their path is phase 1 and replay-0's run) and the grown runs (their own
    step's FLOPs, from the grown model), as points beside the replay runs."""
    datasets = cfg.work_dir / "datasets"
    old, new = vocab_size(datasets / "en-base"), vocab_size(datasets / "de")
    dense = model_parameters(cfg.model, new, cfg.seq_len)
    found = [Alternative(point_of(m.merge.name, None, [m.losses], tokens_per_byte, "merge"), "merge", m.merge.about,
                         0.0, compute["phase1"] + compute["phase2"], dense, dense,
                         f"No training: built and scored in {m.seconds:.1f} s from phase 1 and replay-0, whose "
                         "compute is its whole path's.") for m in merged]
    for point in points.values():
        if not isinstance(point.spec, GrownRun):
            continue
        grow = growth(cfg, point.spec)
        per_token, parameters, active = grown_compute(cfg.model, new, cfg.seq_len, grow["grow"], grow["train"], old)
        flops = per_token * tokens["phase2"]
        family = "blocks" if point.spec.grow == "blocks" else "experts"
        note = (f"{flops / compute['phase2']:.2f}x a replay run's FLOPs (new blocks and new tokens' rows trained, "
                "the rest frozen)" if family == "blocks" else
                f"{flops / compute['phase2']:.2f}x a replay run's FLOPs ({active / 1e6:.2f}M of "
                f"{parameters / 1e6:.2f}M parameters active per token)")
        found.append(Alternative(point, family, f"{grow['grow']}, training {grow['train']}, no replay", flops,
                                 compute["phase1"] + flops, parameters, active, note + "."))
    return found


def differs(cfg: ExperimentConfig, spec: Phase2Run) -> str:
    """What a run changes against the replay table's recipe (re-warmed cosine at the preset's rates)."""
    changes = [*(["no re-warm (infinite schedule continued)"] if not spec.rewarm else []),
               *([f"peak lr {spec.max_lr:.0e} (recipe {cfg.max_lr:.0e})"] if spec.max_lr is not None else []),
               *([f"warmup {spec.warmup_steps} steps (recipe {cfg.phase2_warmup()})"] if spec.warmup_steps else []),
               *(["optimizer state reset"] if spec.reset_optimizer else []),
               *(["no tokenizer extension"] if not spec.extend_tokenizer else []),
               *(["ratio changed live"] if spec.switch_to is not None else []),
               *(["controller"] if isinstance(spec, ControllerRun) else []),
               *([f"grown: {growth(cfg, spec)['grow']}, training {spec.train}"] if isinstance(spec, GrownRun) else [])]
    return ", ".join(changes) or "- (re-warm + cosine)"


def compute_spent(cfg: ExperimentConfig) -> tuple[dict[str, int], dict[str, float]]:
    """Tokens and training FLOPs of phase 1, of one phase-2 run, and of the union baseline."""
    datasets = cfg.work_dir / "datasets"
    old, new = vocab_size(datasets / "en-base"), vocab_size(datasets / "de")
    per_step = cfg.global_batch * cfg.seq_len
    tokens = {"phase1": cfg.phase1_steps * per_step, "phase2": cfg.phase2_steps * per_step,
              "union": cfg.union_steps * per_step}
    fpt = {"phase1": flops_per_token(cfg.model, old, cfg.seq_len), "phase2": flops_per_token(cfg.model, new, cfg.seq_len),
           "union": flops_per_token(cfg.model, new, cfg.seq_len)}
    return tokens, {step: tokens[step] * fpt[step] for step in tokens}


def corpus_lines(pins: dict[str, dict] | None, splits: dict[str, ValSplit]) -> list[str]:
    """The corpora this report was built from: two machines with the same pins give the same report."""
    if not pins:
        return []
    lines = ["Corpora (rendered man pages; a work dir refuses runs built from other ones):", "",
             "| corpus | pages | bytes | sha256 | val documents | val bytes | val tokens (tokenizer) |",
             "|---|---|---|---|---|---|---|"]
    for lang, pin in pins.items():
        names = [name for name in splits if name[:2] == lang]
        lines.append(f"| {lang} | {pin['pages']} | {pin['bytes']:,} | `{pin['sha256']}` "
                     f"| {splits[names[0]].documents} | {splits[names[0]].bytes:,} | "
                     + ", ".join(f"{splits[n].tokens:,} ({'base' if n.endswith('-base') else 'extended'})"
                                 for n in names) + " |")
    return lines + [""]


def spread_lines(points: dict[str, Point], judge: Judge) -> list[str]:
    """Which differences between neighbouring replay runs are larger than the seed spread."""
    if not judge.spread:
        return []
    table = sorted((p for p in points.values() if p.spec.recipe), key=lambda p: p.spec.replay)
    lines = ["## Seed spread", "", f"Runs of the replay table with several sample orders (the service's seed; "
             f"the phase-1 checkpoint is shared): {judge.basis()}.", "",
             "| from | to | English change | German change |", "|---|---|---|---|"]
    for a, b in zip(table, table[1:]):
        cells = []
        for lang in ("en", "de"):
            d = b.loss[lang] - a.loss[lang]
            cells.append(f"{d:+.3f} {'**beyond**' if judge.real(lang, d, a.loss[lang]) else 'within'}")
        lines.append(f"| {a.name} | {b.name} | {cells[0]} | {cells[1]} |")
    return lines + [""]


def findings_lines(cfg: ExperimentConfig, start: dict[str, float], phase1_end: float,
                   final: dict[Phase2Run, dict[str, float]]) -> list[str]:
    """The paper's findings, each as this run measured it and as the paper's table gives it."""
    plain = {spec.replay: loss for spec, loss in final.items() if spec.recipe}
    if 0.0 not in plain:
        return []
    rise = {r: loss["en"] - start["en"] for r, loss in plain.items()}
    cost = {r: loss["de"] - plain[0.0]["de"] for r, loss in plain.items()}
    paper_rise = {r: en - PAPER_PILE_BEFORE for r, (en, _) in PAPER_STRONG_SHIFT.items()}
    paper_cost = {r: de - PAPER_STRONG_SHIFT[0.0][1] for r, (_, de) in PAPER_STRONG_SHIFT.items()}
    lines = ["## Next to the paper: the replay table", "",
             f"- **Without replay the old loss rises sharply**: English +{rise[0.0]:.2f} here "
             f"(paper: Pile +{paper_rise[0.0]:.2f})."]
    for r in sorted(r for r in plain if r > 0):
        removed = 1 - rise[r] / rise[0.0] if rise[0.0] > 0 else float("nan")
        paper = (f"paper: {1 - paper_rise[r] / paper_rise[0.0]:.0%} for German {paper_cost[r]:+.2f}"
                 if r in PAPER_STRONG_SHIFT else "not in the paper's table")
        lines.append(f"- **{r:.0%} replay** removes {removed:.0%} of that rise for German {cost[r]:+.3f} ({paper}).")
    lines.append("  Small replay removes most forgetting at a small German cost, and the cost grows with the "
                 "share: the paper's shape." if len(plain) > 2 and all(
                     cost[a] <= cost[b] for a, b in zip(sorted(plain), sorted(plain)[1:])) else
                 "  The German cost does not grow steadily with the replay share in this run.")
    if any(rise[r] < 0 for r in plain):
        lines.append(f"- English ends *below* the checkpoint with enough replay: the checkpoint was taken before "
                     f"phase 1's anneal (English {start['en']:.3f} there, {phase1_end:.3f} after it), and each "
                     "phase-2 run's own decay anneals the replayed English too; the paper's Pile loss before the "
                     "shift is measured after a full decay.")
    german_tokens = cfg.phase2_steps * cfg.global_batch * cfg.seq_len
    if 0.25 in cost and cost[0.25] > 2 * paper_cost[0.25]:
        lines.append(f"- Replay costs more German here than in the paper: each phase-2 run sees about "
                     f"{german_tokens / 1e6:.1f}M tokens, far from convergence, so every German token given to "
                     "replay is a German token not learned; the paper's 405M model sees 300B and is close to "
                     "saturation on German, where fewer German tokens cost little.")
    no_rewarm = next((spec for spec in final if not spec.rewarm), None)
    rewarmed = plain.get(no_rewarm.replay) if no_rewarm else None
    if no_rewarm and rewarmed:
        other = final[no_rewarm]
        adapts = ("so re-warming adapts more, as the paper finds" if other["de"] > rewarmed["de"] else
                  "so at this scale re-warming does not adapt more, unlike the paper")
        forgets = ("and forgets more, the price the paper's infinite schedule avoids."
                   if other["en"] < rewarmed["en"] else
                   f"and it does not forget more here either: English keeps being trained ({no_rewarm.replay:.0%}) in "
                   "both runs, and the re-warmed cosine spends its whole second half at low rates where the no-re-warm "
                   f"run anneals over its last {cfg.anneal_steps(cfg.phase2_steps)} steps only, which likely "
                   "outweighs the forgetting a re-warm causes.")
        lines.append(f"- **Re-warming** ({no_rewarm.replay:.0%} replay): without it German ends at {other['de']:.3f} "
                     f"against {rewarmed['de']:.3f} re-warmed ({other['de'] - rewarmed['de']:+.3f}) and English at "
                     f"{other['en']:.3f} against {rewarmed['en']:.3f} ({other['en'] - rewarmed['en']:+.3f}); "
                     f"{adapts}, {forgets}")
    return lines + [""]


def replay_cell(spec: Phase2Run, run_dir: Path) -> str:
    """The run's English share in the table: fixed, changed live, or steered (with the average it used)."""
    if isinstance(spec, ControllerRun):
        return f"controller from {spec.replay:.0%} (average {average_share(run_dir):.1%})"
    return f"{spec.replay:.0%}" + (f" -> {spec.switch_to:.0%}" if spec.switch_to is not None else "")


def live_switch_lines(run_dir: Path, spec: Phase2Run) -> list[str]:
    """The share of English the steps actually received in the run whose ratio was changed by curl."""
    train = [r for r in read_metrics(run_dir) if r["kind"] == "train"]
    change = run_dir / LIVE_CHANGE_NAME
    stage = json.loads(change.read_text())["stage"] if change.exists() else None
    lines = [f"Live ratio change in `{spec.name}`: `curl -X PUT /v1/mix` to {spec.switch_to:.0%} English while "
             "it trained" + (f"; the service put the new stage at batch step {stage['start_step']}, the first step "
                             "not yet served." if stage else ", but the run ended before the change was made."),
             "English share of the batches, per window of batch steps (from the trainer's per-step metrics; "
             "batch step s is the one the update to step s + 1 trained on):", "",
             "| batch steps | mean | min | max |", "|---|---|---|---|"]
    window = max(1, len(train) // 20)
    for first in range(0, len(train), window):
        shares = [r["source_share"]["en"] for r in train[first:first + window]]
        lines.append(f"| {train[first]['batch_step']}-{train[first + len(shares) - 1]['batch_step']} "
                     f"| {sum(shares) / len(shares):.3f} | {min(shares):.3f} | {max(shares):.3f} |")
    return lines + [""]
