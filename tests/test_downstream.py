"""trainer.downstream: harness tasks of the test's own (local files, no hub) score tiny Hugging Face folders,
before and after, with the difference per task; the scores move when the model does; a task the harness
does not know is one error line."""

from __future__ import annotations

import json
import os

import pytest

from tests.test_hf_model import base_tokenizer, datasets, make_model_folder  # noqa: F401  (fixtures)
from trainer.__main__ import main as train_main
from trainer.downstream import main
from trainer.metrics_log import read_metrics
from trainer.report import write_report

TASK = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: {kind}
doc_to_text: "{{{{context}}}}"
{target}
metric_list:
  - metric: acc
"""


@pytest.fixture(scope="module")
def tasks(tmp_path_factory, english_lines):
    """Two local tasks: one multiple choice (which ending is the sentence's own), one loglikelihood. One folder
    for the module: the harness indexes a task folder (with its own thousands) once per process."""
    tmp_path = tmp_path_factory.mktemp("harness")
    folder = tmp_path / "tasks"
    folder.mkdir()
    rows = []
    for i, line in enumerate(english_lines[:12]):
        words = line.rstrip(".").split()
        context, ending, other = " ".join(words[:-2]), " " + " ".join(words[-2:]), " " + english_lines[i + 20].split()[0]
        rows.append({"context": context, "choices": [ending, other], "label": 0, "target": ending})
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    (folder / "words_choice.yaml").write_text(TASK.format(
        name="words_choice", data=data, kind="multiple_choice",
        target='doc_to_choice: "{{choices}}"\ndoc_to_target: "{{label}}"'))
    (folder / "words_next.yaml").write_text(TASK.format(
        name="words_next", data=data, kind="loglikelihood", target='doc_to_target: "{{target}}"')
        + "  - metric: perplexity\n")
    return folder


def test_before_and_after_scores_and_their_difference_per_task(tmp_path, tasks, base_tokenizer, monkeypatch, capsys):
    pytest.importorskip("lm_eval")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    before = make_model_folder(tmp_path / "before", "llama", base_tokenizer, seed=0)
    after = make_model_folder(tmp_path / "after", "llama", base_tokenizer, seed=1)  # another model
    same = make_model_folder(tmp_path / "same", "llama", base_tokenizer, seed=0)  # the same model again
    # A task the harness does not know: one error line, before any model is read.
    capsys.readouterr()
    assert main(["--tasks", "words_choice,no_such_task", "--include", str(tasks), str(before), str(after)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: --tasks no_such_task: no such harness task among lm-eval's own tasks or {tasks}"]

    out = tmp_path / "scores.json"
    assert main(["--tasks", "words_choice,words_next", "--include", str(tasks), "--out", str(out),
                 str(before), str(after), str(same)]) == 0
    report = json.loads(out.read_text())
    scores = report["scores"]
    assert set(scores[str(before)]) == {"words_choice", "words_next"}
    assert set(scores[str(before)]["words_next"]) == {"acc", "perplexity"}
    changed, unchanged = report["change"][str(after)], report["change"][str(same)]
    assert changed["words_next"]["perplexity"] != 0  # the scores move when the model does
    assert all(value == 0 for metrics in unchanged.values() for value in metrics.values())
    printed = capsys.readouterr().out
    assert f"{after} against {before}:" in printed and "words_next" in printed



def test_a_run_scores_its_tasks_at_start_and_end_and_reports_the_change(tmp_path, tasks, base_tokenizer, datasets,
                                                                       monkeypatch):
    pytest.importorskip("lm_eval")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    source = make_model_folder(tmp_path / "llama", "llama", base_tokenizer)
    run = tmp_path / "run"
    assert train_main([f"--dataset={name}={path}" for name, path in datasets.items()] + [
        "--init-from", f"hf:{source}", "--seq-len", "32", "--global-batch", "4", "--micro-batch", "4", "--steps", "2",
        "--max-lr", "3e-2", "--eval-every", "0", "--no-progress", "--downstream-tasks", "words_next",
        "--downstream-include", str(tasks), "--out", str(run)]) == 0
    scored = [r for r in read_metrics(run) if r["kind"] == "downstream"]
    assert [r["step"] for r in scored] == [0, 2]
    start, end = scored[0]["scores"]["words_next"], scored[1]["scores"]["words_next"]
    assert scored[1]["change"]["words_next"]["perplexity"] == pytest.approx(end["perplexity"] - start["perplexity"])
    assert end["perplexity"] != start["perplexity"]  # two steps at a large rate move it
    report = write_report([run], tmp_path / "report").read_text()
    assert "## Downstream tasks (lm-evaluation-harness)" in report and "| run | words_next | perplexity |" in report
