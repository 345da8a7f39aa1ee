"""The main job: the paper's English -> German continual-pretraining experiment, end to end.

`python -m demo [--quick | --gpu]` (or `make demo`) drives the whole system as a user with
a cluster would: a local Ray head with every preprocessing step submitted by `ray job submit`, the
mixer service over HTTP, trainer processes pulling from it, a live ratio change by `curl -X PUT`, a run
whose ratio the service's forgetting-budget controller steers, and a report comparing the runs with the
paper's findings. Every step checks whether its output already
exists, so a second invocation reuses what the first built. The run's sizes are a preset of
`demo/config/` (see demo/experiment_config.py).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from dataclasses import asdict, replace
from pathlib import Path
from typing import Iterator, Mapping, Sequence

from demo.experiment_config import REPO, ControllerRun, ExperimentConfig, Phase2Run, UnionRun, load_config
from demo.experiment_report import LIVE_CHANGE_NAME, write_report
from demo.forgetting_budget import CONTROLLER_STATE_NAME, OLD, choose_budget, held_budget
from service.launcher import ServiceDidNotStart, ServiceProcess, free_port
from trainer.checkpoint import CHECKPOINT_DIR, FINAL, named_checkpoint


class DemoError(Exception):
    """Why the demo stopped, the one way it fails: a refusal (with what to do) or a step that failed (naming
    it); said to the user as one `error: ...` line, exit 2."""


def banner(step: str) -> None:
    print(f"\n=== {step}", flush=True)


def echo(args: Sequence[object]) -> None:
    """Print a command as it starts; a bearer token shows as <token>, never its value (logs get shared)."""
    print("$ " + " ".join(re.sub(r"Bearer \S+", "Bearer <token>", str(a)) for a in args), flush=True)


def run(args: Sequence[str], retry_if: str | None = None, **kwargs: object) -> None:
    """Run a child process with its output on our terminal; fail loudly naming the command.

    With `retry_if`, a failure whose output contains that text is retried once.
    """
    command = [str(a) for a in args]
    echo(command)
    child = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             **kwargs)
    output = []
    for line in child.stdout:
        sys.stdout.write(line)
        output.append(line)
    if child.wait() == 0:
        return
    if retry_if is not None and retry_if in "".join(output):
        print(f"retrying once: the failure was {retry_if!r}", flush=True)
        return run(args, **kwargs)
    raise DemoError(f"step failed (exit {child.returncode}): {' '.join(command)}")


class RayCluster:
    """A local `ray start --head`, to which every preprocessing step is submitted as a Ray job.

    The head runs with `--block` in its own process group, so stopping it stops this cluster alone
    (`ray stop` would end every Ray on the machine). Ray's token authentication stays on, with a token
    of this work dir's own.
    """

    def __init__(self, work_dir: Path):
        self.work_dir = work_dir
        self.dashboard = f"http://127.0.0.1:{free_port()}"
        self.ray = Path(sys.executable).with_name("ray")
        token = work_dir / "ray-auth-token"
        if not token.exists():
            token.write_text(secrets.token_hex(32))
            token.chmod(0o600)
        self.env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}

    def __enter__(self) -> "RayCluster":
        # Every listening port is chosen free, so this head can run beside other Ray clusters on the machine.
        ports = {flag: free_port() for flag in ("port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                                "metrics-export-port", "runtime-env-agent-port", "node-manager-port",
                                                "object-manager-port", "ray-client-server-port")}
        args = [self.ray, "start", "--head", "--block", *(f"--{flag}={port}" for flag, port in ports.items()),
                f"--dashboard-port={self.dashboard.rsplit(':', 1)[1]}", "--dashboard-host=127.0.0.1",
                f"--num-cpus={os.cpu_count()}", f"--temp-dir=/tmp/ray-replaymix-{os.getpid()}",
                "--disable-usage-stats"]
        echo(args)
        self.log = open(self.work_dir / "ray-head.log", "ab")
        self.head = subprocess.Popen([str(a) for a in args], cwd=REPO, env=self.env, stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        try:
            self._wait_for_job_agent()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _wait_for_job_agent(self, timeout_s: float = 180) -> None:
        """The head answers before its job agent takes submissions: submit a no-op job until one is taken."""
        deadline = time.monotonic() + timeout_s
        while True:
            if self.head.poll() is not None:
                raise DemoError(f"the Ray head exited (code {self.head.returncode}); see {self.log.name}")
            probe = subprocess.run([str(self.ray), "job", "submit", "--no-wait", f"--address={self.dashboard}",
                                    "--", "true"], env=self.env, capture_output=True, text=True)
            if probe.returncode == 0:
                print(f"Ray head up, dashboard {self.dashboard}, log {self.log.name}", flush=True)
                return
            if time.monotonic() > deadline:
                raise DemoError(f"the Ray job agent did not come up in {timeout_s:.0f} s: {probe.stderr[-500:]}")
            time.sleep(2)

    def __exit__(self, *exc: object) -> None:
        os.killpg(self.head.pid, signal.SIGTERM)
        try:
            self.head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.head.pid, signal.SIGKILL)
        self.log.close()

    def submit(self, module: str, *args: object) -> None:
        runtime_env = {"excludes": [".venv", "runs", "data", ".git", "**/__pycache__", ".pytest_cache", ".hypothesis"]}
        run([self.ray, "job", "submit", f"--address={self.dashboard}", f"--working-dir={REPO}",
             f"--runtime-env-json={json.dumps(runtime_env)}", "--", sys.executable, "-m", module, *args],
            # Ray 2.60 sometimes loses a just-uploaded working-dir package; a resubmission uploads it again.
            retry_if="Failed to download runtime_env file package", env=self.env)


def token_files(work_dir: Path) -> tuple[Path, Path]:
    """(admin token file, read token file) of the demo's services, made once and kept private."""
    files = work_dir / "admin-token", work_dir / "read-token"
    for path in files:
        if not path.exists():
            path.write_text(secrets.token_urlsafe(32))
            path.chmod(0o600)
    return files


