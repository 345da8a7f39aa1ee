"""`python -m recipe`: the recipe file, its plan's commands, the runner, and its bad input.

A tiny random Llama saved with a byte-level BPE tokenizer folder and small English and German corpora are
made here (nothing downloaded, nothing of ours mocked). The README's example recipe runs end to end once
(tokenizer extension, a 3-share sweep, the full run at the chosen share); the kill test reuses its
pipeline outputs, trains again while the job is killed twice, and must end with the same weights.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ENGLISH_WORDS, GERMAN_WORDS, make_lines, write_jsonl
from pipeline.shard_cache import CacheConfig
from pipeline.tokenize import TokenizeConfig
from pipeline.tokenize import parse_args as parse_tokenize
from pipeline.tokenizer.__main__ import build_parser as tokenizer_parser, config_from_args
from pipeline.tokenizer.extend import ExtendConfig
from recipe.__main__ import main as recipe_main
from recipe.argv import extend_argv, service_argv, tokenize_argv, trainer_argv
from recipe.outcome import Outcome, choose_share
from recipe.plan import make_plan
from recipe.schema import load_recipe
from service.service_config import parse_args as parse_service
from tests.test_hf_model import make_model_folder, tiny_config, train_tokenizer
from trainer.lr_schedules import ScheduleConfig
from trainer.train_config import DataConfig, TrainConfig
from trainer.train_config import parse_args as parse_trainer

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


# ---------------------------------------------------------------------------------------------- round trips


def test_each_parts_config_round_trips_through_its_own_parser():
    tokenize = TokenizeConfig(inputs=["/data/en.jsonl", "s3://corpora/de/*.jsonl"], tokenizer="/tok", out="/out",
                              split="train", val_fraction=0.05, chunk_bytes=3 << 20, workers=2, num_cpus=2)
    assert parse_tokenize(tokenize_argv(tokenize))[0] == tokenize
    extend = ExtendConfig(base=Path("/tok"), inputs=("/de.jsonl",), old_inputs=("/en.jsonl",), new_pieces=40,
                          out=Path("/tok+de"), num_cpus=2)
    assert config_from_args(tokenizer_parser().parse_args(extend_argv(extend))) == extend
    kept = replace(extend, keep_old_encoding=True, byte_fallback=True, max_old_sample_bytes=1 << 20)
    assert config_from_args(tokenizer_parser().parse_args(extend_argv(kept))) == kept
    # Typed as the service's parser types it (the state dir is a Path or, with URIs, a string).
    minimal = parse_service(["--dataset=en=/d/en", "--seq-len=1", "--global-batch=1", "--state-dir=/state",
                             "--allow-anonymous-reads"])
    service = replace(minimal, datasets={"en": "/d/en", "de": "s3://b/de"}, weights={"en": 0.05, "de": 0.95},
                      seq_len=32, global_batch=8, seed=3, port=1234, allow_anonymous_reads=False, standby=True,
                      lease_seconds=2.5, state_dir="s3://b/runs/state",
                      admin_token_file=Path("/a"), read_token_file=Path("/r"), cache=CacheConfig(Path("/c"), 1 << 30),
                      controller=("forgetting-budget", {"old": "en", "budget": 0.02, "min_share": 0.0,
                                                        "max_share": 0.5, "interval": 5}))
    assert parse_service(service_argv(service)) == service
    streamed = TrainConfig(
        out=Path("/run"), data=DataConfig(stream_url="http://127.0.0.1:9", stream_token_file=Path("/r"),
                                          eval_datasets={"en": "/e", "en-base": "/b"}, micro_batch=4, eval_batches=2),
        schedule=ScheduleConfig(name="wsd", max_lr=1e-3, min_lr=1e-4, warmup_steps=2, decay_steps=3),
        hf_model="/model", extension_report=Path("/tok/extension_report.json"), steps=10, eval_every=5,
        checkpoint_every=5, progress=False, dtype="bfloat16")
    assert parse_trainer(trainer_argv(streamed)) == streamed
    continued = TrainConfig(out=Path("/run2"), data=DataConfig(datasets={"en": "/e", "de": "/d"},
                                                               weights={"en": 0.25, "de": 0.75}, seq_len=64, seed=4),
                            schedule=ScheduleConfig(continued=True, decay_steps=3), init_from=Path("/c.pt"),
                            save_at=(3, 5), model="tiny")
    assert parse_trainer(trainer_argv(continued)) == continued
    assert parse_trainer(trainer_argv(replace(continued, init_from=None, resume=True))).resume


def test_the_sweep_takes_the_smallest_share_within_budget_or_says_none_did():
    def o(share, forgetting):
        return Outcome(f"pilot-{share}", share, {}, {}, forgetting, 0.1, 4)

    pilots = [o(0.25, 0.01), o(0.0, 0.2), o(0.05, 0.04)]
    assert choose_share(pilots, 0.05, "largest").share == 0.05
    none = choose_share([o(0.0, 0.2), o(0.1, 0.1)], 0.05, "largest")
    assert (none.share, none.met) == (0.1, False) and "no share" in none.reason
    assert choose_share([o(0.0, 0.2)], 0.05, "stop") is None


# ---------------------------------------------------------------------------------------------- the workspace


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A model folder (tiny random Llama, byte-level BPE tokenizer) and English/German corpora with held-out
    files, as a user would hold them."""
    root = tmp_path_factory.mktemp("recipe")
    english, german = make_lines(ENGLISH_WORDS, 400, seed=1), make_lines(GERMAN_WORDS, 400, seed=2)
    tokenizer = train_tokenizer(english[:300] + german[:30], 300, root / "tokenizer")
    make_model_folder(root / "models" / "base", "llama", tokenizer)
    (root / "data").mkdir()
    for name, lines in (("en-sample", english), ("de", german)):
        write_jsonl(root / "data" / f"{name}.jsonl", lines[:300])
        write_jsonl(root / "data" / f"{name}-heldout.jsonl", lines[300:])
    return root


