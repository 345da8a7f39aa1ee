"""The training loop end to end on real token datasets: learning, resume equality, continued runs."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from trainer.__main__ import main
from trainer.train_config import build_parser, parse_args, resume_command
from trainer.metrics_log import read_metrics
from trainer.train import train

REPO = Path(__file__).resolve().parents[1]
# One intra-op thread: the models are tiny, and on a shared 2-core machine a second spinning
# OpenMP thread costs far more than it gives.
torch.set_num_threads(1)

SMALL = ["--model", "test", "--micro-batch", "4", "--eval-batches", "2", "--no-progress"]
# In-process mixing only: with --stream the service decides the batch geometry.
GEOMETRY = ["--seq-len", "32", "--global-batch", "8"]


def write_datasets(folder: Path, english_model: Path, english_lines: list[str], german_lines: list[str]
                   ) -> dict[str, Path]:
    """English and German token datasets under `folder`: 600 training documents each, 100 validation."""
    from tests.conftest import write_token_dataset  # here, not above: test_fsdp's ranks import this module

    return {name: write_token_dataset(folder / name, lines[:600], english_model, lines[1900:]).root
            for name, lines in (("en", english_lines), ("de", german_lines))}


@pytest.fixture(scope="module")
def datasets(tmp_path_factory, english_model, english_lines, german_lines):
    """Written once for the module: the tests only read them (each run writes under its test's tmp_path)."""
    return write_datasets(tmp_path_factory.mktemp("datasets"), english_model, english_lines, german_lines)


def args_for(datasets: dict[str, Path], out: Path, *extra: str) -> list[str]:
    flags = [f"--dataset={name}={path}" for name, path in datasets.items()]
    return flags + SMALL + GEOMETRY + ["--out", str(out), *extra]


def train_losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if r["kind"] == "train"}


def evals(run_dir: Path) -> list[dict]:
    return [r for r in read_metrics(run_dir) if r["kind"] == "eval"]


def checkpoint_of(run_dir: Path, name: str = "final.pt") -> dict:
    return torch.load(run_dir / "checkpoints" / name, weights_only=False)