def german_dataset(cfg: ExperimentConfig, spec: Phase2Run) -> Path:
    """German tokenized with the extension, or (a run without it) with the English base tokenizer."""
    return cfg.work_dir / "datasets" / ("de" if spec.extend_tokenizer else "de-base")


@contextmanager
def mixer_service(cfg: ExperimentConfig, spec: Phase2Run, state_dir: Path, token_file: Path,
                  extra_args: Sequence[str] = ()) -> Iterator[str]:
    """Start `python -m service` on a free loopback port; yield its URL; stop it on exit."""
    datasets, replay = cfg.work_dir / "datasets", spec.replay
    args = [f"--dataset=en={datasets / 'en'}", f"--dataset=de={german_dataset(cfg, spec)}",
            f"--weights=en={replay},de={1 - replay}", f"--seq-len={cfg.seq_len}",
            f"--global-batch={cfg.global_batch}", f"--seed={cfg.seed + spec.seed}", f"--state-dir={state_dir}",
            f"--admin-token-file={token_file}", f"--read-token-file={token_files(cfg.work_dir)[1]}", *extra_args]
    # At the service's default log level: the log shows every request the trainer made.
    service = ServiceProcess(args, log=state_dir.with_suffix(".log"), log_level=None)
    try:
        service.start()
    except ServiceDidNotStart as error:
        raise DemoError(f"the mixer service did not start: {error}") from None
    try:
        print(f"mixer service up at {service.url} (replay {replay:.0%}), log {service.log}", flush=True)
        yield service.url
    finally:
        service.stop(grace=30)


def served_frontier(url: str, read_token_file: Path) -> int:
    request = urllib.request.Request(f"{url}/v1/status",
                                     headers={"Authorization": f"Bearer {read_token_file.read_text().strip()}"})
    with urllib.request.urlopen(request, timeout=5) as response:
        return int(json.load(response)["served_frontier"])


def trainer_args(cfg: ExperimentConfig, out: Path, steps: int, eval_sets: Mapping[str, Path],
                 seed: int = 0) -> list[object]:
    """A trainer's flags common to every run. --overwrite: a run left unfinished by an earlier invocation
    starts afresh (its stream does too); finished runs are skipped before a trainer starts. The corpus pins
    go into the run folder first: the report refuses a run trained on other text than its neighbours."""
    out.mkdir(parents=True, exist_ok=True)
    (out / CORPUS_PINS_NAME).write_text(json.dumps(corpus_pins(cfg), indent=2))
    return [sys.executable, "-m", "trainer", f"--model={cfg.model}", f"--steps={steps}", f"--out={out}",
            "--overwrite", f"--micro-batch={cfg.micro_batch}", f"--eval-every={cfg.eval_every}",
            f"--eval-batches={cfg.eval_batches}", f"--device={cfg.device}", f"--seed={cfg.seed + seed}",
            "--log-every=1", *(f"--eval-dataset={name}={path}" for name, path in eval_sets.items()),
            *cfg.extra_trainer_args]


