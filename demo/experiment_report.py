"""The demo's report.md: final losses, forgetting and adaptation per run, next to the paper's findings.

`demo.experiment` calls `write_report` once every run has finished; rerunning the demo rewrites it
from the runs' metrics alone. Forgetting is the rise of the English validation loss since the phase-1
checkpoint, adaptation the fall of the German one; the findings below the table are computed from
those figures and set beside the same figures computed from the paper's table.
"""

from __future__ import annotations

import json
from pathlib import Path

from demo.controller_report import average_share, controller_lines
from demo.experiment_config import ControllerRun, ExperimentConfig, Phase2Run
from trainer.metrics_log import read_metrics
from trainer.report import write_report as write_run_comparison

LIVE_CHANGE_NAME = "live-mix-change.json"  # the PUT /v1/mix response of the live ratio change

# The paper's 405M English Pile -> German Common Crawl table (paper-notes.md): final validation losses
# (Pile, German) per replay share, and the Pile loss before the shift.
PAPER_STRONG_SHIFT = {0.0: (3.56, 1.11), 0.01: (2.83, 1.12), 0.05: (2.57, 1.12), 0.10: (2.46, 1.13),
                      0.25: (2.33, 1.16), 0.50: (2.24, 1.22)}
PAPER_PILE_BEFORE = 2.17


def validation_losses(run_dir: Path) -> list[dict[str, float]]:
    """Each evaluation's loss per validation set, in step order."""
    return [r["val_loss"] for r in read_metrics(run_dir) if r["kind"] == "eval"]


def write_report(cfg: ExperimentConfig, phase1: Path, runs: dict[Phase2Run, Path]) -> Path:
    """Write cfg.work_dir/report.md and the plots beside it; return the report's path."""
    plots = cfg.work_dir / "plots"
    write_run_comparison([phase1, *runs.values()], plots)
    losses = {spec: validation_losses(run_dir) for spec, run_dir in runs.items()}
    start = next(iter(losses.values()))[0]  # every run's first evaluation is of the phase-1 checkpoint
    phase1_end = validation_losses(phase1)[-1]["en"]
    final = {spec: run_losses[-1] for spec, run_losses in losses.items()}
    rows = ["| run | English replay | lr | English val | German val | average | forgetting (EN rise) "
            "| adaptation (DE fall) | paper EN / DE at this replay |", "|---|---|---|---|---|---|---|---|---|"]
    for spec, loss in final.items():
        paper = PAPER_STRONG_SHIFT.get(spec.replay)
        rows.append(
            f"| {spec.name} | {replay_cell(spec, runs[spec])} "
            f"| {'re-warm + cosine' if spec.rewarm else 'infinite, no re-warm'} "
            f"| {loss['en']:.3f} | {loss['de']:.3f} | {(loss['en'] + loss['de']) / 2:.3f} "
            f"| {loss['en'] - start['en']:+.3f} | {start['de'] - loss['de']:+.3f} "
            f"| {f'{paper[0]:.2f} / {paper[1]:.2f}' if paper and spec.fixed_ratio else '-'} |"
        )
    live = next((s for s in runs if s.switch_to is not None), None)
    # Before the body lists the plots: this section draws one.
    steered = [line for spec in runs if isinstance(spec, ControllerRun)
               for line in controller_lines(cfg, spec, runs, final, plots)]
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
        "shift) are "
        "there for the shape of the trade-off, not the values.",
        "",
        *rows,
        "",
        *findings_lines(cfg, start, phase1_end, final),
        *(live_switch_lines(runs[live], live) if live else []),
        *steered,
        "Plots: " + ", ".join(f"[{p.name}](plots/{p.name})" for p in sorted(plots.glob("*.png"))),
        "",
    ]
    report = cfg.work_dir / "report.md"
    report.write_text("\n".join(body))
    return report


def findings_lines(cfg: ExperimentConfig, start: dict[str, float], phase1_end: float,
                   final: dict[Phase2Run, dict[str, float]]) -> list[str]:
    """The paper's findings, each as this run measured it and as the paper's table gives it."""
    plain = {spec.replay: loss for spec, loss in final.items() if spec.rewarm and spec.fixed_ratio}
    if 0.0 not in plain:
        return []
    rise = {r: loss["en"] - start["en"] for r, loss in plain.items()}
    cost = {r: loss["de"] - plain[0.0]["de"] for r, loss in plain.items()}
    paper_rise = {r: en - PAPER_PILE_BEFORE for r, (en, _) in PAPER_STRONG_SHIFT.items()}
    paper_cost = {r: de - PAPER_STRONG_SHIFT[0.0][1] for r, (_, de) in PAPER_STRONG_SHIFT.items()}
    lines = ["## Next to the paper", "",
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
