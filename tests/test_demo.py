"""The README's main job, `python -m demo --quick`, end to end on real man pages.

Real everything: a private Ray head taking `ray job submit`, SentencePiece trained and extended,
Ray Data tokenization, a mixer service per run, trainer processes pulling over HTTP, a live
`curl -X PUT` ratio change, a run steered by the service's forgetting-budget controller, and the report.
"""

import json
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest

from demo.controller_report import CONTROLLER_STATE_NAME
from demo.experiment import main as experiment_main
from demo.experiment import reusable
from demo.experiment_config import ControllerRun, load_config
from demo.experiment_report import LIVE_CHANGE_NAME
from trainer.metrics_log import read_metrics

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(
    not Path("/usr/share/man/de/man1").is_dir(), reason="German man pages not installed (make test installs them)"
)


def test_quick_demo_end_to_end(tmp_path):
    work = tmp_path / "demo"
    completed = subprocess.run([sys.executable, "-m", "demo", "--quick", f"--work-dir={work}"],
                               cwd=REPO, capture_output=True, text=True, timeout=1500)
    assert completed.returncode == 0, completed.stdout[-4000:] + completed.stderr[-4000:]
    cfg = load_config("quick")

    report = (work / "report.md").read_text()
    for spec in cfg.runs:
        assert f"| {spec.name} |" in report
    assert "## Next to the paper" in report and "Without replay the old loss rises" in report
    for share in ("5%", "25%", "50%"):
        assert f"**{share} replay** removes" in report
    assert all((work / "plots" / f"val_{name}.png").stat().st_size > 0 for name in ("en", "de"))

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
    for spec in cfg.runs:
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

    # The vocabulary grew to the extension, and the runs started from the phase-1 checkpoint.
    first_evals = [next(r for r in read_metrics(work / "runs" / s.name) if r["kind"] == "eval") for s in cfg.runs]
    assert len({json.dumps(e["val_loss"], sort_keys=True) for e in first_evals}) == 1

    # A second invocation reuses everything the first built.
    again = subprocess.run([sys.executable, "-m", "demo", "--quick", f"--work-dir={work}"],
                           cwd=REPO, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "phase 1: pretraining" not in again.stdout


def test_a_work_dir_built_with_other_settings_is_not_reused(tmp_path):
    (tmp_path / "experiment.json").write_text('{"phase1_steps": 1}')
    with pytest.raises(SystemExit, match="other settings.*--fresh"):
        experiment_main(["--quick", f"--work-dir={tmp_path}"])
    assert (tmp_path / "experiment.json").read_text() == '{"phase1_steps": 1}'


def test_a_work_dir_built_before_a_run_was_added_is_reused():
    settings = json.dumps(asdict(load_config("quick")), default=str, indent=2)
    before = json.loads(settings)
    before["runs"] = before["runs"][:-1]  # the controller run was added later: the others stay valid
    assert reusable(json.dumps(before, indent=2), settings)
    before["phase1_steps"] += 1  # but the runs it holds must have been trained with these settings
    assert not reusable(json.dumps(before, indent=2), settings)