def assert_bitwise_equal(a: object, b: object, where: str) -> None:
    """Every tensor of two (nested) state dicts equal to the bit, and everything else equal."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for key in a:
            assert_bitwise_equal(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_bitwise_equal(x, y, f"{where}[{i}]")
    elif torch.is_tensor(a):
        assert torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b), where
    else:
        assert a == b, where


def test_no_data_thread_outlives_a_finished_run(tmp_path, datasets):
    # A prefetch thread left running into interpreter shutdown, inside a torch call, aborted a finished run
    # ("terminate called without an active exception", exit -6) in the demo.
    import threading

    assert main(args_for({"en": datasets["en"]}, tmp_path / "run", "--steps", "3", "--eval-every", "3")) == 0
    assert [t.name for t in threading.enumerate() if t.name == "device-prefetch"] == []


def test_loss_falls_on_real_text(tmp_path, datasets):
    out = tmp_path / "run"
    assert main(args_for({"en": datasets["en"]}, out, "--steps", "40", "--max-lr", "3e-3", "--eval-every", "20")) == 0
    records = read_metrics(out)
    first, last = evals(out)[0], evals(out)[-1]
    assert first["step"] == 0 and last["step"] == 40 and [e["step"] for e in evals(out)] == [0, 20, 40]
    assert last["val_loss"]["en"] < first["val_loss"]["en"] - 1.5  # ln(200) = 5.3 at the start
    assert last["adaptation"]["en"] == pytest.approx(first["val_loss"]["en"] - last["val_loss"]["en"])
    train_records = [r for r in records if r["kind"] == "train"]
    assert len(train_records) == 40
    line = train_records[-1]
    assert line["source_share"] == {"en": 1.0} and line["tokens_per_s"] > 0 and 0 <= line["data_wait_share"] < 1
    assert line["lr"] < 1e-4  # the cosine has decayed to near --min-lr (default 3e-5)
    assert (out / "checkpoints" / "final.pt").is_file() and (out / "checkpoints" / "latest.pt").is_file()


class Crash(Exception):
    pass


def crash_after(step: int):
    def hook(done: int, model, batch) -> None:
        if done == step:
            raise Crash(f"simulated crash after step {done}")

    return hook


def test_resumed_run_matches_uninterrupted_run(tmp_path, datasets):
    common = ["--steps", "12", "--checkpoint-every", "5", "--eval-every", "6", "--weights", "en=3,de=1",
              "--lr-schedule", "wsd", "--max-lr", "2e-3"]
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    train(parse_args(args_for(datasets, straight, *common)))
    with pytest.raises(Crash):
        train(parse_args(args_for(datasets, stopped, *common)), on_step=crash_after(7))
    # The crash left step 6's records past the step-5 checkpoint; resuming must drop them.
    assert max(train_losses(stopped)) == 6
    train(parse_args(args_for(datasets, stopped, *common, "--resume")))

    # The same batches, the same RNG and the same arithmetic: equal to the bit, not merely close.
    assert sorted(train_losses(straight)) == list(range(1, 13))
    assert train_losses(stopped) == train_losses(straight)
    assert [e["step"] for e in evals(stopped)] == [0, 6, 12]
    assert evals(stopped) == evals(straight)
    for name in ("model", "optimizer"):
        assert_bitwise_equal(checkpoint_of(stopped)[name], checkpoint_of(straight)[name], name)
    # en=3,de=1 over 8 rows is exactly 2 German rows in every batch, not just on average.
    shares = [r["source_share"] for r in read_metrics(straight) if r["kind"] == "train"]
    assert shares == [{"en": 0.75, "de": 0.25}] * 12


def test_continued_run_grows_vocab_and_keeps_constant_lr(tmp_path, datasets, german_lines, capsys):
    base = tmp_path / "base"
    train(parse_args(args_for({"en": datasets["en"]}, base, "--steps", "6", "--lr-schedule", "infinite",
                              "--warmup-steps", "1", "--cooldown-steps", "2", "--decay-steps", "2",
                              "--save-at", "4", "--max-lr", "2e-3", "--min-lr", "2e-4")))
    checkpoint = base / "checkpoints" / "step-000004.pt"
    assert checkpoint.is_file()

    # The real extension: German pieces appended to the English tokenizer, and its report.
    from pipeline.dataset import TokenDataset
    from pipeline.tokenizer.extend import extend_model, new_piece_entries
    from pipeline.tokenizer.model_proto import load_model_proto
    from tests.conftest import write_token_dataset

    english_model = TokenDataset(datasets["en"]).tokenizer_path
    (tmp_path / "de.txt").write_text("\n".join(german_lines[:1800]) + "\n")
    extension = extend_model(load_model_proto(english_model), tmp_path / "de.txt", 24, tmp_path)
    extended = tmp_path / "extended.model"
    extended.write_bytes(extension.model.SerializeToString())
    new_vocab = len(extension.model.pieces)
    report = tmp_path / "extended.report.json"
    report.write_text(json.dumps({"base": {"vocab_size": 200}, "extended": {"vocab_size": new_vocab},
                                  "new_pieces": new_piece_entries(extension)}))
    german = write_token_dataset(tmp_path / "de-ext", german_lines[:600], extended, german_lines[1900:])
    continued = tmp_path / "continued"
    old_embedding = torch.load(checkpoint, weights_only=False)["model"]["hf.model.embed_tokens.weight"]

    # Without the report the mismatch is refused with the flag to add; so are a report of another base, an
    # export a fresh model has no tokenizer for, and a checkpoint of the trainer's former own GPT.
    assert main(args_for({"de": german.root}, continued, "--steps", "4", "--init-from", str(checkpoint))) == 2
    assert "pass --extension-report" in capsys.readouterr().err
    other_base = tmp_path / "other.report.json"
    other_base.write_text(json.dumps({"base": {"vocab_size": 190}, "extended": {"vocab_size": 191},
                                      "new_pieces": [{"id": 190, "piece": "x", "base_ids": [1]}]}))
    assert main(args_for({"de": german.root}, continued, "--steps", "4", "--init-from", str(checkpoint),
                         "--extension-report", str(other_base))) == 2
    assert "base.vocab_size is 190 but the checkpoint's model has 200" in capsys.readouterr().err
    assert main(args_for({"en": datasets["en"]}, continued, "--steps", "4", "--init-from", str(checkpoint),
                         "--save-hf", str(tmp_path / "export"))) == 2
    assert "a model made afresh with --model has none" in capsys.readouterr().err
    former = torch.load(checkpoint, weights_only=False)
    former["model_config"] = {"vocab_size": 200, "n_layer": 4, "n_head": 4, "d_model": 128}
    torch.save(former, tmp_path / "gpt.pt")
    assert main(args_for({"en": datasets["en"]}, continued, "--steps", "4", "--init-from", str(tmp_path / "gpt.pt"))) == 2
    assert "former own GPT, which this trainer no longer builds" in capsys.readouterr().err
    assert not continued.exists()  # nothing written by a refused run

    model = train(parse_args(args_for(
        {"en": datasets["en"], "de": german.root}, continued, "--weights", "en=1,de=3", "--steps", "4",
        "--init-from", str(checkpoint), "--extension-report", str(report), "--continue-schedule",
        "--eval-dataset", f"en={datasets['en']}", "--eval-dataset", f"de={german.root}", "--eval-every", "2",
    )))
    assert 200 < model.config.vocab_size == new_vocab and model.hf.lm_head.weight is model.hf.model.embed_tokens.weight
    lrs = [r["lr"] for r in read_metrics(continued) if r["kind"] == "train"]
    assert lrs[:2] == pytest.approx([1.1e-3, 1.1e-3])  # the constant phase: no re-warming
    assert lrs[-1] < 1.1e-3  # then its own anneal
    first, last = evals(continued)[0], evals(continued)[-1]
    assert first["step"] == 0 and set(first["val_loss"]) == {"en", "de"}
    assert last["forgetting"]["en"] == pytest.approx(last["val_loss"]["en"] - first["val_loss"]["en"])
    assert not torch.equal(model.hf.model.embed_tokens.weight[:200].cpu(), old_embedding)  # it trained on


def test_continue_schedule_follows_the_checkpoints_schedule(tmp_path, datasets, capsys):
    """Issue 11: continuing an infinite schedule with one flag must not re-warm. Phase 1's default phases
    (20 steps: warmup 1, cooldown to step 13, anneal from 17) are recorded in its checkpoints; a 40-step
    continuation from step 17 holds the constant rate and ends with the recorded 3-step anneal. Deriving
    the phases from the new run's length instead put step 17 back in a cooldown, above the constant rate."""
    rates = ["--max-lr", "2e-3", "--min-lr", "2e-4"]
    phase1 = tmp_path / "phase1"
    assert main(args_for({"en": datasets["en"]}, phase1, "--steps", "20", "--lr-schedule", "infinite",
                         "--save-at", "17", *rates)) == 0
    checkpoint = phase1 / "checkpoints" / "step-000017.pt"
    assert checkpoint_of(phase1, checkpoint.name)["schedule"] == {
        "kind": "infinite", "offset": 0,
        "params": {"max_lr": 2e-3, "const_lr": 1.1e-3, "min_lr": 2e-4, "warmup_steps": 1, "cooldown_steps": 12,
                   "anneal_steps": 3, "total_steps": 20, "cooldown_shape": "cosine"},
    }

    continued = tmp_path / "continued"
    assert main(args_for({"en": datasets["en"]}, continued, "--steps", "40", "--init-from", str(checkpoint),
                         "--continue-schedule")) == 0
    lrs = [r["lr"] for r in read_metrics(continued) if r["kind"] == "train"]
    anneal = [1.1e-3 * (2e-4 / 1.1e-3) ** (k / 3) for k in (1, 2)]
    assert lrs == pytest.approx([1.1e-3] * 38 + anneal, rel=1e-12)
    assert checkpoint_of(continued)["schedule"]["offset"] == 17

    # Schedule flags that would contradict the recorded schedule are refused, naming them.
    with pytest.raises(SystemExit) as refused:
        main(args_for({"en": datasets["en"]}, tmp_path / "x", "--init-from", str(checkpoint), "--continue-schedule",
                      "--max-lr", "1e-3", "--warmup-steps", "5"))
    assert refused.value.code == 2 and "--max-lr, --warmup-steps would contradict" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(args_for({"en": datasets["en"]}, tmp_path / "x", "--continue-schedule"))
    assert "give it with --init-from CKPT" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(args_for({"en": datasets["en"]}, tmp_path / "x", "--init-from", str(checkpoint), "--lr-start-step", "17"))
    assert "--lr-start-step was replaced by --continue-schedule" in capsys.readouterr().err
    # A checkpoint taken inside the anneal cannot be continued without re-warming; the message says which can.
    final = phase1 / "checkpoints" / "final.pt"
    assert main(args_for({"en": datasets["en"]}, tmp_path / "x", "--init-from", str(final), "--continue-schedule")) == 2
    assert "saved at step 20 of its schedule" in capsys.readouterr().err


