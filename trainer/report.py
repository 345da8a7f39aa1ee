"""`python -m trainer.report RUN_DIR... --out DIR`: plots and a markdown table comparing runs.

Writes DIR/train_loss.png, DIR/lr.png, DIR/val_<set>.png (one per validation set) and DIR/report.md
with, per run, the final training loss, the final loss of each validation set and its change since
the run's first evaluation (+ is forgetting, - is adaptation), throughput and data wait; and, for runs
with --downstream-tasks, each task's metrics at the start and the end and their difference.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # files only; no display on training machines
import matplotlib.pyplot as plt  # noqa: E402

from pipeline.errors import report_user_error  # noqa: E402
from trainer.errors import TrainerError  # noqa: E402
from trainer.metrics_log import read_metrics  # noqa: E402


def _plot(path: Path, title: str, ylabel: str, series: dict[str, tuple[list[int], list[float]]], log_y: bool = False) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, (xs, ys) in series.items():
        ax.plot(xs, ys, label=label, marker="o" if len(xs) < 30 else None, markersize=3)
    ax.set(title=title, xlabel="step", ylabel=ylabel)
    if log_y:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(run_dirs: Sequence[Path], out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    runs = {}
    for run_dir in run_dirs:
        label = run_dir.name if run_dir.name not in runs else str(run_dir)
        records = read_metrics(run_dir)
        runs[label] = ([r for r in records if r["kind"] == "train"], [r for r in records if r["kind"] == "eval"])

    _plot(out / "train_loss.png", "training loss", "loss",
          {k: ([r["step"] for r in t], [r["loss"] for r in t]) for k, (t, _) in runs.items()})
    _plot(out / "lr.png", "learning rate", "lr",
          {k: ([r["step"] for r in t], [r["lr"] for r in t]) for k, (t, _) in runs.items()}, log_y=True)
    sets = sorted({name for _, evals in runs.values() for e in evals for name in e["val_loss"]})
    for name in sets:
        _plot(out / f"val_{name}.png", f"validation loss: {name}", "loss", {
            k: ([e["step"] for e in evals if name in e["val_loss"]], [e["val_loss"][name] for e in evals if name in e["val_loss"]])
            for k, (_, evals) in runs.items()
        })

    header = ["run", "steps", "train loss"] + [f"{s} val (Δ)" for s in sets] + ["mean val", "tokens/s", "data wait"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, (train, evals) in runs.items():
        last = evals[-1] if evals else {"val_loss": {}, "forgetting": {}}
        cells = [label, str(train[-1]["step"] if train else 0), f"{train[-1]['loss']:.3f}" if train else "-"]
        for s in sets:
            loss, change = last["val_loss"].get(s), last["forgetting"].get(s)
            cells.append("-" if loss is None else f"{loss:.3f} ({change:+.3f})")
        losses = [last["val_loss"][s] for s in sets if s in last["val_loss"]]
        cells.append(f"{statistics.fmean(losses):.3f}" if losses else "-")
        cells.append(f"{statistics.median(r['tokens_per_s'] for r in train):,.0f}" if train else "-")
        cells.append(f"{statistics.fmean(r['data_wait_share'] for r in train):.1%}" if train else "-")
        lines.append("| " + " | ".join(cells) + " |")
    plots = ["train_loss.png", "lr.png"] + [f"val_{s}.png" for s in sets]
    body = (
        "# Run comparison\n\n"
        "Δ: change of a validation loss since the run's first evaluation (step 0): + is forgetting, - is adaptation.\n\n"
        + "\n".join(lines) + "\n\n" + _downstream_table(run_dirs) + "\n".join(f"![{p}]({p})" for p in plots) + "\n"
    )
    report = out / "report.md"
    report.write_text(body)
    return report


def _downstream_table(run_dirs: Sequence[Path]) -> str:
    """Runs with --downstream-tasks: each task's metrics at the run's first and last downstream evaluation."""
    lines = []
    for run_dir in run_dirs:
        scored = [r for r in read_metrics(run_dir) if r["kind"] == "downstream"]
        if len(scored) < 2:
            continue
        first, last = scored[0], scored[-1]
        for task, metrics in last["scores"].items():
            for metric, value in metrics.items():
                before = first["scores"].get(task, {}).get(metric)
                change = "-" if before is None else f"{value - before:+.4f}"
                lines.append(f"| {run_dir.name} | {task} | {metric} | {'-' if before is None else f'{before:.4f}'} "
                             f"(step {first['step']}) | {value:.4f} (step {last['step']}) | {change} |")
    if not lines:
        return ""
    return ("## Downstream tasks (lm-evaluation-harness)\n\n| run | task | metric | before | after | Δ |\n"
            "|---|---|---|---|---|---|\n" + "\n".join(lines) + "\n\n")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m trainer.report", allow_abbrev=False,
        description="Compare training runs: DIR/report.md with each run's final training loss, each validation "
                    "set's final loss and its change since the run's first evaluation (+ forgetting, - adaptation), "
                    "throughput and data wait; and plots of the training loss, learning rate and validation losses "
                    "by step (steps count optimizer updates done).")
    parser.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR",
                        help="run folders written by `python -m trainer --out` (their metrics.jsonl), one or more")
    parser.add_argument("--out", type=Path, required=True, metavar="DIR",
                        help="where report.md and the plots go (created if missing; its files are replaced)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        report = write_report(args.runs, args.out)
    except TrainerError as e:
        return report_user_error(e)
    print(f"wrote {report} comparing {len(args.runs)} run(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
