"""The README's main job, `python -m demo --quick`, end to end on real man pages.

Real everything, run by the recipe's runner: Ray Data rendering the pages, SentencePiece trained and extended,
Ray Data tokenization, a mixer service per run, trainer processes pulling over HTTP, a live
`curl -X PUT` ratio change, a run steered by the service's forgetting-budget controller, the union
baseline, every ablation (`--findings all`) and the report (seeds: a unit test of their report section).
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from demo.forgetting_budget import CONTROLLER_STATE_NAME
from demo.experiment import main as experiment_main
from demo.experiment import experiment_record, reuse
from demo.experiment_config import ControllerRun, load_config
from demo.experiment_report import LIVE_CHANGE_NAME
from trainer.metrics_log import read_metrics

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(
    not Path("/usr/share/man/de/man1").is_dir(), reason="German man pages not installed (make test installs them)"
)


def test_quick_demo_end_to_end(tmp_path):
    work = tmp_path / "demo"
    # Every run kind once; seeds only repeat the fixed-ratio runs (their report section is tested below,
    # test_the_seed_spread_says_which_differences_exceed_it), and CI's 20 minutes have no room for them.
    completed = subprocess.run([sys.executable, "-m", "demo", "--quick", f"--work-dir={work}", "--findings=all"],
                               cwd=REPO, capture_output=True, text=True, timeout=1500)
    assert completed.returncode == 0, completed.stdout[-4000:] + completed.stderr[-4000:]
    for secret in ("admin-token", "read-token"):  # commands are echoed, but never with a token's value
        assert (work / secret).read_text().strip() not in completed.stdout + completed.stderr
    cfg = load_config("quick")
    selected = cfg.selected_runs("all", 1)

    report = (work / "report.md").read_text()
    for spec in selected:
        if spec.seed == 0:
            assert f"| {spec.name} |" in report
    assert "## Next to the paper" in report and "Without replay the old loss rises" in report
    for share in ("5%", "25%", "50%"):
        assert f"**{share} replay** removes" in report
    for name in ("val_en", "val_de", "loss_over_steps", "lr_over_steps", "tradeoff"):
        assert (work / "plots" / f"{name}.png").stat().st_size > 0

    # Every finding of the paper is a row with a verdict; the union baseline and the seed spread are there.
    findings = report.split("## The paper's findings, measured")[1].split("\n## ")[0]
    for finding in ("Without replay", "A little replay", "More replay forgets less", "matches re-training on the union",
                    "Re-warming adapts more", "higher re-warm peak", "re-warm's length", "optimizer state",
                    "Extending the tokenizer"):
        row = next(line for line in findings.splitlines() if finding in line)
        assert any(f"| {verdict} |" in row for verdict in ("holds", "holds in direction only", "does not hold")), row
    assert "## Continue, or re-train on old + new?" in report and f"| {cfg.union.name} |" in report
    pins = json.loads((work / "corpus.json").read_text())
    assert all(f"`{pins[lang]['sha256']}`" in report for lang in ("en", "de"))
    assert "bits/byte" in report

    # The controller run: its budget, its forgetting against it, the German comparison and every decision
    # with its reason, from the service's GET /v1/controller saved in the run folder.
    controller = next(spec for spec in cfg.runs if isinstance(spec, ControllerRun))
    state = json.loads((work / "runs" / controller.name / CONTROLLER_STATE_NAME).read_text())
    assert state["law"] == "forgetting-budget" and state["settings"]["max_share"] == controller.max_share
    assert f"## Replay that steers itself: `{controller.name}`" in report
    for figure in ("**Budget** B = ", "**English forgetting at the end**", "**Average English share**",
                   "**German**: "):
        assert figure in report
    assert f"B = {state['settings']['budget']:.4g}" in report
    assert state["decisions"] and all(d["reason"] in report for d in state["decisions"])
    assert (work / "plots" / "controller.png").stat().st_size > 0

    # Each phase-2 run received the replay share it asked for, in every batch: its first one, then the
    # operator's live change or the controller's decisions, each from the stage's first step.
    for spec in selected:
        train = [r for r in read_metrics(work / "runs" / spec.name) if r["kind"] == "train"]
        assert len(train) == cfg.phase2_steps
        stages = [(0, spec.replay)]
        if spec.switch_to is not None:
            stage_start = json.loads((work / "runs" / spec.name / LIVE_CHANGE_NAME).read_text())["stage"]["start_step"]
            assert stage_start >= cfg.phase2_steps // 2  # never rewrites a step already served
            stages.append((stage_start, spec.switch_to))
        if spec is controller:
            stages += [(d["stage"]["start_step"], d["stage"]["weights"]["en"]) for d in state["decisions"]]
            assert all(controller.min_share <= share <= controller.max_share for _, share in stages)
        for record in train:  # batch_step: the service's number of the batch the update trained on
            expected = next(share for start, share in reversed(stages) if record["batch_step"] >= start)
            # every prefix of the sample sequence is within one sample of its share, so a batch within two
            assert abs(record["source_share"]["en"] - expected) < 2 / cfg.global_batch

    # The vocabulary grew to the extension, and the runs started from the phase-1 checkpoint: a grown model
    # computes what it did (a mixture of experts sums its experts in another order: to float precision).
    first_evals = {s.name: next(r for r in read_metrics(work / "runs" / s.name) if r["kind"] == "eval")["val_loss"]
                   for s in selected if s.extend_tokenizer}
    assert len({json.dumps(e, sort_keys=True) for name, e in first_evals.items() if "grow" not in name
                and "upcycle" not in name}) == 1
    for name, losses in first_evals.items():
        assert losses == pytest.approx(first_evals["replay-0"], rel=1e-5), name

    # The other strategies: merges (no training) and grown runs, each a row beside replay-5 and replay-25.
    alternatives = report.split("## Merge or grow instead of replay?")[1].split("\n## ")[0]
    for merge in ("merge-linear-0.25", "merge-linear-0.5", "merge-linear-0.75", "merge-ties-0.2"):
        assert f"| {merge} |" in alternatives and (work / "merges" / f"{merge}.json").is_file()
    for name in ("merge-linear-0.5", "merge-ties-0.2", "grow-blocks-new-only", "upcycle-moe-4x2"):
        row = next(line for line in findings.splitlines() if f"`{name}` instead of replay" in line)
        assert "replay-5" in row.split(" | ")[3] and "replay-25" in row.split(" | ")[3], row
    moe = next(line for line in alternatives.splitlines() if line.startswith("| upcycle-moe-4x2 |"))
    assert moe.endswith("M) |")  # its parameters, and (in brackets) those a token passes through

    # A second invocation, the headline runs only, reuses everything the first built.
    again = subprocess.run([sys.executable, "-m", "demo", "--quick", f"--work-dir={work}"],
                           cwd=REPO, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert not any(f"=== {step}" in again.stdout for step in ("phase 1:", "phase 2:", "union baseline:"))

    # A corpus rendered again with other text is refused, with the reason, before anything is compared.
    with open(work / "corpora" / "de.jsonl", "a") as corpus:
        corpus.write(json.dumps({"text": "Eine Seite mehr."}) + "\n")
    refused = subprocess.run([sys.executable, "-m", "demo", "--quick", f"--work-dir={work}"],
                             cwd=REPO, capture_output=True, text=True, timeout=600)
    assert refused.returncode == 2 and "error: the corpora" in refused.stderr and "--fresh" in refused.stderr


def test_a_work_dir_built_with_other_settings_is_not_reused(tmp_path, capsys):
    (tmp_path / "experiment.json").write_text('{"phase1_steps": 1}')
    assert experiment_main(["--quick", f"--work-dir={tmp_path}"]) == 2
    assert "other settings" in capsys.readouterr().err
    assert (tmp_path / "experiment.json").read_text() == '{"phase1_steps": 1}'


def test_runs_added_or_left_out_reuse_the_work_dir_but_a_changed_run_is_refused():
    cfg = load_config("quick")
    everything = experiment_record(cfg, cfg.selected_runs("all", 3))
    headline = experiment_record(cfg, cfg.selected_runs())
    merged = reuse(json.dumps(everything), headline)  # the headline after `--findings all --seeds 3`
    assert merged["runs"].keys() == everything["runs"].keys()
    assert reuse(json.dumps(headline), everything)["runs"] == everything["runs"]  # runs added since
    changed = json.loads(json.dumps(everything))
    changed["runs"]["replay-25-reset-optimizer"]["reset_optimizer"] = False
    with pytest.raises(ValueError, match="replay-25-reset-optimizer"):
        reuse(json.dumps(changed), headline | {"runs": everything["runs"]})
    other = json.loads(json.dumps(headline))
    other["settings"]["phase1_steps"] += 1  # the runs it holds must have been trained with these settings
    with pytest.raises(ValueError, match="phase1_steps"):
        reuse(json.dumps(other), headline)


def test_the_selection_of_runs():
    cfg = load_config("default")
    names = [spec.name for spec in cfg.selected_runs("all", 3)]
    assert names[:len(cfg.runs)] == [spec.name for spec in cfg.runs]  # the controller's budget run comes first
    lrs = sorted(spec.max_lr or cfg.max_lr for spec in cfg.selected_runs("all") if spec.replay == 0.25
                 and (spec.recipe or spec.max_lr))
    assert len(lrs) == 3 and lrs[-1] / lrs[0] >= 10 - 1e-9
    assert {"replay-0-seed1", "replay-50-seed2"} <= set(names) and "controller-seed1" not in names


def test_the_seed_spread_says_which_differences_exceed_it():
    from demo.experiment_report import spread_lines
    from demo.findings import Judge, Point

    table = sorted((spec for spec in load_config("quick").runs if spec.recipe), key=lambda spec: spec.replay)[:3]
    german = {table[0].name: 4.00, table[1].name: 4.01, table[2].name: 4.20}  # +0.01, then +0.19
    points = {spec.name: Point(spec.name, spec, {"en": 5.0, "de": german[spec.name]}, {"en": 2.0, "de": 2.0},
                               {"en": 4.9, "de": 3.9}, {"en": 5.1, "de": 4.3}, 3) for spec in table}
    lines = spread_lines(points, Judge({"en": 0.05, "de": 0.05}))
    assert lines[0] == "## Seed spread"
    rows = [line for line in lines if line.startswith(f"| {table[0].name} |") or line.startswith(f"| {table[1].name} |")]
    assert "+0.010 within" in rows[0] and "+0.190 **beyond**" in rows[1]
    assert spread_lines(points, Judge(None)) == []  # one seed: no spread to judge by


def test_the_controller_budget_is_the_peak_forgetting_of_its_fixed_run(tmp_path):
    """A re-warmed run forgets most near its peak learning rate; the bound it held all along is that peak,
    not where its decay brought it back to (which it broke for most of its steps)."""
    from demo.forgetting_budget import choose_budget, round_up

    fixed = ControllerRun("controller", 0.05)
    run_dir = tmp_path / "replay-5"
    run_dir.mkdir()
    losses = {0: 2.0, 50: 2.5, 100: 2.4, 300: 2.2}  # forgetting 0, +0.25 (the peak), +0.2, +0.1
    (run_dir / "metrics.jsonl").write_text("".join(
        json.dumps({"kind": "eval", "step": step, "val_loss": {"en": loss, "de": 5.0}}) + "\n"
        for step, loss in losses.items()))
    reference = next(spec for spec in load_config("default").runs if spec.name == fixed.budget_from)
    budget = choose_budget(fixed, {reference: run_dir})
    assert budget.value == pytest.approx(0.25) and "at step 50" in budget.origin
    assert choose_budget(fixed, {}).value == fixed.default_budget
    # Three digits for the service's flag and the report, rounded up: the reference run's peak stays within.
    assert [round_up(v) for v in (0.2723, 0.272, 0.0101, 1.234)] == [0.273, 0.272, 0.0101, 1.24]


def test_a_failed_step_is_the_same_one_error_as_a_refusal():
    """One way to fail: a step that fails raises the DemoError a refusal raises, which main says as one
    `error:` line with exit 2 (no SystemExit from deep inside the demo)."""
    from demo.experiment import DemoError, run

    with pytest.raises(DemoError, match=r"step failed \(exit 3\)"):
        run([sys.executable, "-c", "raise SystemExit(3)"])


def test_the_demo_runs_the_recipes_typed_steps_each_command_parsed_back_by_its_part(tmp_path):
    """The demo's steps are the recipe's (recipe/plan.py), run by the recipe's StepRunner: each holds its
    part's config, and the command it stands for (recipe/argv.py) reads back to that config. Phase 2 replays
    English in the extended encoding and scores it in the base one too; phase 1 trains on the base one."""
    from dataclasses import replace

    from demo.steps import base_tokenizer_step, phase1_step, phase2_step, pipeline_steps, render_step, union_step
    from pipeline.corpora.manpages import parse_args as manpages_parse
    from pipeline.tokenize import parse_args as tokenize_parse
    from pipeline.tokenizer.__main__ import build_parser as tokenizer_parser, config_from_args
    from recipe.argv import service_argv, trainer_argv
    from service.service_config import parse_args as service_parse
    from trainer.train_config import parse_args as trainer_parse

    cfg = replace(load_config("quick"), work_dir=tmp_path)
    selected = cfg.selected_runs("all", 2)
    trains = [phase1_step(cfg), union_step(cfg), *(phase2_step(cfg, spec, 0.05) for spec in selected)]
    for step in trains:
        assert trainer_parse(trainer_argv(step.trainer)) == step.trainer, step.name
        assert step.service is None or service_parse(service_argv(step.service)) == step.service, step.name
    for step in [render_step(cfg, "en"), base_tokenizer_step(cfg), *pipeline_steps(cfg, selected)]:
        argv = step.command()[3:]  # after python -m MODULE
        parsed = {"pipeline.corpora.manpages": lambda: manpages_parse(argv)[0],
                  "pipeline.tokenize": lambda: tokenize_parse(argv)[0],
                  "pipeline.tokenizer": lambda: config_from_args(tokenizer_parser().parse_args(argv))}[step.module]()
        assert parsed == step.config, step.name
    assert phase1_step(cfg).trainer.data.datasets == {"en": str(tmp_path / "datasets" / "en-base")}
    replayed = phase2_step(cfg, selected[1])
    assert replayed.service.datasets["en"] == str(tmp_path / "datasets" / "en")
    assert replayed.trainer.data.eval_datasets["en-base"] == str(tmp_path / "datasets" / "en-base")
    plain = phase2_step(cfg, next(spec for spec in selected if not spec.extend_tokenizer))
    assert plain.service.datasets == {"en": str(tmp_path / "datasets" / "en-base"),
                                      "de": str(tmp_path / "datasets" / "de-base")}


def test_the_encoding_row_sets_forgetting_in_the_extended_encoding_beside_the_base_one(tmp_path):
    """The report's row beyond the paper: English forgetting in bits per byte, from each replay run's first
    evaluation to its last, in the extended encoding it replayed and in the base one."""
    from demo.findings import encoding_row
    from demo.measures import ValSplit

    splits = {"en": ValSplit(10, 100, 400), "en-base": ValSplit(10, 120, 400)}  # 0.25 and 0.3 tokens per byte
    runs = {}
    for share, (extended, base) in {0.0: ((2.0, 2.5), (2.0, 2.2)), 0.25: ((2.0, 2.2), (2.0, 2.1))}.items():
        runs[share] = tmp_path / f"replay-{share}"
        runs[share].mkdir()
        (runs[share] / "metrics.jsonl").write_text("".join(
            json.dumps({"kind": "eval", "step": step, "val_loss": {"en": en, "de": 5.0, "en-base": en_base}}) + "\n"
            for step, en, en_base in ((0, extended[0], base[0]), (40, extended[1], base[1]))))
    finding, paper, measured, verdict, why = encoding_row(runs, splits)
    # 0.5 nats/token x 0.25 tokens/byte / ln 2 = +0.1803 bits/byte extended; 0.2 x 0.3 / ln 2 = +0.0866 base
    assert "0% replay +0.1803 / +0.0866" in measured and "25% replay +0.0721 / +0.0433" in measured
    assert verdict == "holds"
    assert encoding_row(runs, {"en": splits["en"]}) is None  # no base-encoding dataset: no row