def test_resume_refuses_flags_that_change_the_run(tmp_path, datasets, capsys):
    """Issue 11: --resume with other data or model flags than the run started with is refused, each
    difference named with both values; flags that only change how long or how visibly it runs may differ."""
    out = tmp_path / "run"
    assert main(args_for(datasets, out, "--steps", "4", "--weights", "en=3,de=1", "--checkpoint-every", "2")) == 0
    assert main(args_for(datasets, out, "--steps", "6", "--weights", "en=1,de=3", "--data-seed", "9",
                         "--seq-len", "16", "--resume")) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {out / 'checkpoints' / 'latest.pt'}: --resume continues the run as it was started")
    assert [line for line in err.splitlines() if line.startswith("  ")] == [
        "  --weights: checkpoint {'en': 3.0, 'de': 1.0}, given {'en': 1.0, 'de': 3.0}",
        "  --seq-len: checkpoint 32, given 16",
        "  --data-seed: checkpoint 0, given 9",
    ]
    assert "--steps" in err.splitlines()[-1] and "Traceback" not in err  # what may change, and no traceback
    assert max(train_losses(out)) == 4  # nothing was trained or logged

    assert main(args_for(datasets, out, "--steps", "6", "--weights", "en=3,de=1", "--resume", "--eval-every", "3",
                         "--log-every", "2", "--checkpoint-every", "3", "--save-at", "5")) == 0
    assert sorted(train_losses(out)) == [1, 2, 3, 4, 6] and (out / "checkpoints" / "step-000005.pt").is_file()


