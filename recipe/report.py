"""OUTPUT/report.md: the demo's report sections for any recipe's model and data.

Per update and run (and each merge of the update's start and continued models, a row beside the runs
that trained nothing): each corpus's final validation loss and bits per byte, forgetting and adaptation;
the replayed corpora's bits per byte also in the model's original (base) encoding, so forgetting measured
in the encoding the continued model meets sits beside the one a replay in the old encoding would show;
the sweep's trade-off (one point per pilot) and the share its rule chose; the controller's decisions; each
corpus's loss after every update; the compute spent. The run plots come from `trainer.report` (one home
for a run's loss and learning-rate curves); this module draws the trade-off.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from recipe.merging import read as read_merge  # noqa: E402
from recipe.outcome import (Choice, Outcome, bits_per_byte, merge_outcome, outcome,  # noqa: E402
                            tokens_per_byte)
from recipe.plan import BASE, MergeStep, Plan, TrainStep  # noqa: E402
from trainer.report import write_report as write_run_plots  # noqa: E402

REPORT = "report.md"


def write_report(plan: Plan, choices: Mapping[str, Choice | None], seconds: Mapping[str, float]) -> Path:
    out = plan.out
    plots = out / "plots"
    runs = [s for s in plan.steps() if isinstance(s, TrainStep) and (s.run_dir / "metrics.jsonl").exists()]
    write_run_plots([s.run_dir for s in runs], plots)
    recipe = plan.recipe
    lines = [f"# {plan.name}: continued pretraining with replay", "",
             f"Model `{recipe.model}`; {len(recipe.updates)} update(s): "
             + ", ".join(f"{u.name} ({u.steps} steps on {', '.join(u.new)})" for u in recipe.updates)
             + f"; sequence length {recipe.data.seq_len}, global batch {recipe.data.global_batch}. Losses are nats "
             "per token of the run's tokenizer; bits per byte divide by the UTF-8 bytes of the held-out text, so "
             "encodings compare. Forgetting: the peak relative rise of a replayed corpus's validation loss since "
             "the run's start; adaptation: the relative fall of the new corpora's.", ""]
    after_update: dict[str, dict[str, float]] = {}
    for update in recipe.updates:
        pilots = plan.pilots[update.name]
        full = plan.runs[update.name]
        lines += [f"## Update {update.name}", ""]
        done = [s for s in [*pilots, *([full] if full else [])] if (s.run_dir / "metrics.jsonl").exists()]
        lines += run_table(plan, done, plan.merges.get(update.name, []))
        if pilots:
            lines += sweep_lines(plan, update.name, pilots, choices.get(update.name), plots)
        if full and (full.run_dir / "controller.json").exists():
            lines += controller_lines(full)
        if full and (full.run_dir / "metrics.jsonl").exists():
            after_update[update.name] = outcome(full.name, full.share, full.run_dir, full.replayed, full.new).final
    lines += corpus_history(after_update)
    lines += compute_lines(plan, runs, seconds)
    lines += ["## Plots", "", *(f"![{p.stem}](plots/{p.name})" for p in sorted(plots.glob("*.png"))), ""]
    report = out / REPORT
    report.write_text("\n".join(lines))
    return report


def run_table(plan: Plan, steps: list[TrainStep], merges: list[MergeStep] = ()) -> list[str]:
    """A row per run, then per merge of the update's start and continued models (no training), scored on the
    same windows and judged against the full run's start."""
    if not steps:
        return []
    names = list(steps[0].trainer.data.eval_datasets)
    eval_datasets = steps[0].trainer.data.eval_datasets
    header = ["run", "replayed share", "steps", *(f"{n} loss / bits per byte" for n in names), "forgetting",
              "adaptation"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

    def row(o: Outcome, first: list[str]) -> str:
        cells = list(first)
        for n in names:
            bpb = bits_per_byte(o.final[n], tokens_per_byte(eval_datasets[n])) if n in o.final else None
            cells.append("-" if n not in o.final else f"{o.final[n]:.3f} / {bpb:.3f}" if bpb else f"{o.final[n]:.3f}")
        return "| " + " | ".join([*cells, f"{o.forgetting:+.4f}", f"{o.adaptation:+.4f}"]) + " |"

    for step in steps:
        o = outcome(step.name, step.share, step.run_dir, step.replayed, step.new)
        lines.append(row(o, [step.name + grown_note(step), share_cell(step), str(o.steps)]))
    full = next((s for s in steps if s.role == "train"), None)
    made = [(m, read_merge(m)) for m in merges]
    made = [(m, merged) for m, merged in made if merged is not None]
    if full is not None and made:
        start = outcome(full.name, full.share, full.run_dir, full.replayed, full.new).start
        for step, merged in made:
            o = merge_outcome(step.name, start, merged.losses, step.replayed, step.new)
            lines.append(row(o, [step.name, f"merge, {merged.about}", "0 (no training)"]))
    based = [n for n in names if n.endswith(f"-{BASE}")]
    if based:
        lines += ["", "Columns NAME-base score the replayed corpus in the model's original encoding: the text the "
                  "model was trained on replays in the final (extended) encoding, and forgetting is measured there; "
                  "the base encoding's bits per byte show what a replay in the old encoding would have reported."]
    return lines + [""]


def grown_note(step: TrainStep) -> str:
    if step.trainer.grow is None:
        return ""
    return f" (grown {step.trainer.grow}, training {step.trainer.train})"


def share_cell(step: TrainStep) -> str:
    if step.service.controller:
        return f"controller (budget {step.service.controller[1]['budget']:g})"
    if step.later_stages:
        return "stages"
    return f"{step.share:g}"


def sweep_lines(plan: Plan, update: str, pilots: list[TrainStep], choice: Choice | None, plots: Path) -> list[str]:
    budget = next(u for u in plan.recipe.updates if u.name == update).replay.choose.budget
    outcomes = [outcome(p.name, p.share, p.run_dir, p.replayed, p.new) for p in pilots
                if (p.run_dir / "metrics.jsonl").exists()]
    plot = plots / f"tradeoff_{update}.png"
    plot_tradeoff(plot, outcomes, budget, choice)
    lines = [f"### Replay sweep: {len(outcomes)} pilots of {pilots[0].trainer.steps} steps from the same start", "",
             "| share | forgetting (peak) | adaptation | within budget |", "|---|---|---|---|"]
    lines += [f"| {o.share:g} | {o.forgetting:+.4f} | {o.adaptation:+.4f} | {'yes' if o.forgetting <= budget else 'no'} |"
              for o in sorted(outcomes, key=lambda o: o.share)]
    verdict = (f"**Chosen share: {choice.share:g}** ({choice.reason})." if choice else
               f"**No share kept forgetting within the budget {budget:g}**; the recipe stops (choose.otherwise: stop).")
    return lines + ["", verdict, "", f"![forgetting vs adaptation](plots/{plot.name})", ""]


def plot_tradeoff(path: Path, outcomes: list[Outcome], budget: float, choice: Choice | None) -> None:
    """Forgetting against adaptation, one point per pilot share; the budget as a line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, axis = plt.subplots(figsize=(7, 5))
    for o in outcomes:
        chosen = choice is not None and o.share == choice.share
        axis.plot(o.forgetting, o.adaptation, "*" if chosen else "o", markersize=14 if chosen else 7)
        axis.annotate(f"share {o.share:g}", (o.forgetting, o.adaptation), fontsize=8, xytext=(4, 3),
                      textcoords="offset points")
    axis.axvline(budget, color="grey", linestyle=":", label=f"budget {budget:g}")
    axis.set(title="replay sweep: forgetting vs adaptation (one point per pilot)",
             xlabel="forgetting (peak relative rise of the replayed loss) ->", ylabel="adaptation (relative fall) ->")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def controller_lines(step: TrainStep) -> list[str]:
    state = json.loads((step.run_dir / "controller.json").read_text())
    decisions = state.get("decisions", [])
    old = step.service.controller[1]["old"]
    lines = [f"### The controller ({len(decisions)} decisions, each a stage of the mix log)", "",
             "| from batch step | share of " + old + " | reason |", "|---|---|---|"]
    lines += [f"| {d['stage']['start_step']} | {d['stage']['weights'].get(old, 0):.3f} | {d.get('reason', '')} |"
              for d in decisions]
    return lines + [""]


def corpus_history(after_update: Mapping[str, Mapping[str, float]]) -> list[str]:
    """Each corpus's validation loss after every update (its full run's last evaluation)."""
    if not after_update:
        return []
    names = sorted({n for losses in after_update.values() for n in losses})
    lines = ["## Each corpus after every update", "", "| after | " + " | ".join(names) + " |",
             "|---|" + "---|" * len(names)]
    lines += [f"| {u} | " + " | ".join(f"{losses[n]:.3f}" if n in losses else "-" for n in names) + " |"
              for u, losses in after_update.items()]
    return lines + [""]


def compute_lines(plan: Plan, runs: list[TrainStep], seconds: Mapping[str, float]) -> list[str]:
    data = plan.recipe.data
    per_step = data.global_batch * data.seq_len
    lines = ["## Compute spent", "", "| run | steps | tokens | wall (this invocation) |", "|---|---|---|---|"]
    total = 0
    for step in runs:
        tokens = step.trainer.steps * per_step
        total += tokens
        wall = f"{seconds[step.name]:.0f} s" if step.name in seconds else "reused"
        lines.append(f"| {step.name} | {step.trainer.steps} | {tokens:,} | {wall} |")
    for merges in plan.merges.values():
        for merge in merges:
            if merge.record.is_file():
                wall = f"{seconds[merge.name]:.0f} s" if merge.name in seconds else "reused"
                lines.append(f"| {merge.name} | 0 | 0 (a merge: no training) | {wall} |")
    lines.append(f"| all | | {total:,} | |")
    return lines + [""]
