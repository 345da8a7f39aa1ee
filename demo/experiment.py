"""The main job: the paper's English -> German continual-pretraining experiment, end to end.

`python -m demo [--quick | --gpu]` (or `make demo`) drives the whole system as a user would: Ray Data
rendering the man pages and training the base tokenizer (the inputs a recipe starts from), the tokenizer
extension and the token datasets, the mixer service over HTTP, trainer processes pulling from it, a live
ratio change by `curl -X PUT`, a run whose ratio the service's forgetting-budget controller steers, and a
report comparing the runs with the paper's findings.

Its steps are the recipe's typed steps (`demo/steps.py`), run by the recipe's runner
(`recipe.runner.StepRunner`): one way of running steps, with one reuse rule (a step's record in
WORK_DIR/steps/), the pipeline's on one Ray, trainers resumed from their latest checkpoint and services
on the state dir they left. What the demo adds on top is its own: the runs it compares (the replay table,
the ablations, the union baseline, seeds), the operator's live change, the controller's budget, the corpus
pins and the report. The run's sizes are a preset of `demo/config/` (see demo/experiment_config.py).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import secrets
import shutil
import subprocess
import sys
import time
import urllib.request
from contextlib import ExitStack
from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable, Mapping, Sequence

from demo.experiment_config import REPO, ControllerRun, ExperimentConfig, Phase2Run, UnionRun, load_config
from demo.experiment_report import LIVE_CHANGE_NAME, write_report
from demo.forgetting_budget import choose_budget, held_budget
from demo.merges import FROM, build_and_score
from demo.steps import (ADMIN_TOKEN, READ_TOKEN, base_tokenizer_step, phase1_step, phase2_step, pipeline_steps,
                        render_step, union_step)
from recipe.errors import RecipeError
from recipe.plan import TrainStep
from recipe.runner import StepRunner


class DemoError(Exception):
    """Why the demo stopped, the one way it fails: a refusal (with what to do) or a step that failed (naming
    it); said to the user as one `error: ...` line, exit 2."""


def echo(args: Sequence[object]) -> None:
    """Print a command as it starts; a bearer token shows as <token>, never its value (logs get shared)."""
    print("$ " + " ".join(re.sub(r"Bearer \S+", "Bearer <token>", str(a)) for a in args), flush=True)


def run(args: Sequence[str]) -> None:
    """Run a command an operator would type (curl), its output on our terminal; fail naming the command.
    The demo's steps are not run this way: the recipe's runner runs them."""
    command = [str(a) for a in args]
    echo(command)
    child = subprocess.run(command, cwd=REPO)
    if child.returncode != 0:
        raise DemoError(f"step failed (exit {child.returncode}): {' '.join(command)}")


def token_files(work_dir: Path) -> tuple[Path, Path]:
    """(admin token file, read token file) of the demo's services, made once and kept private."""
    files = work_dir / ADMIN_TOKEN, work_dir / READ_TOKEN
    for path in files:
        if not path.exists():
            path.write_text(secrets.token_urlsafe(32))
            path.chmod(0o600)
    return files


def served_frontier(url: str, read_token_file: Path) -> int:
    request = urllib.request.Request(f"{url}/v1/status",
                                     headers={"Authorization": f"Bearer {read_token_file.read_text().strip()}"})
    with urllib.request.urlopen(request, timeout=5) as response:
        return int(json.load(response)["served_frontier"])


CORPUS_PINS_NAME = "corpus.json"  # in the work dir: the corpora it was built from; in a run dir: its own


def corpus_pins(cfg: ExperimentConfig) -> dict[str, dict]:
    """Pages (JSONL lines), bytes and sha256 of each rendered corpus: what pins a report to its text."""
    pins = {}
    for lang in ("en", "de"):
        path, digest, pages, size = cfg.work_dir / "corpora" / f"{lang}.jsonl", hashlib.sha256(), 0, 0
        with open(path, "rb") as corpus:
            for line in corpus:
                digest.update(line)
                pages += bool(line.strip())
                size += len(line)
        pins[lang] = {"pages": pages, "bytes": size, "sha256": digest.hexdigest()}
    return pins


def differences(then: Mapping[str, dict], now: Mapping[str, dict]) -> str:
    return "; ".join(f"{lang}: {then.get(lang)} then, {now.get(lang)} now" for lang in sorted({*then, *now})
                     if then.get(lang) != now.get(lang))