def test_bad_flags_are_refused_with_the_reason(tmp_path, datasets, capsys):
    with pytest.raises(SystemExit):
        parse_args(["--out", str(tmp_path), "--stream", "http://x", f"--dataset=en={datasets['en']}"])
    assert "not both or neither" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(args_for(datasets, tmp_path, "--weights", "fr=1,en=1,de=1"))
    assert "--weights: unknown dataset(s) ['fr']" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # a dataset left out is not a weight of 0
        parse_args(args_for(datasets, tmp_path, "--weights", "en=1"))
    assert "--weights: no weight for ['de'] (give 0" in capsys.readouterr().err
    assert main(args_for(datasets, tmp_path / "r", "--resume")) == 2
    assert "nothing to resume" in capsys.readouterr().err


def test_stream_source_trains_exactly_like_the_in_process_mixer(tmp_path, datasets):
    from tests.test_service import ServiceProcess, free_port, service_args

    service = ServiceProcess(service_args(datasets, tmp_path / "state", None, "en=0.75,de=0.25",
                                          seq_len=32, global_batch=8), free_port()).start()
    try:
        common = ["--steps", "4", "--eval-every", "2", "--max-lr", "2e-3"]
        train(parse_args(SMALL + ["--stream", service.url, "--stream-token-file", str(tmp_path / "state.read-token"),
                                  "--out", str(tmp_path / "stream"), *common]))
    finally:
        service.stop()
    train(parse_args(args_for(datasets, tmp_path / "local", "--weights", "en=0.75,de=0.25", "--data-seed", "5",
                              *common)))
    assert train_losses(tmp_path / "stream") == train_losses(tmp_path / "local")
    assert evals(tmp_path / "stream") == evals(tmp_path / "local")  # default eval sets: the service's datasets


