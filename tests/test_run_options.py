"""Issue 26's two small things: a run without evaluation, and --help exiting 0 in every trainer CLI."""

from __future__ import annotations

import pytest
import torch

from trainer.__main__ import main
from trainer.metrics_log import read_metrics

torch.set_num_threads(1)


def test_eval_every_0_trains_without_evaluation_said_once(tmp_path, token_dataset_factory, english_model,
                                                         english_lines, capsys):
    english = token_dataset_factory("en", english_lines[:300], english_model, english_lines[1900:])
    argv = [f"--dataset=en={english.root}", "--model", "test", "--seq-len", "32", "--global-batch", "4",
            "--micro-batch", "4", "--steps", "2", "--eval-every", "0", "--no-progress", "--out", str(tmp_path / "run")]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.count("no evaluation in this run (--eval-every 0)") == 1
    records = read_metrics(tmp_path / "run")
    assert [r["kind"] for r in records] == ["train", "train"]


@pytest.mark.parametrize("module", ["trainer.__main__", "trainer.ray_launcher", "trainer.report", "trainer.merge",
                                    "trainer.downstream"])
def test_help_exits_0(module, capsys):
    import importlib

    with pytest.raises(SystemExit) as shown:
        importlib.import_module(module).main(["--help"])
    assert shown.value.code == 0
    assert capsys.readouterr().out.startswith("usage: ")