def readme_recipe() -> str:
    """The example recipe in the README's recipe section."""
    return README.read_text().split("<!-- readme-recipe -->", 1)[1].split("```yaml\n", 1)[1].split("```", 1)[0]


def scaled(text: str, replacements: dict[str, str]) -> str:
    """The README's recipe at test scale: each replaced line must be in it, so the README cannot drift."""
    for old, new in replacements.items():
        assert old in text, f"the README recipe no longer holds {old!r}"
        text = text.replace(old, new)
    return text


# What makes the README's recipe a test: fewer pieces, shares, steps, and sequences of 32 tokens.
TEST_SCALE = {
    "{extend: 4000}": "{extend: 40}",
    "sweep: [0, 0.01, 0.05, 0.25], pilot_steps: 200": "sweep: [0, 0.25, 0.5], pilot_steps: 6",
    "steps: 2000": "steps: 8",
    "data: {seq_len: 1024, global_batch: 64, micro_batch: 8}": "data: {seq_len: 32, global_batch: 8, micro_batch: 4}",
    "evaluation: {every: 100, batches: 8}": "evaluation: {every: 4, batches: 2}",
    "training: {checkpoint_every: 100}": "training: {checkpoint_every: 2}",
    # Two DDP ranks of one thread each on the 2 cores: the README's torchrun, run end to end and killed.
    "compute: {launcher: torchrun, workers: 8, device: cuda}":
        "compute: {launcher: torchrun, workers: 2, device: cpu, cpus: 2, threads: 1}",
}


@pytest.fixture(scope="module")
def recipe_file(workspace) -> Path:
    path = workspace / "recipe.yaml"
    path.write_text(scaled(readme_recipe(), TEST_SCALE))
    return path