def _served_counters(url: str) -> tuple[float, float]:
    """(leases granted, tokens served) from the service's /metrics: which path a trainer's rows took."""
    import httpx

    text = httpx.get(f"{url}/metrics").text
    values = {"leases": 0.0, "tokens": 0.0}
    for line in text.splitlines():
        if line.startswith("replaymix_leases_total "):
            values["leases"] += float(line.split()[-1])
        elif line.startswith("replaymix_tokens_served_total{"):
            values["tokens"] += float(line.split()[-1])
    return values["leases"], values["tokens"]


def test_compute_local_trains_bit_for_bit_like_the_http_stream(tmp_path, datasets):
    """Issue 19: --compute local computes the rank's rows in the trainer under the service's leases; the run
    must be the HTTP run to the bit, and its rows must really not have come over HTTP."""
    from tests.test_service import ServiceProcess, free_port, service_args

    service = ServiceProcess(service_args(datasets, tmp_path / "state", None, "en=0.75,de=0.25",
                                          seq_len=32, global_batch=8), free_port()).start()
    stream = SMALL + ["--stream", service.url, "--stream-token-file", str(tmp_path / "state.read-token"),
                      "--steps", "4", "--eval-every", "2", "--max-lr", "2e-3"]
    try:
        train(parse_args([*stream, "--compute", "local", "--out", str(tmp_path / "local")]))
        leases, tokens = _served_counters(service.url)
        assert leases >= 1 and tokens == 0  # computed here, under a lease: no token crossed the wire
        train(parse_args([*stream, "--out", str(tmp_path / "http")]))
        assert _served_counters(service.url)[1] > 0
    finally:
        service.stop()
    assert sorted(train_losses(tmp_path / "local")) == [1, 2, 3, 4]
    assert train_losses(tmp_path / "local") == train_losses(tmp_path / "http")
    assert evals(tmp_path / "local") == evals(tmp_path / "http")
    assert_bitwise_equal(checkpoint_of(tmp_path / "local")["model"], checkpoint_of(tmp_path / "http")["model"], "model")


def test_compute_local_needs_stream(tmp_path, capsys):
    with pytest.raises(SystemExit):
        parse_args(["--dataset=en=x", "--compute", "local", "--out", str(tmp_path)])
    assert "--compute local needs --stream" in capsys.readouterr().err