def pin_corpora(cfg: ExperimentConfig) -> dict[str, dict]:
    """Record the corpora's pins in the work dir the first time; refuse when they changed since (a corpus
    deleted and rendered again on a machine with other man pages), since the runs already here were trained
    on the old text and a report would compare them with runs trained on the new."""
    pins, record = corpus_pins(cfg), cfg.work_dir / CORPUS_PINS_NAME
    if record.exists():
        then = json.loads(record.read_text())
        if then != pins:
            raise DemoError(f"the corpora in {cfg.work_dir / 'corpora'} changed since this work dir's runs "
                             f"were built ({differences(then, pins)}); runs on different text cannot be compared. "
                             "Rerun with --fresh to rebuild everything from the new corpora")
    record.write_text(json.dumps(pins, indent=2))
    return pins


def check_run_pins(cfg: ExperimentConfig, pins: Mapping[str, dict], run_dirs: Sequence[Path]) -> None:
    """Every run of a report was trained on the pinned corpora (its own copy of the pins says so)."""
    for run_dir in run_dirs:
        own = run_dir / CORPUS_PINS_NAME
        then = json.loads(own.read_text()) if own.exists() else {}
        if then != pins:
            raise DemoError(f"{run_dir} was trained on other corpora than the work dir's "
                             f"({differences(then, pins) or 'no corpus.json in it'}); rerun with --fresh")


def check_page_count(cfg: ExperimentConfig, lang: str, pages: Path) -> None:
    """Refuse a corpus with fewer pages than the preset expects, naming the package that brings them."""
    with open(pages, "rb") as rendered:
        count = sum(1 for line in rendered if line.strip())
    if count < cfg.min_pages_per_language:
        package = "manpages" if lang == "en" else "manpages-de"
        raise DemoError(f"only {count} {lang} man pages rendered, fewer than the "
                         f"{cfg.min_pages_per_language} this preset expects; install {package} (`make manpages`; "
                         f"`dpkg -s {package}` says whether it is) and rerun")


def make_corpora(cfg: ExperimentConfig, runner: StepRunner, on_ray: Callable[[], None]) -> None:
    """corpora/LANG.jsonl: the rendered man pages (a step), checked for their count, with the extra corpus
    appended; written whole or not at all."""
    for lang, extra in (("en", cfg.extra_old), ("de", cfg.extra_new)):
        corpus = cfg.work_dir / "corpora" / f"{lang}.jsonl"
        if corpus.exists():
            continue
        step = render_step(cfg, lang)
        on_ray()
        runner.run_pipeline_step(step)
        pages = Path(step.outputs[0])
        try:
            check_page_count(cfg, lang, pages)
        except DemoError:
            runner.move_aside(step)  # rendered again next time, once the pages are there
            raise
        with open(corpus.with_suffix(".partial"), "wb") as out:  # whole or absent: a crash leaves no half
            for part in (pages, *([extra] if extra else [])):
                with open(part, "rb") as src:
                    shutil.copyfileobj(src, out)
        corpus.with_suffix(".partial").rename(corpus)


def curl(method: str, url: str, token_file: Path, record: Path, body: dict | None = None) -> None:
    """A request to the service as an operator makes it, with curl; the answer saved to `record`."""
    run(["curl", "-sS", "--fail-with-body", "-X", method, url,
         "-H", f"Authorization: Bearer {token_file.read_text().strip()}",
         *(["-H", "Content-Type: application/json", "-d", json.dumps(body)] if body is not None else []),
         "-o", str(record)])


def change_replay_live(url: str, token_file: Path, read_token_file: Path, replay: float, at_step: int,
                       trainer: subprocess.Popen, record: Path) -> None:
    """Wait until the trainer has pulled `at_step`, then change the ratio as an operator would: curl. A run
    resumed after the change was made finds it in the service's schedule (its state dir is kept) and only
    records it again."""
    request = urllib.request.Request(f"{url}/v1/mix",
                                     headers={"Authorization": f"Bearer {token_file.read_text().strip()}"})
    with urllib.request.urlopen(request, timeout=5) as response:
        schedule = json.load(response)["schedule"]
    if len(schedule) > 1:
        record.write_text(json.dumps({"stage": schedule[-1]}))
        return
    while served_frontier(url, read_token_file) < at_step:
        if trainer.poll() is not None:
            return
        time.sleep(0.5)
    curl("PUT", f"{url}/v1/mix", token_file, record, {"weights": {"en": replay, "de": 1 - replay}})
    print(f"mix changed: {record.read_text()}", flush=True)


FINDINGS = ("headline", "all")


