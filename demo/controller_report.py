"""The report's section on the controller run: did the forgetting-budget controller hold its budget, with
how much replay, and at what German cost against the fixed-ratio runs?

Figures come from the run's metrics.jsonl (per-step English share, per-evaluation losses) and from
controller.json, the service's `GET /v1/controller` answer saved when the run ended (its decisions, each a
stage of the mix log with the reason the controller gave).
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Mapping

import matplotlib

matplotlib.use("Agg")  # files only; no display on training machines
import matplotlib.pyplot as plt  # noqa: E402

from demo.experiment_config import ControllerRun, ExperimentConfig, Phase2Run  # noqa: E402
from demo.forgetting_budget import CONTROLLER_STATE_NAME, OLD, choose_budget, forgetting_trajectory  # noqa: E402
from trainer.metrics_log import read_metrics  # noqa: E402

SECTION_TITLE = "## Replay that steers itself"


def english_shares(run_dir: Path) -> list[tuple[int, float]]:
    """(batch step, English share of that batch) for every training step, from the trainer's metrics."""
    return [(r["batch_step"], r["source_share"][OLD]) for r in read_metrics(run_dir) if r["kind"] == "train"]


def average_share(run_dir: Path) -> float:
    """The English share the run used, averaged over its training steps."""
    return statistics.fmean(share for _, share in english_shares(run_dir))


def controller_lines(cfg: ExperimentConfig, spec: ControllerRun, runs: Mapping[Phase2Run, Path],
                     final: Mapping[Phase2Run, Mapping[str, float]], plots: Path, points: Mapping | None = None,
                     judge=None) -> list[str]:
    """The section: budget and its origin, forgetting against it (final and per evaluation), German against
    the nearest fixed-ratio run, the average share, every decision, and plots/controller.png."""
    run_dir = runs[spec]
    order = list(runs)
    budget = choose_budget(spec, {run: runs[run] for run in order[:order.index(spec)]})
    shares, trajectory = english_shares(run_dir), forgetting_trajectory(run_dir)
    average = average_share(run_dir)
    last_step, forgetting = trajectory[-1]
    state = run_dir / CONTROLLER_STATE_NAME
    decisions = json.loads(state.read_text())["decisions"] if state.exists() else None
    plot_share_and_forgetting(plots / "controller.png", spec, shares, decisions or [], trajectory, budget.value)

    within = (f"**within** B ({budget.value - forgetting:.4f} to spare)" if forgetting <= budget.value else
              f"**over** B by {forgetting - budget.value:.4f}")
    lines = [f"{SECTION_TITLE}: `{spec.name}`", "",
             f"The service's forgetting-budget controller (`--controller forgetting-budget --old {OLD} --budget B "
             f"--min-share {spec.min_share} --max-share {spec.max_share} --interval {cfg.eval_every}`) set the "
             f"English share of this run from the trainer's evaluations, starting at {spec.replay:.0%}; otherwise "
             "it is the fixed-ratio runs' recipe (re-warmed cosine, German stream with English replay). "
             "Forgetting here is what the controller holds: the English val loss's rise over its first "
             "evaluation, relative to it.", "",
             f"- **Budget** B = {budget.value:.4g}: {budget.origin}.",
             f"- **English forgetting at the end** (step {last_step}): {forgetting:+.4f}, {within}.",
             f"- **Average English share**: {average:.1%} over its {len(shares)} training steps.",
             *german_comparison(spec, average, final, judge),
             *frontier_comparison(spec, final, points or {}, judge), ""]
    lines += ["Trajectory, per evaluation (share: the mean English share of the batches since the previous one):",
              "", "| step | English val | forgetting | within B | English share |", "|---|---|---|---|---|"]
    english = [r["val_loss"][OLD] for r in read_metrics(run_dir) if r["kind"] == "eval"]
    previous = None
    for (step, rise), loss in zip(trajectory, english):
        since = [share for batch, share in shares if previous is not None and previous <= batch < step]
        lines.append(f"| {step} | {loss:.3f} | {rise:+.4f} | {'yes' if rise <= budget.value else 'no'} "
                     f"| {f'{statistics.fmean(since):.3f}' if since else '-'} |")
        previous = step
    return lines + ["", *decision_lines(cfg, decisions), "",
                    "![English share and forgetting of the controller run](plots/controller.png)", ""]


def german_comparison(spec: ControllerRun, average: float,
                      final: Mapping[Phase2Run, Mapping[str, float]], judge=None) -> list[str]:
    """German loss against the re-warmed fixed-ratio run whose share is nearest the controller's average
    (its seeds' mean where it has several), and whether the gap is larger than the seed spread."""
    fixed = [run for run in final if run.recipe]
    if not fixed:
        return []
    nearest = min(fixed, key=lambda run: abs(run.replay - average))
    difference = final[spec]["de"] - final[nearest]["de"]
    verdict = f"no worse ({difference:+.3f})" if difference <= 0 else f"worse by {difference:.3f}"
    if judge is not None and judge.spread:
        verdict += (", larger than the seed spread" if judge.real("de", difference, final[nearest]["de"])
                    else f", within the seed spread ({judge.spread['de']:.3f})")
    return [f"- **German**: {final[spec]['de']:.3f} against {final[nearest]['de']:.3f} for `{nearest.name}`, the "
            f"fixed run whose share ({nearest.replay:.0%}) is nearest the average: {verdict}."]