def trainer_process(*args: str) -> subprocess.CompletedProcess:
    """`python -m trainer ARGS` as a user runs it: exit code and stderr as the shell sees them."""
    return subprocess.run([sys.executable, "-m", "trainer", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("refusal", ["wrong token", "mid-run 409"])
def test_a_service_refusal_ends_the_trainer_with_one_line(tmp_path, datasets, refusal):
    """A 4xx from the service (403 for a wrong read token; 409 once batches are asked for beyond
    --max-lookahead, which the client's background fetch raises mid-run) is a user's mistake: the
    trainer prints `error: ...` and exits 2, without a traceback."""
    from service.launcher import ServiceProcess
    from tests.test_service import service_args

    args = service_args(datasets, tmp_path / "state", None, "en=0.75,de=0.25", seq_len=32, global_batch=8)
    token_file = tmp_path / "state.read-token"  # the right token, which service_args wrote
    if refusal == "wrong token":
        token_file = tmp_path / "wrong.token"
        token_file.write_text("not-the-read-token-of-this-service\n")
    else:
        args.append("--max-lookahead=1")  # the trainer's first range request asks for more steps than that
    with ServiceProcess(args) as service:
        result = trainer_process(*SMALL, "--steps", "4", "--stream", service.url, "--stream-token-file",
                                 str(token_file), "--out", str(tmp_path / "run"))
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    error = result.stderr.splitlines()[-1]
    assert error.startswith("error: ") and service.url in error
    if refusal == "wrong token":
        assert "HTTP 403" in error and "wrong read token" in error
    else:
        assert "HTTP 409" in error and "--max-lookahead" in error


def test_report_compares_runs(tmp_path, datasets):
    from trainer.report import main as report_main

    for name, weights in (("replay25", "en=1,de=3"), ("replay0", "en=0,de=1")):
        train(parse_args(args_for(datasets, tmp_path / name, "--steps", "3", "--eval-every", "3",
                                  "--weights", weights)))
    assert report_main([str(tmp_path / "replay25"), str(tmp_path / "replay0"), "--out", str(tmp_path / "rep")]) == 0
    table = (tmp_path / "rep" / "report.md").read_text()
    assert "| replay25 | 3 |" in table and "| replay0 | 3 |" in table and "de val (Δ)" in table
    for png in ("train_loss.png", "lr.png", "val_en.png", "val_de.png"):
        assert (tmp_path / "rep" / png).read_bytes()[:4] == b"\x89PNG"
    assert report_main([str(tmp_path / "missing"), "--out", str(tmp_path / "rep")]) == 2


def run_files(run_dir: Path) -> dict[str, bytes]:
    """Every file of a run folder and its bytes: what a refused command must leave as it was."""
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


def test_an_earlier_run_is_kept_unless_resume_or_overwrite_is_given(tmp_path, datasets, capsys):
    """Issue 18: starting a run in a folder that holds one truncated its metrics and overwrote its checkpoints."""
    out = tmp_path / "run"
    assert main(args_for(datasets, out, "--steps", "3", "--save-at", "2")) == 0
    before = run_files(out)
    capsys.readouterr()

    assert main(args_for(datasets, out, "--steps", "3")) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {out} holds an earlier run (metrics.jsonl, checkpoints/final.pt, "
                          "checkpoints/latest.pt and 1 more)")
    assert "add --resume to continue it" in err and "add --overwrite to delete it" in err
    assert run_files(out) == before  # nothing touched

    with pytest.raises(SystemExit) as refused:
        main(args_for(datasets, out, "--steps", "3", "--resume", "--overwrite"))
    assert refused.value.code == 2 and "pick one" in capsys.readouterr().err

    # --overwrite starts afresh: the old run's files are gone, not mixed with the new run's.
    assert main(args_for(datasets, out, "--steps", "2", "--overwrite")) == 0
    assert not (out / "checkpoints" / "step-000002.pt").exists() and max(train_losses(out)) == 2

    # A run that stopped before its first checkpoint cannot be resumed: the message says --overwrite.
    (out / "checkpoints" / "latest.pt").unlink()
    assert main(args_for(datasets, out, "--steps", "2", "--resume")) == 2
    assert "replace --resume with --overwrite" in capsys.readouterr().err


def test_resume_command_drops_what_only_starts_a_run():
    assert resume_command(["--init-from", "a.pt", "--overwrite", "--steps=3", "--init-from=b.pt", "--out", "r"]) == [
        "--steps=3", "--out", "r", "--resume"]
    assert resume_command(["--out", "r", "--resume"]) == ["--out", "r", "--resume"]


# Long enough that the run is still going when the signal comes after step 3 (37 steps of ~0.1 s to spare),
# short enough that the resumed run and the uninterrupted one are cheap; evaluations before and after the stop.
SIGNALLED_STEPS = 40
SIGNALLED_RUN = ["--steps", str(SIGNALLED_STEPS), "--checkpoint-every", "1000", "--eval-every", "20",
                 "--weights", "en=3,de=1", "--lr-schedule", "wsd", "--max-lr", "2e-3"]


@pytest.fixture(scope="module")
def uninterrupted_run(tmp_path_factory, datasets) -> Path:
    """The run a signalled run must come back to, trained once for both signals: SIGINT and SIGTERM stop the
    same run, so they are compared with the same uninterrupted one."""
    straight = tmp_path_factory.mktemp("signalled") / "straight"
    train(parse_args(args_for(datasets, straight, *SIGNALLED_RUN)))
    return straight


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_stops_after_a_step_with_a_checkpoint_and_the_resume_command(tmp_path, datasets, uninterrupted_run,
                                                                              signum, capsys):
    """Issue 18: Ctrl-C (or a scheduler's SIGTERM) ended in a traceback and lost every step since the last
    checkpoint. A real `python -m trainer` is signalled mid-run: it must finish the step, checkpoint it, print
    the command that resumes, exit 128 + signal; that command must then finish the run exactly as an
    uninterrupted one (losses, evaluations, model and optimizer to the bit)."""
    straight, stopped = uninterrupted_run, tmp_path / "stopped"
    # One thread, as this process trains the straight run, so that the arithmetic is the same to the bit.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen([sys.executable, "-m", "trainer", *args_for(datasets, stopped, *SIGNALLED_RUN)],
                             cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = stopped / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and metrics.read_text().count('"kind": "train"') >= 3):
        assert child.poll() is None and time.monotonic() < deadline, child.communicate()
        time.sleep(0.05)
    child.send_signal(signum)
    stdout, stderr = child.communicate(timeout=120)

    assert child.returncode == 128 + signum, stderr
    assert "Traceback" not in stderr
    stopped_at = max(train_losses(stopped))
    assert 3 <= stopped_at < SIGNALLED_STEPS  # mid-run
    assert checkpoint_of(stopped, "latest.pt")["step"] == stopped_at  # no step lost
    assert f"stopped by {signal.Signals(signum).name} at step {stopped_at}" in stderr
    command = shlex.split(stderr.split("resume with:\n", 1)[1].splitlines()[0])
    python_m_trainer = [sys.executable, "-m", "trainer"]
    assert command == [*python_m_trainer, *args_for(datasets, stopped, *SIGNALLED_RUN), "--resume"]

    # The printed command, through the function `python -m trainer` runs: the signalled process above is the
    # CLI's own process, so a second one would only pay the imports again.
    assert main(command[len(python_m_trainer):]) == 0, capsys.readouterr().err
    assert sorted(train_losses(straight)) == list(range(1, SIGNALLED_STEPS + 1))
    assert train_losses(stopped) == train_losses(straight)
    assert evals(stopped) == evals(straight)
    for name in ("model", "optimizer"):
        assert_bitwise_equal(checkpoint_of(stopped)[name], checkpoint_of(straight)[name], name)


def test_resuming_a_finished_run_says_it_is_finished_and_changes_nothing(tmp_path, datasets, capsys):
    """Issue 18: --resume of a finished run printed "final loss nan"."""
    out = tmp_path / "run"
    assert main(args_for(datasets, out, "--steps", "3")) == 0
    before = run_files(out)
    capsys.readouterr()
    assert main(args_for(datasets, out, "--steps", "3", "--resume")) == 0
    printed = capsys.readouterr().out
    assert f"{out}: the run is finished: its checkpoint is at step 3 and --steps is 3" in printed
    assert f"last train loss {train_losses(out)[3]:.4f} at step 3" in printed and "nan" not in printed
    assert run_files(out) == before
    # Another model size or schedule is refused, not silently replaced by the checkpoint's.
    assert main(args_for(datasets, out, "--steps", "3", "--resume", "--model", "tiny", "--lr-schedule", "wsd")) == 2
    err = capsys.readouterr().err
    assert "--model: checkpoint 'test', given 'tiny'" in err
    assert "--lr-schedule: checkpoint 'cosine', given 'wsd'" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_cuda_is_refused_before_anything_starts(tmp_path, datasets, capsys):
    """Issue 18: --device cuda without CUDA ended in an AttributeError from torch's internals."""
    out = tmp_path / "run"
    assert main(args_for(datasets, out, "--device", "cuda")) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --device cuda: no CUDA device is available: ") and "--device cpu" in err
    assert not out.exists()


def test_with_stream_the_flags_the_service_decides_are_refused(tmp_path, capsys):
    """Issue 18: with --stream, --seq-len, --global-batch, --weights and --data-seed were silently ignored."""
    stream = ["--stream", "http://127.0.0.1:1", "--out", str(tmp_path)]
    for flag, value, service_flag in (("--seq-len", "32", "--seq-len"), ("--global-batch", "8", "--global-batch"),
                                      ("--weights", "en=1", "--weights"), ("--data-seed", "0", "--seed")):
        with pytest.raises(SystemExit) as refused:
            parse_args([*stream, flag, value])
        err = capsys.readouterr().err
        assert refused.value.code == 2
        assert f"{flag}: with --stream the mixer service decides these (its {service_flag}); drop them" in err
    # In-process mixing keeps its defaults.
    data = parse_args(["--dataset=en=x", "--dataset=de=y", "--out", str(tmp_path)]).data
    assert (data.seq_len, data.global_batch, data.seed, data.weights) == (256, 32, 0, {"en": 1.0, "de": 1.0})


def test_an_empty_val_split_trains_without_evaluation_and_names_both_ways_to_get_one(
        tmp_path, token_dataset_factory, english_model, english_lines, capsys):
    """Issue 18: a small corpus tokenized at the default --val-fraction has no val split; the trainer must
    say how to get one: --eval-dataset here, or the tokenize job's --val-fraction. Issue 26: and train on,
    without evaluation, saying so once."""
    no_val = token_dataset_factory("en", english_lines[:100], english_model)
    assert main(args_for({"en": no_val.root}, tmp_path / "run", "--steps", "2", "--eval-every", "1")) == 0
    out = capsys.readouterr().out
    assert out.count(f"the val split of {no_val.root} is empty") == 1
    assert "--eval-dataset NAME=PATH" in out and "`python -m pipeline.tokenize --val-fraction`" in out
    assert out.count("no evaluation in this run") == 1
    assert evals(tmp_path / "run") == [] and len(train_losses(tmp_path / "run")) == 2
    # A set given for evaluation must be scorable: refused, as before.
    assert main(args_for({"en": no_val.root}, tmp_path / "run2", "--steps", "2",
                         f"--eval-dataset=held={no_val.root}")) == 2
    assert f"the val split of {no_val.root} holds 0 tokens" in capsys.readouterr().err


def test_no_progress_prints_a_line_per_evaluation(tmp_path, datasets, capsys):
    """Issue 18: --no-progress printed nothing until the end."""
    assert main(args_for(datasets, tmp_path / "run", "--steps", "4", "--eval-every", "2")) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines[:3]] == ["step 0/4", "step 2/4", "step 4/4"]
    assert lines[0].startswith("step 0/4: val loss en ") and lines[2].startswith("step 4/4: train loss ")
    assert lines[3].startswith("trained steps 0..4") and len(lines) == 4