def parse_args(argv: Sequence[str] | None = None) -> tuple[ExperimentConfig, tuple[Phase2Run, ...]]:
    """The one place the demo's flags are read: the preset, adjusted, and the phase-2 runs to train."""
    parser = argparse.ArgumentParser(prog="python -m demo", description=__doc__.splitlines()[0])
    preset = parser.add_mutually_exclusive_group()
    preset.add_argument("--quick", action="store_true", help="a few minutes: fewer pages, a smaller model, fewer steps")
    preset.add_argument("--gpu", action="store_true", help="a 125M model on a CUDA GPU, all man pages")
    parser.add_argument("--work-dir", type=Path, help="where corpora, datasets, runs and the report go")
    parser.add_argument("--fresh", action="store_true", help="delete the work dir first instead of reusing it")
    parser.add_argument("--findings", choices=FINDINGS, default="headline",
                        help="headline: the replay table, no re-warming, the union baseline, the live change and "
                             "the controller run; all: also the ablations (peak rate x3, warmup length, optimizer "
                             "reset, no tokenizer extension) (default %(default)s)")
    parser.add_argument("--seeds", type=int, default=1, metavar="N",
                        help="train the replay table's runs with N sample orders, for the seed spread (default 1)")
    parser.add_argument("--extra-old", type=Path, metavar="PATH",
                        help="a JSONL corpus (a \"text\" field per line) appended to the English man pages")
    parser.add_argument("--extra-new", type=Path, metavar="PATH",
                        help="a JSONL corpus appended to the German man pages")
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error(f"--seeds {args.seeds}: give 1 or more")
    for flag, path in (("--extra-old", args.extra_old), ("--extra-new", args.extra_new)):
        if path is not None and not path.is_file():
            parser.error(f"{flag} {path}: no such file")
    if args.gpu:
        import torch

        if not torch.cuda.is_available():
            parser.error("--gpu: no CUDA GPU is visible to this torch "
                         f"({torch.__version__}); run it on a GPU machine with a CUDA build of torch, or drop --gpu")
    cfg = load_config("quick" if args.quick else "gpu" if args.gpu else "default")
    if args.work_dir:
        cfg = replace(cfg, work_dir=args.work_dir.resolve())
    cfg = replace(cfg, extra_old=args.extra_old and args.extra_old.resolve(),
                  extra_new=args.extra_new and args.extra_new.resolve())
    if args.fresh:
        shutil.rmtree(cfg.work_dir, ignore_errors=True)
    return cfg, cfg.selected_runs(args.findings, args.seeds)


def run_record(spec: Phase2Run | UnionRun) -> dict:
    return {"kind": type(spec).__name__, **json.loads(json.dumps(asdict(spec), default=str))}


def experiment_record(cfg: ExperimentConfig, runs: Sequence[Phase2Run]) -> dict:
    """What experiment.json holds: the shared settings, and every run by name (those of this invocation)."""
    settings = json.loads(json.dumps(asdict(cfg), default=str))
    for rebuilt_every_time in ("runs", "merge_alphas", "ties_density"):
        settings.pop(rebuilt_every_time)
    # What `--model SIZE` builds: a work dir trained with the trainer's former own GPT is another experiment.
    settings["architecture"] = "LlamaForCausalLM"
    # Phase 2 replays English in the extended encoding (datasets/en), as a recipe does; earlier demos
    # replayed it in the base one under the same name.
    settings["english_replayed_in"] = "extended encoding"
    return {"settings": settings, "runs": {spec.name: run_record(spec) for spec in runs}}


def reuse(saved: str, record: dict) -> dict:
    """The experiment.json to write when a work dir built with `saved` serves `record`: the same settings,
    and each run it names either new or trained exactly as asked now (each run has a folder of its own, so
    runs added or left out since do not touch the others). Raises ValueError saying what differs."""
    try:
        before = json.loads(saved)
    except json.JSONDecodeError:  # a damaged file: nothing says what was built there
        raise ValueError("its experiment.json is unreadable") from None
    if not isinstance(before, dict) or "settings" not in before:
        raise ValueError("it was built by an earlier version of the demo")
    changed = sorted(key for key in {*before["settings"], *record["settings"]}
                     if before["settings"].get(key) != record["settings"].get(key))
    if changed:
        raise ValueError(f"its settings differ: {', '.join(changed)}")
    for name, spec in record["runs"].items():
        if before["runs"].get(name, spec) != spec:
            raise ValueError(f"its run {name!r} was trained with other settings")
    return {"settings": record["settings"], "runs": {**before["runs"], **record["runs"]}}