def finished(run_dir: Path) -> bool:
    return (run_dir / CHECKPOINT_DIR / FINAL).exists()


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


def build_data(cfg: ExperimentConfig, ray: RayCluster, runs: Sequence[Phase2Run]) -> None:
    """Corpora, tokenizers and token datasets, each step submitted as a Ray job and skipped if done."""
    corpora, tokenizers, datasets = (cfg.work_dir / d for d in ("corpora", "tokenizers", "datasets"))
    for lang, extra in (("en", cfg.extra_old), ("de", cfg.extra_new)):
        corpus = corpora / f"{lang}.jsonl"
        if not corpus.exists():
            pages = corpora / f"{lang}-manpages.jsonl"
            banner(f"rendering {cfg.pages_per_language} {lang} man pages (Ray job)")
            ray.submit("pipeline.corpora.manpages", f"--lang={lang}", f"--out={pages}",
                       f"--limit={cfg.pages_per_language}")
            check_page_count(cfg, lang, pages)
            with open(corpus.with_suffix(".partial"), "wb") as out:  # whole or absent: a crash leaves no half
                for part in (pages, *([extra] if extra else [])):
                    with open(part, "rb") as src:
                        shutil.copyfileobj(src, out)
            corpus.with_suffix(".partial").rename(corpus)
            pages.unlink()
    base, extended = tokenizers / "en.model", tokenizers / "en+de.model"
    if not base.exists():
        banner(f"training the English base tokenizer ({cfg.base_vocab} pieces, Ray job)")
        ray.submit("pipeline.tokenizer", "train", f"--input={corpora / 'en.jsonl'}",
                   f"--vocab-size={cfg.base_vocab}", "--model-type=bpe", f"--out={base}")
    if not extended.exists():
        banner(f"extending it with up to {cfg.new_pieces} German pieces (Ray job)")
        ray.submit("pipeline.tokenizer", "extend", f"--base={base}", f"--input={corpora / 'de.jsonl'}",
                   f"--old-input={corpora / 'en.jsonl'}", f"--new-pieces={cfg.new_pieces}", f"--out={extended}")
    for name, lang, model in dataset_specs(cfg, runs):
        if not (datasets / name / "manifest.json").exists():
            banner(f"tokenizing the {lang} corpus with {model} (Ray job)")
            ray.submit("pipeline.tokenize", f"--input={corpora / f'{lang}.jsonl'}", f"--tokenizer={tokenizers / model}",
                       f"--out={datasets / name}", f"--seed={cfg.seed}", f"--val-fraction={cfg.val_fraction}",
                       "--overwrite")


def dataset_specs(cfg: ExperimentConfig, runs: Sequence[Phase2Run]) -> list[tuple[str, str, str]]:
    """(dataset, corpus, tokenizer) of the token datasets these runs need: German with the English base
    tokenizer only for a run without the extension."""
    specs = [("en", "en", "en.model"), ("de", "de", "en+de.model")]
    return specs + ([("de-base", "de", "en.model")] if any(not spec.extend_tokenizer for spec in runs) else [])


def check_page_count(cfg: ExperimentConfig, lang: str, pages: Path) -> None:
    """Refuse a corpus with fewer pages than the preset expects, naming the package that brings them."""
    with open(pages, "rb") as rendered:
        count = sum(1 for line in rendered if line.strip())
    if count < cfg.min_pages_per_language:
        pages.unlink()  # rendered again next time, once the pages are there
        package = "manpages" if lang == "en" else "manpages-de"
        raise DemoError(f"only {count} {lang} man pages rendered, fewer than the "
                         f"{cfg.min_pages_per_language} this preset expects; install {package} (`make manpages`; "
                         f"`dpkg -s {package}` says whether it is) and rerun")