def test_train_records_name_the_batch_they_trained_on(tmp_path, datasets):
    """Issue 18: steps were 0-based in the service and 1-based in metrics.jsonl with nothing saying so. A train
    record's step counts the updates done; its batch_step is the mixer's number of the batch it trained on."""
    out = tmp_path / "run"
    train(parse_args(args_for(datasets, out, "--steps", "3")))
    records = [r for r in read_metrics(out) if r["kind"] == "train"]
    assert [(r["step"], r["batch_step"]) for r in records] == [(1, 0), (2, 1), (3, 2)]
    assert [r["step"] for r in evals(out)] == [0, 3]  # the model before any update, and after the last
    assert checkpoint_of(out)["step"] == 3  # the model after 3 updates, which resumes by fetching batch 3


def test_every_flag_has_help_and_its_default():
    """Issue 18: most trainer flags showed no help or default in --help."""
    from trainer.report import build_parser as report_parser

    for parser in (build_parser(), report_parser()):
        for action in parser._actions:
            if action.help == "==SUPPRESS==" or action.dest == "help":
                continue
            assert action.help, f"{parser.prog} {action.option_strings or action.dest}: no help"
            if action.option_strings and not action.required:
                assert "default" in action.help, f"{parser.prog} {action.option_strings}: no default in its help"