def run_job(recipe: Path, *flags: str, kill_when: Path | None = None) -> subprocess.CompletedProcess | None:
    """`python -m recipe run` in a process group of its own; with `kill_when`, SIGKILL the whole group as soon
    as that file exists (returns None then)."""
    log = recipe.parent / "job.log"
    with open(log, "ab") as out:
        job = subprocess.Popen([sys.executable, "-m", "recipe", "run", str(recipe), *flags], cwd=REPO,
                               env=ONE_THREAD, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        if kill_when is not None:
            while not kill_when.exists():
                assert job.poll() is None, f"the job ended before {kill_when} appeared; see {log}"
                time.sleep(0.05)
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
            # Nothing of the job outlives it (torchrun starts its ranks in sessions of their own): a rank
            # training on, orphaned, would write into the run the rerun resumes.
            deadline = time.monotonic() + 2  # a SIGKILLed process is gone in milliseconds
            while (left := processes_naming(recipe.parent)) and time.monotonic() < deadline:
                time.sleep(0.1)
            assert not left, f"processes of the killed job still run: {left}"
            return None
        job.wait(timeout=900)
    return subprocess.CompletedProcess(job.args, job.returncode, log.read_text(), "")


def processes_naming(folder: Path) -> list[str]:
    """The command lines of this machine's processes that name `folder` (a job's own paths)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            words = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:  # not a process, or it has just ended
            continue
        line = " ".join(w.decode(errors="replace") for w in words if w)
        if str(folder) in line:
            found.append(f"{proc.name}: {line[:200]}")
    return found


# ---------------------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def finished(recipe_file) -> Path:
    """The README's recipe run to the end once: its output folder."""
    result = run_job(recipe_file)
    assert result.returncode == 0, result.stdout[-6000:]
    return recipe_file.parent / "runs" / "base-de"


@pytest.mark.slow
def test_the_readmes_recipe_extends_sweeps_chooses_and_exports(finished):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(finished / "model")
    model = AutoModelForCausalLM.from_pretrained(finished / "model")
    assert len(tokenizer) == model.get_input_embeddings().weight.shape[0] > 300  # the extension's rows
    report = (finished / "report.md").read_text()
    chosen = re.search(r"\*\*Chosen share: ([0-9.]+)\*\*", report)
    assert chosen and float(chosen.group(1)) in (0, 0.25, 0.5)
    sweep = report.split("### Replay sweep", 1)[1].split("**Chosen", 1)[0]
    assert sorted(float(row.split("|")[1]) for row in sweep.splitlines() if re.match(r"\| [0-9.]+ \|", row)) == [0, 0.25, 0.5]
    assert (finished / "plots" / "tradeoff_de.png").stat().st_size > 0
    assert "en-base loss / bits per byte" in report  # the replayed corpus also scored in the base encoding
    lock = json.loads((finished / "recipe.lock.json").read_text())
    assert lock["chosen"] == {"de": float(chosen.group(1))}
    assert lock["recipe"]["data"]["val_fraction"] == 0.05  # defaults resolved
    assert all(len(h) == 64 for h in lock["inputs"].values())  # every input pinned by content
    assert (finished / "service" / "de" / "train" / "mix_log.jsonl").is_file()
    # The old corpus is replayed in the extended encoding: its dataset's tokenizer is the extension.
    manifest = json.loads((finished / "datasets" / "en.de" / "manifest.json").read_text())
    assert manifest["tokenizer"]["vocab_size"] == len(tokenizer)


@pytest.mark.slow
def test_a_killed_job_continues_to_the_same_weights(finished, recipe_file):
    reference = load_file(finished / "model" / "model.safetensors")
    # One pilot and the full run train again in the same folder (the rest reused): their outputs leave.
    for run in ("pilot-0.25", "train"):
        for gone in (finished / "runs" / "de" / run, finished / "service" / "de" / run,
                     finished / "steps" / f"de__{run}.json"):
            subprocess.run(["rm", "-rf", str(gone)], check=True)
    subprocess.run(["rm", "-rf", str(finished / "model")], check=True)
    run_job(recipe_file, kill_when=finished / "runs" / "de" / "pilot-0.25" / "checkpoints" / "latest.pt")
    assert not (finished / "steps" / "de__pilot-0.25.json").exists()  # killed inside the pilot
    run_job(recipe_file, kill_when=finished / "runs" / "de" / "train" / "checkpoints" / "latest.pt")
    assert not (finished / "steps" / "de__train.json").exists()  # killed inside the full run
    result = run_job(recipe_file)
    assert result.returncode == 0, result.stdout[-6000:]
    assert "resuming from its latest checkpoint" in result.stdout
    again = load_file(finished / "model" / "model.safetensors")
    assert again.keys() == reference.keys()
    for name, tensor in reference.items():
        assert torch.equal(again[name], tensor), name


def test_a_sequence_of_updates_continues_each_from_the_last_and_replays_every_earlier_corpus(workspace, tmp_path):
    data = workspace / "data"
    recipe, name = load_recipe(write(tmp_path / "seq.yaml", f"""\
model: hf:{workspace / 'models' / 'base'}
old: {{en: {data / 'en-sample.jsonl'}}}
updates:
  - {{name: de, new: {{de: {data / 'de.jsonl'}}}, tokenizer: {{extend: 40}}, replay: {{share: 0.1}}, steps: 10,
     schedule: {{kind: infinite}}}}
  - {{name: code, new: {{code: {data / 'de-heldout.jsonl'}}}, replay: {{budget: 0.02, old: en}}, steps: 6,
     schedule: {{kind: continue, decay_steps: 2}}}}
  - {{name: more, new: {{more: {data / 'en-sample-heldout.jsonl'}}}, steps: 4,
     replay: {{stages: [{{at: 0, share: 0.1}}, {{at: 2, share: 0.3}}]}}}}
output: {tmp_path / 'out'}
"""))
    plan = make_plan(recipe, name)
    de, code, more = (plan.runs[u] for u in ("de", "code", "more"))
    assert de.trainer.hf_model and de.trainer.extension_report.name == "extension_report.json"
    # Continuing without re-warming starts from the checkpoint kept where the first run's decay begins.
    assert de.trainer.save_at == (8,) and code.trainer.hf_model is None
    assert code.trainer.init_from == de.run_dir / "checkpoints" / "step-000008.pt"
    assert more.trainer.init_from == code.run_dir / "checkpoints" / "final.pt"
    assert code.trainer.schedule.continued and code.trainer.schedule.decay_steps == 2
    # Every earlier corpus replayed, in the encoding of the tokenizer extended by the first update.
    assert set(code.service.datasets) == {"en", "de", "code"} and "datasets/en.de" in code.service.datasets["en"]
    assert code.service.controller[0] == "forgetting-budget" and code.service.controller[1]["old"] == "en"
    assert more.service.weights == {"en": 0.033333, "de": 0.033333, "code": 0.033333, "more": 0.9}
    assert more.later_stages == ((2, {"en": 0.1, "de": 0.1, "code": 0.1, "more": 0.7}),)
    assert {"en-base", "de-base", "code-base"} <= set(more.trainer.data.eval_datasets)


def test_a_step_whose_input_or_setting_changed_is_refused_naming_it_or_moved_aside_with_fresh(workspace, tmp_path):
    from recipe.errors import RecipeError
    from recipe.plan import PipelineStep
    from recipe.runner import Runner, StepRecords

    corpus = write_jsonl(tmp_path / "c.jsonl", ["one document", "another"])
    out = tmp_path / "out"
    (out / "datasets" / "c").mkdir(parents=True)
    config = TokenizeConfig(inputs=[str(corpus)], tokenizer=str(workspace / "tokenizer"), out=str(out / "datasets" / "c"))
    step = PipelineStep("tokenize c", config, (str(corpus), str(workspace / "tokenizer")), (config.out,))
    records = StepRecords(out)
    records.write(step)
    assert records.state(step) == ("done", "")
    # A setting that only says how the step runs this time is not a change.
    assert records.state(replace(step, config=replace(config, overwrite=True, num_cpus=7)))[0] == "done"
    write_jsonl(corpus, ["one document", "another, edited"])
    state, differs = records.state(step)
    assert state == "changed" and f"input {corpus}" in differs
    runner = Runner.__new__(Runner)
    runner.out, runner.records, runner.fresh, runner.store = out, records, False, None
    with pytest.raises(RecipeError, match="--fresh"):
        runner._decide(step)
    assert (out / "datasets" / "c").exists()  # refused: nothing moved
    runner.fresh = True
    assert runner._decide(step) is False
    assert not (out / "datasets" / "c").exists() and list((out / "replaced").rglob("datasets/c"))
    records.write(step)
    assert records.state(replace(step, config=replace(config, val_fraction=0.5)))[1].startswith("setting val_fraction")


def test_a_sweep_plans_its_full_run_once_chosen_fixed_or_handed_to_the_controller(workspace, tmp_path):
    data = workspace / "data"
    text = f"""\
model: hf:{workspace / 'models' / 'base'}
old: {{en: {data / 'en-sample.jsonl'}}}
updates:
  - {{name: de, new: {{de: {data / 'de.jsonl'}}}, steps: 10,
     replay: {{sweep: [0, 0.05, 0.25], pilot_steps: 4, choose: {{budget: 0.03}}, then: THEN}}}}
output: {tmp_path / 'out'}
"""
    recipe, name = load_recipe(write(tmp_path / "fixed.yaml", text.replace("THEN", "fixed")))
    before = make_plan(recipe, name)
    assert [p.share for p in before.pilots["de"]] == [0, 0.05, 0.25] and before.runs["de"] is None
    assert {p.trainer.steps for p in before.pilots["de"]} == {4}
    assert make_plan(recipe, name, {"de": 0.05}).runs["de"].service.weights == {"en": 0.05, "de": 0.95}
    recipe, name = load_recipe(write(tmp_path / "steered.yaml", text.replace("THEN", "controller")))
    steered = make_plan(recipe, name, {"de": 0.05}).runs["de"].service
    assert steered.weights == {"en": 0.05, "de": 0.95} and steered.controller[1]["budget"] == 0.03


# ---------------------------------------------------------------------------------------------- bad input


def fails(capsys, recipe: Path, *flags: str) -> str:
    capsys.readouterr()  # only what the command says
    assert recipe_main(["run", str(recipe), *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.fixture
def small_recipe(workspace, tmp_path):
    def make(extra: str = "", output: str | None = None, model: str = "hf:models/base", replay: str = "{share: 0.05}"):
        out = output or str(tmp_path / "out")
        return write(workspace / f"bad-{abs(hash((extra, out, model, replay)))}.yaml",
                     f"model: {model}\nold: {{en: data/en-sample.jsonl}}\nupdates:\n  - name: de\n"
                     f"    new: {{de: data/de.jsonl}}\n    replay: {replay}\n    steps: 4\n{extra}output: {out}\n")
    return make


def test_bad_input_is_one_error_line_naming_key_and_line_and_writes_nothing(capsys, small_recipe, workspace, tmp_path):
    out = tmp_path / "out"
    misspelt = fails(capsys, small_recipe(replay="{shar: 0.05}"))
    assert "line 6" in misspelt and "updates.0.replay.shar" in misspelt and "did you mean 'share'" in misspelt
    top = fails(capsys, small_recipe(extra="evaluaton: {every: 5}\n"))
    assert "line 8" in top and "did you mean 'evaluation'" in top
    missing = fails(capsys, write(workspace / "missing.yaml",
                                  small_recipe().read_text().replace("data/de.jsonl", "data/nl.jsonl")))
    assert "updates.0.new.de.path" in missing and "nl.jsonl: no such file" in missing and "line 5" in missing
    no_model = fails(capsys, small_recipe(model="hf:models/nowhere"))
    assert "line 1" in no_model and "no config.json" in no_model
    share = fails(capsys, small_recipe(replay="{share: 1.5}"))
    assert "updates.0.replay.share" in share and "[0, 1]" in share and "line 6" in share
    sweep = fails(capsys, small_recipe(replay="{sweep: [0, 0.1], pilot_steps: 2}"))
    assert "choose: {budget: B}" in sweep
    assert not out.exists()  # nothing written by any of them


def test_a_model_that_does_not_fit_its_tokenizer_is_refused(capsys, small_recipe, workspace):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = workspace / "models" / "too-small"
    if not folder.exists():
        AutoModelForCausalLM.from_config(tiny_config("llama", 200)).save_pretrained(folder)
        AutoTokenizer.from_pretrained(workspace / "tokenizer").save_pretrained(folder)
    message = fails(capsys, small_recipe(model="hf:models/too-small"))
    assert "300 pieces" in message and "200 rows" in message


def test_an_output_folder_of_another_recipe_or_a_dead_ray_address_is_refused(capsys, small_recipe, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    (other / "recipe.lock.json").write_text(json.dumps({"name": "someone-else"}))
    message = fails(capsys, small_recipe(output=str(other)))
    assert "another recipe ('someone-else'" in message
    assert sorted(p.name for p in other.iterdir()) == ["recipe.lock.json"]
    from service.launcher import free_port

    dead = fails(capsys, small_recipe(extra=f"compute: {{ray_address: '127.0.0.1:{free_port()}'}}\n"))
    assert "compute.ray_address" in dead and "does not answer" in dead


def test_help_lists_every_key_with_its_default_and_exits_0():
    result = subprocess.run([sys.executable, "-m", "recipe", "--help"], cwd=REPO, env=ONE_THREAD,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    for key in ("updates[].replay.sweep", "updates[].tokenizer.extend", "compute.launcher", "data.seq_len",
                "updates[].schedule.kind", "output"):
        assert key in result.stdout
    assert "(default: 256)" in result.stdout
    section = README.read_text().split("<!-- readme-recipe -->", 1)[1].split("## Using the parts", 1)[0]
    from recipe.schema import key_table

    for key, _, _ in key_table():
        assert f"| `{key}` |" in section, f"README's recipe keys lack {key}"


def test_dry_run_prints_each_step_and_its_exact_command_and_starts_nothing(capsys, recipe_file, tmp_path):
    dry = write(tmp_path / "dry.yaml", recipe_file.read_text().replace("output: runs/base-de",
                                                                     f"output: {tmp_path / 'dry-out'}"))
    dry = write(dry, dry.read_text().replace("hf:models/base", f"hf:{recipe_file.parent / 'models' / 'base'}")
                .replace("data/", f"{recipe_file.parent / 'data'}/"))
    assert recipe_main(["run", str(dry), "--dry-run"]) == 0
    printed = capsys.readouterr().out
    recipe, name = load_recipe(dry)
    plan = make_plan(recipe, name)
    for step in plan.steps():
        assert step.name in printed
    assert "-m pipeline.tokenizer extend" in printed and "-m pipeline.tokenize" in printed
    assert "-m trainer" in printed and "-m service" in printed and "[then] de/train" in printed
    assert not (tmp_path / "dry-out").exists()


# ---------------------------------------------------------------------------------------------- on a cluster


@pytest.mark.slow
def test_the_recipe_submitted_with_ray_job_submit_as_the_readme_says(workspace, tmp_path):
    from tests.test_readme_cluster import (cluster_environment, head_flags, readme_block, run_block, stop_ray_head,
                                           substituted, wait_for_jobs)
    from service.launcher import free_port

    shared = workspace / "shared"
    shared.mkdir()
    data = workspace / "data"
    # Two updates: replay by stages, then a forgetting budget held by the controller, continuing the first
    # update's schedule without re-warming; each trained by two Ray Train workers, as a cluster user would.
    write(shared / "recipe.yaml", f"""\
name: submitted
model: hf:{workspace / 'models' / 'base'}
old: {{en: {data / 'en-sample.jsonl'}}}
updates:
  - {{name: de, new: {{de: {data / 'de.jsonl'}}}, steps: 4, schedule: {{kind: infinite}},
     replay: {{stages: [{{at: 0, share: 0.25}}, {{at: 1, share: 0.5}}]}}}}
  - {{name: more, new: {{more: {data / 'de-heldout.jsonl'}}}, steps: 2, schedule: {{kind: continue, decay_steps: 1}},
     replay: {{budget: 0.02, old: en}}}}
data: {{seq_len: 32, global_batch: 8, micro_batch: 4}}
evaluation: {{every: 2, batches: 1}}
compute: {{launcher: ray, workers: 2, threads: 1}}
output: {shared / 'out'}
""")
    env = cluster_environment(tmp_path)
    dashboard = free_port()
    temp_dir = f"/tmp/rayrecipe{os.getpid()}"  # short: Ray's socket paths must fit in 107 bytes
    head_script = substituted(readme_block("readme-ray-head"), {
        "ray start --head": head_flags(dashboard, temp_dir), "--dashboard-host 0.0.0.0": "--dashboard-host 127.0.0.1"})
    submit = substituted(readme_block("readme-recipe-submit"), {"/shared/recipe.yaml": str(shared / "recipe.yaml")})
    client_env = {**env, "RAY_AUTH_MODE": "token", "RAY_ADDRESS": f"http://127.0.0.1:{dashboard}",
                  "PY": sys.executable, "OMP_NUM_THREADS": "1"}
    with open(tmp_path / "ray-head.log", "wb") as log:
        head = subprocess.Popen(["bash", "-ec", head_script], env=env, cwd=tmp_path, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_jobs(head, client_env)
        job = run_block(submit, client_env, REPO)
        assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
        assert "pipeline steps run on the Ray cluster at" in job.stdout
        assert "recipe submitted done" in job.stdout
        # Each pilot and full run trained as two Ray Train workers on the cluster the job was submitted to.
        assert job.stdout.count("ray train run finished") == 2, job.stdout[-3000:]
    finally:
        stop_ray_head(head, temp_dir)
    assert (shared / "out" / "model" / "config.json").is_file()
    assert (shared / "out" / "runs" / "more" / "train" / "controller.json").is_file()
    assert "## Each corpus after every update" in (shared / "out" / "report.md").read_text()
    # The recipe's second stage is a stage of the run's mix log, put there by the runner before training.
    log = [json.loads(line) for line in (shared / "out" / "service" / "de" / "train" / "mix_log.jsonl").open()]
    assert any("recipe" in e.get("by", "") and e["stage"]["start_step"] == 1 for e in log if "stage" in e), log


def test_the_tokenizer_training_and_man_page_configs_round_trip_through_their_own_parsers(tmp_path):
    """The two pipeline parts the demo's inputs are made with (its steps run by the same runner)."""
    from pipeline.corpora.manpages import ManpagesConfig
    from pipeline.corpora.manpages import parse_args as parse_manpages
    from pipeline.tokenizer.train import TokenizerTrainConfig
    from recipe.argv import manpages_argv, train_tokenizer_argv

    for train in (TokenizerTrainConfig(inputs=(str(tmp_path / "en.jsonl"),), out=tmp_path / "en.model", vocab_size=900),
                  TokenizerTrainConfig(inputs=(str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")),
                                       out=tmp_path / "tok", vocab_size=512, kind="bpe", model_type="unigram",
                                       byte_fallback=False, character_coverage=0.99, text_field="body",
                                       split="train", max_sample_bytes=1000, holdout_fraction=0.1, overwrite=True,
                                       address="127.0.0.1:6379", num_cpus=3)):
        assert config_from_args(tokenizer_parser().parse_args(train_tokenizer_argv(train))) == train
    for pages in (ManpagesConfig("de", tmp_path / "de.jsonl"),
                  ManpagesConfig("en", tmp_path / "en.jsonl", limit=7, man_root=tmp_path / "man",
                                 address="127.0.0.1:6379", num_cpus=2)):
        assert parse_manpages(manpages_argv(pages))[0] == pages