def pretrain_english(cfg: ExperimentConfig) -> Path:
    """Phase 1: English alone, infinite schedule, with a checkpoint saved just before the anneal."""
    out = cfg.work_dir / "runs" / "phase1-en"
    if not finished(out):
        banner(f"phase 1: pretraining a {cfg.model} Llama on English for {cfg.phase1_steps} steps")
        # Evaluated on English only: German ids of the extended tokenizer do not exist in this model yet.
        # In-process mixing: the batch geometry is given here; phase 2's services decide it for their trainers.
        run([*trainer_args(cfg, out, cfg.phase1_steps, {"en": cfg.work_dir / "datasets" / "en"}),
             f"--dataset=en={cfg.work_dir / 'datasets' / 'en'}",
             f"--seq-len={cfg.seq_len}", f"--global-batch={cfg.global_batch}", *cfg.infinite_schedule_args(),
             f"--decay-steps={cfg.anneal_steps(cfg.phase1_steps)}",
             f"--save-at={cfg.phase1_anneal_start}"])
    return out


def train_union(cfg: ExperimentConfig, union: UnionRun) -> Path:
    """The baseline the paper measures continuing against: from scratch on English and German together."""
    out = cfg.work_dir / "runs" / union.name
    if not finished(out):
        share, datasets = cfg.union_german_share, cfg.work_dir / "datasets"
        banner(f"union baseline: a {cfg.model} Llama from scratch on English + German ({share:.1%} German) for "
               f"{cfg.union_steps} steps, re-warmed cosine")
        # In-process mixing, like phase 1; the extended tokenizer's vocabulary from the first step (the
        # English dataset's ids are a prefix of it, which the mixer checks).
        run([*trainer_args(cfg, out, cfg.union_steps, {lang: datasets / lang for lang in ("en", "de")}),
             f"--dataset=en={datasets / 'en'}", f"--dataset=de={datasets / 'de'}",
             f"--weights=en={1 - share:.4f},de={share:.4f}", f"--seq-len={cfg.seq_len}",
             f"--global-batch={cfg.global_batch}", "--lr-schedule=cosine",
             f"--warmup-steps={max(1, cfg.union_steps // 100)}", *cfg.rate_args()])
    return out


def phase2_schedule(cfg: ExperimentConfig, spec: Phase2Run) -> list[str]:
    """A re-warmed cosine (its peak and warmup the run's own where it changes them), or phase 1's infinite
    schedule as its checkpoint recorded it: the constant rate, then this run's anneal."""
    if not spec.rewarm:
        return ["--continue-schedule", f"--decay-steps={cfg.anneal_steps(cfg.phase2_steps)}"]
    rates = cfg.rate_args() if spec.max_lr is None else [f"--max-lr={spec.max_lr}", f"--min-lr={spec.max_lr / 10:.3g}"]
    return ["--lr-schedule=cosine", f"--warmup-steps={spec.warmup_steps or cfg.phase2_warmup()}", *rates]


def controller_args(cfg: ExperimentConfig, spec: ControllerRun, earlier: Mapping[Phase2Run, Path]) -> list[str]:
    """The service flags of a controller run: its budget from the runs before it, a decision at most per
    evaluation (the controller learns nothing new between two)."""
    budget = choose_budget(spec, earlier)
    print(f"forgetting budget {budget.value:.4g}: {budget.origin}", flush=True)
    return ["--controller=forgetting-budget", f"--old={OLD}", f"--budget={budget.value}",
            f"--min-share={spec.min_share}", f"--max-share={spec.max_share}", f"--interval={cfg.eval_every}"]


