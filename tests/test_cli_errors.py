"""A CLI prints a user's mistake as one `error: ...` line and exits 2, and lets a bug through with its
traceback (issue 29: catching every ValueError as a user's mistake hid real bugs)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from trainer.__main__ import main

REPO = Path(__file__).resolve().parents[1]

# `python -m trainer` as it is, but for a training function with a bug in it: a ValueError, the type that
# was once taken for a user's mistake. Injected, since a real bug is not kept in the code to test with.
TRAINER_WITH_A_BUG = """
import sys
import trainer.__main__ as cli

def train(config):
    return int("a bug: not a number")

cli.train = train
sys.exit(cli.main(sys.argv[1:]))
"""


def test_a_bug_in_the_trainer_cli_keeps_its_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-c", TRAINER_WITH_A_BUG, "--dataset", f"en={tmp_path}", "--out",
                             str(tmp_path / "run")], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr
    assert "Traceback (most recent call last)" in result.stderr
    assert "ValueError: invalid literal for int()" in result.stderr
    assert "error: invalid literal" not in result.stderr


# The same for the service's and the Ray launcher's command lines.
SERVICE_WITH_A_BUG = """
import sys
import service.__main__ as cli

def build_service(config):
    return int("a bug: not a number")

cli.build_service = build_service
sys.exit(cli.main(sys.argv[1:]))
"""
RAY_LAUNCHER_WITH_A_BUG = """
import sys
import trainer.ray_launcher as cli

def launch(*args):
    return int("a bug: not a number")

cli.launch = launch
sys.exit(cli.main(sys.argv[1:]))
"""


def test_a_bug_in_the_service_and_ray_launcher_clis_keeps_its_traceback(tmp_path):
    for program, args in ((SERVICE_WITH_A_BUG, ["--dataset", f"en={tmp_path}", "--seq-len=8", "--global-batch=2",
                                                 f"--state-dir={tmp_path / 'state'}", "--allow-anonymous-reads"]),
                          (RAY_LAUNCHER_WITH_A_BUG, ["--num-workers=1", "--", "--dataset", f"en={tmp_path}", "--out", str(tmp_path)])):
        result = subprocess.run([sys.executable, "-c", program, *args], cwd=REPO, capture_output=True, text=True,
                                timeout=120)
        assert result.returncode == 1, result.stderr
        assert "Traceback (most recent call last)" in result.stderr
        assert "ValueError: invalid literal for int()" in result.stderr and "error: " not in result.stderr


def test_a_users_mistake_is_one_error_line(tmp_path, capsys, token_dataset_factory, english_model, english_lines):
    # Schedule phases that do not fit --steps: the schedule's own check raises a ValueError, which the
    # trainer hands on as its TrainerError, naming the flags.
    english = token_dataset_factory("en", english_lines[:200], english_model)
    assert main([f"--dataset=en={english.root}", "--out", str(tmp_path / "run"), "--steps", "10", "--lr-schedule",
                 "infinite", "--warmup-steps", "9", "--seq-len", "32", "--global-batch", "8", "--micro-batch", "4",
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: infinite schedule: warmup (9)") and "Traceback" not in err
    assert not (tmp_path / "run").exists()  # nothing written by a refused run