def main(argv: Sequence[str] | None = None) -> int:
    cfg, selected = parse_args(argv)
    started = time.monotonic()
    cfg.work_dir.mkdir(parents=True, exist_ok=True)
    record, saved = experiment_record(cfg, [*selected, *([cfg.union] if cfg.union else [])]), cfg.work_dir / "experiment.json"
    try:
        if saved.exists():
            try:
                record = reuse(saved.read_text(), record)
            except ValueError as why:
                # Reusing runs trained with other settings would mix them into one report.
                raise DemoError(f"{cfg.work_dir} holds a demo built with other settings ({why}; see {saved}); rerun "
                                "with --fresh to rebuild it there, or pass another --work-dir") from None
        saved.write_text(json.dumps(record, indent=2))
        token_file, _ = token_files(cfg.work_dir)
        return run_experiment(cfg, selected, token_file, started)
    except (DemoError, RecipeError) as why:
        print(f"error: {why}", file=sys.stderr)
        return 2


def run_experiment(cfg: ExperimentConfig, selected: Sequence[Phase2Run], token_file: Path, started: float) -> int:
    runner = StepRunner(cfg.work_dir)
    with ExitStack() as ray:
        joined = False

        def on_ray() -> None:  # the pipeline steps' Ray, started once and only when a step has to run
            nonlocal joined
            if not joined:
                ray.enter_context(runner.ray(None, None))
                joined = True

        make_corpora(cfg, runner, on_ray)
        pins = pin_corpora(cfg)  # before the steps that read the corpora: a changed one is refused here
        pipeline = [base_tokenizer_step(cfg), *pipeline_steps(cfg, selected)]
        for index, step in enumerate(pipeline, 1):
            if not runner.done(step):
                on_ray()
            runner.run_pipeline_step(step, f"[{index}/{len(pipeline)}] ")
    phase1 = train(runner, phase1_step(cfg), pins)
    runs: dict[Phase2Run, Path] = {}
    for spec in selected:  # in order: a controller run takes its budget from the runs before it
        runs[spec] = continue_on_german(cfg, runner, spec, token_file, dict(runs), pins)
    union = train(runner, union_step(cfg), pins) if cfg.union else None
    check_run_pins(cfg, pins, [phase1, *runs.values(), *([union] if union else [])])
    merged = build_and_score(cfg, phase2_step(cfg, Phase2Run(FROM, 0.0)).trainer.data.eval_datasets)
    report = write_report(cfg, phase1, runs, union, pins, merged)
    print(f"\n{report.read_text()}")
    print(f"demo done in {(time.monotonic() - started) / 60:.1f} min: {len(runs) + 1 + bool(union)} training runs, "
          f"{len(merged)} merges, "
          f"report {report}", flush=True)
    return 0


def train(runner: StepRunner, step: TrainStep, pins: Mapping[str, dict],
          during: Callable[[str, subprocess.Popen], None] | None = None) -> Path:
    """A training step through the recipe's runner (reused when done, resumed when it stopped); a run
    trained now gets the corpus pins it was trained on, which the report checks."""
    if runner.run_train_step(step, during):
        (step.run_dir / CORPUS_PINS_NAME).write_text(json.dumps(pins, indent=2))
    return step.run_dir


def continue_on_german(cfg: ExperimentConfig, runner: StepRunner, spec: Phase2Run, token_file: Path,
                       earlier: Mapping[Phase2Run, Path], pins: Mapping[str, dict]) -> Path:
    """Phase 2: one run on the German stream served by the mixer, English replayed at spec.replay (changed
    live by the operator, or steered by the service's controller, for the runs that say so)."""
    budget = None
    if isinstance(spec, ControllerRun):
        chosen = choose_budget(spec, earlier)
        print(f"{spec.name}: forgetting budget {chosen.value:.4g}: {chosen.origin}", flush=True)
        budget = chosen.value
    step = phase2_step(cfg, spec, budget)
    held = held_budget(step.run_dir)
    if budget is not None and held not in (None, budget):
        # Its budget comes from an earlier run, which may have changed since (or its rule has): never report
        # a controller against a budget other than the one it held. The old run is kept, moved aside.
        print(f"{spec.name}: trained with budget {held}, now {budget}; training it again", flush=True)
        runner.move_aside(step)

    def operator(url: str, trainer: subprocess.Popen) -> None:  # while it trains: the live change
        change_replay_live(url, token_file, token_files(cfg.work_dir)[1], spec.switch_to,
                           at_step=cfg.phase2_steps // 2, trainer=trainer, record=step.run_dir / LIVE_CHANGE_NAME)

    return train(runner, step, pins, operator if spec.switch_to is not None else None)