def frontier_comparison(spec: ControllerRun, final: Mapping[Phase2Run, Mapping[str, float]], points: Mapping,
                        judge=None) -> list[str]:
    """German against the fixed-ratio trade-off at the controller's own English loss: the fixed runs' (English,
    German) points joined by straight lines. A controller holding less forgetting than its budget pays German
    for it; the fair question is whether it pays more than a fixed share would for the same English."""
    curve = sorted((p.loss["en"], p.loss["de"], p.name) for p in points.values() if p.spec is not None and p.spec.recipe)
    english, german = final[spec]["en"], final[spec]["de"]
    for (en_a, de_a, name_a), (en_b, de_b, name_b) in zip(curve, curve[1:]):
        if en_a <= english <= en_b and en_b > en_a:
            on_curve = de_a + (de_b - de_a) * (english - en_a) / (en_b - en_a)
            gap = german - on_curve
            noise = ""
            if judge is not None and judge.spread:
                noise = (", larger than the seed spread" if judge.real("de", gap, on_curve)
                         else f", within the seed spread ({judge.spread['de']:.3f})")
            return [f"- **Against the fixed-ratio trade-off** at its English loss ({english:.3f}, between `{name_a}` "
                    f"and `{name_b}`): the fixed runs reach German {on_curve:.3f} there; the controller "
                    f"{german:.3f}, {'no worse' if gap <= 0 else 'worse'} ({gap:+.3f}{noise})."]
    return [f"- **Against the fixed-ratio trade-off**: its English loss {english:.3f} lies outside the fixed runs' range."]


def decision_lines(cfg: ExperimentConfig, decisions: list[dict] | None) -> list[str]:
    """Each decision the controller made (a stage of the mix log) with its reason, from controller.json."""
    if decisions is None:
        return [f"The controller's state ({CONTROLLER_STATE_NAME}) was not saved: the run ended without it."]
    if not decisions:
        return ["The controller made no decision: every move it computed was below its smallest."]
    lines = [f"Decisions ({len(decisions)}), each a stage of the service's mix log, placed like an operator's "
             "change at the first batch step not yet served when it was made:", "",
             "| from batch step | English share | reason |", "|---|---|---|"]
    for decision in decisions:
        stage = decision["stage"]
        late = " (after the last step: never served)" if stage["start_step"] >= cfg.phase2_steps else ""
        lines.append(f"| {stage['start_step']}{late} | {stage['weights'][OLD]:.3f} | {decision['reason']} |")
    return lines


def plot_share_and_forgetting(path: Path, spec: ControllerRun, shares: list[tuple[int, float]],
                              decisions: list[dict], trajectory: list[tuple[int, float]], budget: float) -> None:
    """The English share per step (left axis) and the forgetting per evaluation against the budget (right):
    two scales, since a share of tenths holds a forgetting of hundredths. The share is drawn twice: as the
    schedule set it (the stages), and as each batch received it, which a small batch can only approximate."""
    fig, share_axis = plt.subplots(figsize=(7, 4.5))
    share_axis.plot(*zip(*shares), color="tab:blue", alpha=0.3, linewidth=1, label="English share of each batch")
    stages = [(0, spec.replay), *((d["stage"]["start_step"], d["stage"]["weights"][OLD]) for d in decisions)]
    end = shares[-1][0] + 1
    served = [(start, share) for start, share in stages if start < end]
    share_axis.step([start for start, _ in served] + [end], [share for _, share in served] + [served[-1][1]],
                    where="post", color="tab:blue", linewidth=2, label="English share set by the controller")
    share_axis.set(title=f"{spec.name}: English share and forgetting", xlabel="step", ylabel="English share")
    share_axis.set_ylim(bottom=0)
    forgetting_axis = share_axis.twinx()
    forgetting_axis.plot(*zip(*trajectory), color="tab:red", marker="o", markersize=3, label="English forgetting")
    forgetting_axis.axhline(budget, color="tab:red", linestyle="--", label=f"budget {budget:.4g}")
    forgetting_axis.set_ylabel("forgetting (relative rise of English val loss)")
    handles = share_axis.get_legend_handles_labels()[0] + forgetting_axis.get_legend_handles_labels()[0]
    share_axis.legend(handles, [h.get_label() for h in handles], fontsize=8, ncol=2, loc="upper center",
                      bbox_to_anchor=(0.5, -0.15))  # below the axes: nothing to hide
    share_axis.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