def continue_on_german(cfg: ExperimentConfig, spec: Phase2Run, phase1: Path, token_file: Path,
                       earlier: Mapping[Phase2Run, Path]) -> Path:
    """Phase 2: one run on the German stream served by the mixer, English replayed at spec.replay (changed
    live, or steered by the service's controller, for the runs that say so)."""
    out = cfg.work_dir / "runs" / spec.name
    steered = isinstance(spec, ControllerRun)
    if finished(out) and steered:
        # Its budget comes from an earlier run, which may have changed since (or its rule has): never report
        # a controller against a budget other than the one it held.
        held, now = held_budget(out), choose_budget(spec, earlier).value
        if held not in (None, now):
            print(f"{spec.name}: trained with budget {held}, now {now}; training it again", flush=True)
            shutil.rmtree(out)
    if finished(out):
        return out
    banner(f"phase 2: {spec.name} ({spec.replay:.0%} English replay" + (f", seed {spec.seed}" if spec.seed else "")
           + (f", switched live to {spec.switch_to:.0%}" if spec.switch_to is not None else "")
           + (", then steered by the forgetting-budget controller" if steered else "")
           + (", no re-warming" if not spec.rewarm else ", re-warmed cosine") + ")")
    state_dir = cfg.work_dir / "service" / spec.name
    shutil.rmtree(state_dir, ignore_errors=True)  # a rerun of an unfinished run starts its stream afresh
    state_dir.mkdir(parents=True)
    evals = {"en": cfg.work_dir / "datasets" / "en", "de": german_dataset(cfg, spec)}
    with mixer_service(cfg, spec, state_dir, token_file, controller_args(cfg, spec, earlier) if steered else ()) as url:
        args = [*trainer_args(cfg, out, cfg.phase2_steps, evals, seed=spec.seed), f"--stream={url}",
                f"--stream-token-file={token_files(cfg.work_dir)[1]}",
                f"--init-from={phase1 / CHECKPOINT_DIR / named_checkpoint(cfg.phase1_anneal_start)}",
                *([f"--extension-report={cfg.work_dir / 'tokenizers' / 'en+de.report.json'}"]
                  if spec.extend_tokenizer else []),
                *(["--reset-optimizer"] if spec.reset_optimizer else []), *phase2_schedule(cfg, spec)]
        if spec.switch_to is not None or steered:
            # The client reads a few steps ahead only, so a change without start_step (the operator's, or
            # the controller's after an evaluation) lands a few steps after it was made.
            args.append("--stream-read-ahead=2")
        echo(args)
        trainer = subprocess.Popen([str(a) for a in args], cwd=REPO)
        if spec.switch_to is not None:
            change_replay_live(url, token_file, token_files(cfg.work_dir)[1], spec.switch_to,
                               at_step=cfg.phase2_steps // 2, trainer=trainer,
                               record=out / LIVE_CHANGE_NAME)
        if trainer.wait() != 0:
            raise DemoError(f"phase-2 run {spec.name} failed (exit {trainer.returncode})")
        if steered:  # its state, observations and decisions live in the service: keep them for the report
            curl("GET", f"{url}/v1/controller", token_files(cfg.work_dir)[1], out / CONTROLLER_STATE_NAME)
    return out


def curl(method: str, url: str, token_file: Path, record: Path, body: dict | None = None) -> None:
    """A request to the service as an operator makes it, with curl; the answer saved to `record`."""
    run(["curl", "-sS", "--fail-with-body", "-X", method, url,
         "-H", f"Authorization: Bearer {token_file.read_text().strip()}",
         *(["-H", "Content-Type: application/json", "-d", json.dumps(body)] if body is not None else []),
         "-o", str(record)])


def change_replay_live(url: str, token_file: Path, read_token_file: Path, replay: float, at_step: int,
                       trainer: subprocess.Popen, record: Path) -> None:
    """Wait until the trainer has pulled `at_step`, then change the ratio as an operator would: curl."""
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
    settings.pop("runs")
    # What `--model SIZE` builds: a work dir trained with the trainer's former own GPT is another experiment.
    settings["architecture"] = "LlamaForCausalLM"
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
    except DemoError as why:
        print(f"error: {why}", file=sys.stderr)
        return 2


def run_experiment(cfg: ExperimentConfig, selected: Sequence[Phase2Run], token_file: Path, started: float) -> int:
    datasets = cfg.work_dir / "datasets"
    if not all((datasets / name / "manifest.json").exists() for name, _, _ in dataset_specs(cfg, selected)):
        banner(f"starting a local Ray head; preprocessing is submitted to it with `ray job submit` ({cfg.work_dir})")
        with RayCluster(cfg.work_dir) as ray:
            build_data(cfg, ray, selected)
    pins = pin_corpora(cfg)
    phase1 = pretrain_english(cfg)
    runs: dict[Phase2Run, Path] = {}
    for spec in selected:  # in order: a controller run takes its budget from the runs before it
        runs[spec] = continue_on_german(cfg, spec, phase1, token_file, dict(runs))
    union = train_union(cfg, cfg.union) if cfg.union else None
    check_run_pins(cfg, pins, [phase1, *runs.values(), *([union] if union else [])])
    report = write_report(cfg, phase1, runs, union, pins)
    print(f"\n{report.read_text()}")
    print(f"demo done in {(time.monotonic() - started) / 60:.1f} min: {len(runs) + 1 + bool(union)} training runs, "
          f"report {report}", flush=True)
    return 0
