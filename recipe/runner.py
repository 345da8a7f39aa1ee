"""Run steps: each once, its outputs reused while its inputs and settings are unchanged.

One rule decides whether a step is done (`StepRecords.state`): a step is done when its record
(`steps/STEP.json`, written after its output is committed) holds the settings and the input content
hashes it has now. A record that differs is refused naming what differs, or, with `--fresh`, the step is
built again (its outputs moved aside first, never mixed). A step without a record is run: a pipeline step
rebuilds its uncommitted output; a training step resumes, the trainer from its latest checkpoint
(`--resume`, bit for bit) and the service from the state dir it left (never `--overwrite`, never a deleted
state dir). So a job killed anywhere continues where it stopped when it is run again.

`StepRunner` runs one step under that rule, the one way steps are run in the tree: the recipe's `Runner`
runs a plan's steps with it, and the demo (`demo/experiment.py`) its own runs, built as the same typed steps.

Pipeline steps run as `python -m pipeline...` processes joined to one Ray: the cluster this job runs
under (`ray job submit` sets $RAY_ADDRESS), `compute.ray_address`, or a local Ray this process starts.
Services and trainers run as processes (`service/launcher.py` for the service).
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import httpx

from pipeline.storage import is_uri
from recipe.argv import as_text
from recipe.checks import LOCK
from recipe.errors import RecipeError
from recipe.hashing import FILE_HASHES, content_hash
from recipe.outcome import Choice, choose_share, outcome
from recipe.plan import (SECRETS, MergeStep, PipelineStep, Plan, Step, TrainStep, make_plan,
                         with_port)
from recipe.store import OutputStore
from service.launcher import LOOPBACK, PACKAGE_ROOT, ServiceDidNotStart, ServiceProcess, free_port
from trainer.checkpoint import CHECKPOINT_DIR, FINAL, LATEST, latest_checkpoint

RECORDS = "steps"
MODEL = "model"  # the continued model as a Hugging Face folder


# ---------------------------------------------------------------------------------------------- the rule


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return str(value) if isinstance(value, Path) else value


def settings(step: Step) -> dict[str, Any]:
    """What a step computes from, apart from its inputs' content: its config objects, without what only
    says how it runs this time (a port, a Ray address, --overwrite or --resume)."""
    if isinstance(step, PipelineStep):
        return _jsonable({k: v for k, v in asdict(step.config).items()
                          if k not in ("address", "overwrite", "num_cpus", "workers")})
    if isinstance(step, MergeStep):
        return _jsonable(step.settings())
    trainer = _jsonable(asdict(step.trainer))
    for volatile in ("resume", "overwrite", "progress"):
        trainer.pop(volatile, None)
    service = None if step.service is None else _jsonable(
        {k: v for k, v in asdict(step.service).items() if k not in ("port", "log_level", "cache")})
    return {"service": service, "trainer": trainer, "later_stages": _jsonable(step.later_stages),
            "launcher": step.launcher, "workers": step.workers}


def service_host(step: TrainStep) -> str:
    """Where a run's mixer service listens: the loopback for ranks on this node (one process, torchrun), this
    node's cluster address for Ray Train workers, which Ray may place on any node (the service still asks
    every request for its read token)."""
    if step.launcher != "ray":
        return LOOPBACK
    import ray.util

    return ray.util.get_node_ip_address()


class StepRecords:
    """steps/STEP.json per finished step: the settings and input hashes it was built with."""

    def __init__(self, out: Path):
        self.folder = out / RECORDS
        self.hashes = self.folder / "file-hashes.json"
        if self.hashes.is_file():
            FILE_HASHES.update(json.loads(self.hashes.read_text()))

    def path(self, step: Step) -> Path:
        return self.folder / (step.name.replace("/", "__").replace(" ", "_") + ".json")

    def current(self, step: Step) -> dict[str, Any]:
        return {"settings": settings(step), "inputs": {p: content_hash(p) for p in step.inputs}}

    def state(self, step: Step) -> tuple[str, str]:
        """("done" | "todo" | "changed", what differs)."""
        record = self.path(step)
        if not record.is_file():
            return "todo", ""
        before, now = json.loads(record.read_text()), self.current(step)
        differs = [f"input {p}" for p in sorted({*before["inputs"], *now["inputs"]})
                   if before["inputs"].get(p) != now["inputs"].get(p)]
        differs += [f"setting {k}: {_lookup(before['settings'], k)!r} then, {_lookup(now['settings'], k)!r} now"
                    for k in _changed_keys(before["settings"], now["settings"])]
        return ("changed", "; ".join(differs)) if differs else ("done", "")

    def write(self, step: Step) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.path(step).with_suffix(".partial")
        # Its outputs too, relative to the folder where they are: what a working copy fetches of a finished
        # step from an object-store output (not compared: the settings and inputs decide).
        out = self.folder.parent
        outputs = [Path(p).relative_to(out).as_posix() if Path(p).is_relative_to(out) else p for p in step.outputs]
        tmp.write_text(json.dumps({**self.current(step), "outputs": outputs}, indent=2))
        tmp.rename(self.path(step))
        hashes = self.hashes.with_suffix(".partial")
        hashes.write_text(json.dumps(FILE_HASHES))
        hashes.rename(self.hashes)


def _changed_keys(before: dict, now: dict, prefix: str = "") -> list[str]:
    keys = []
    for k in sorted({*before, *now}):
        a, b = before.get(k), now.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += _changed_keys(a, b, f"{prefix}{k}.")
        elif a != b:
            keys.append(f"{prefix}{k}")
    return keys


def _lookup(tree: dict, dotted: str) -> Any:
    for part in dotted.split("."):
        tree = tree.get(part) if isinstance(tree, dict) else None
    return tree


# ---------------------------------------------------------------------------------------------- running


class StepRunner:
    """Runs typed steps whose records live in OUT/steps/, each under the rule above: done (reused), changed
    (refused naming what differs, or moved aside with `fresh`), or run (a pipeline step rebuilding its
    uncommitted output, a trainer resumed, a service on the state dir it left). The recipe's `Runner` and
    the demo (`demo/experiment.py`) both run their steps with it: one way of running steps in the tree."""

    def __init__(self, out: Path, fresh: bool = False, store: OutputStore | None = None):
        self.out, self.fresh, self.store = out, fresh, store
        self.records = StepRecords(out)
        self.seconds: dict[str, float] = {}

    def commit(self, step: Step) -> None:
        """`step` is done: its record written and, with an object-store output, its outputs uploaded (new or
        changed files only; what the step no longer holds deleted there), then its record."""
        self.records.write(step)
        if self.store is not None:
            sent = self.store.push(step.outputs, mirror=True)
            sent = tuple(map(sum, zip(sent, self.store.push([self.records.path(step)]))))
            print(f"{step.name}: uploaded {sent[0]} files ({sent[1] / 2**20:.1f} MiB) to {self.store.uri}", flush=True)

    def _decide(self, step: Step) -> bool:
        """Whether `step` is done; a changed one is refused, or moved aside with --fresh."""
        state, differs = self.records.state(step)
        if state == "changed":
            if not self.fresh:
                raise RecipeError(f"step {step.name!r} was built from other inputs or settings than the recipe "
                                  f"gives now ({differs}); rerun with --fresh to build it again, or restore them")
            self.move_aside(step)
            return False
        return state == "done"

    def done(self, step: Step) -> bool:
        """Whether `step` is done by the rule (a changed one refused, or moved aside with `fresh`)."""
        return self._decide(step)

    def move_aside(self, step: Step) -> None:
        """A step built again: its outputs go to OUTPUT/replaced/ (never deleted), its record goes."""
        aside = self.out / "replaced" / time.strftime("%Y%m%d-%H%M%S")
        for output in step.outputs:
            if Path(output).exists():
                target = aside / Path(output).relative_to(self.out)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.move(output, target)
        self.records.path(step).unlink(missing_ok=True)
        if self.store is not None and aside.exists():  # kept in the output of record too
            self.store.push([aside])
        print(f"{step.name}: its earlier outputs moved to {aside}", flush=True)

    # -- Ray for the pipeline steps

    @staticmethod
    @contextmanager
    def ray(address: str | None, cpus: int | None) -> Iterator[None]:
        """This process joins the Ray the pipeline steps run on: the cluster at `address` (or $RAY_ADDRESS),
        else a local Ray it starts with `cpus` (stopped when the steps are done)."""
        import logging

        import ray

        from pipeline.ray_runtime import init_ray

        address = address or os.environ.get("RAY_ADDRESS")
        if address:
            print(f"pipeline steps run on the Ray cluster at {address}", flush=True)
            init_ray(address)
        else:
            init_ray(None, cpus)
            print(f"pipeline steps run on a local Ray started by this job ({ray.get_runtime_context().gcs_address})",
                  flush=True)
        logging.getLogger("ray").setLevel(logging.WARNING)
        try:
            yield
        finally:
            ray.shutdown()

    # -- one step

    def run_pipeline_step(self, step: PipelineStep, position: str = "") -> None:
        """`step` in this process, on the Ray it joined (`ray`), unless it is done; `position` ("[2/5] ")
        prefixes what is printed."""
        if self._decide(step):
            print(f"{position}{step.name}: done, reused", flush=True)
            return
        started = time.monotonic()
        # Its output is uncommitted here (no record): a killed step's leftovers are this step's own (a part
        # without --overwrite replaces its output whole).
        config = (replace(step.config, overwrite=Path(step.outputs[0]).exists())
                  if "overwrite" in {f.name for f in fields(step.config)} else step.config)
        command = PipelineStep(step.name, config, step.inputs, step.outputs).command()
        print(f"\n=== {position}{step.name}\n$ {as_text(command)}", flush=True)
        # In this process, on the Ray it joined: the part's own main() parses the exact command shown, and
        # no interpreter or Ray connection is started per step.
        entry = step.module + (".__main__" if step.module == "pipeline.tokenizer" else "")
        status = importlib.import_module(entry).main(command[3:])
        if status != 0:
            raise RecipeError(f"step {step.name!r} failed (exit {status}); its output above says why. "
                              f"The same command by hand: {as_text(command)}")
        self.commit(step)
        self.seconds[step.name] = time.monotonic() - started

    def run_train_step(self, step: TrainStep,
                       during: Callable[[str, subprocess.Popen], None] | None = None) -> bool:
        """`step` unless it is done: its service (if it has one) on a free port, then its trainer. `during`,
        given the service's URL and the trainer's process, runs while the trainer trains (an operator's live
        change). Whether it ran (False: reused)."""
        if self._decide(step):
            print(f"{step.name}: done, reused", flush=True)
            return False
        started = time.monotonic()
        with self._mirrored(step):
            if step.service is None:  # the trainer mixes its datasets in process
                print(f"\n=== {step.name}: {self._describe(step)}", flush=True)
                self._train(step, self._resumed(step.trainer), None, during)
            else:
                self._serve_and_train(step, during)
        self.commit(step)
        self.seconds[step.name] = time.monotonic() - started
        return True

    def run_merge_step(self, step: MergeStep) -> None:
        """`step`'s merge made and scored (seconds, no training), unless its record is done."""
        if self._decide(step):
            print(f"{step.name}: done, reused", flush=True)
            return
        from recipe.merging import build_and_score

        merged = build_and_score(step)
        print(f"{step.name}: {merged.about}: " + ", ".join(f"{k} {v:.3f}" for k, v in merged.losses.items())
              + f" ({merged.seconds:.1f} s, no training)", flush=True)
        self.commit(step)
        self.seconds[step.name] = merged.seconds

    def _serve_and_train(self, step: TrainStep, during: Callable[[str, subprocess.Popen], None] | None) -> None:
        Path(step.service.state_dir).mkdir(parents=True, exist_ok=True)  # a rerun keeps the state the service left
        host = service_host(step)
        port = free_port(host)
        service_config, trainer_config = with_port(step, port, host)
        trainer_config = self._resumed(trainer_config)
        service_args = [a for a in step.service_command(service_config)[3:]
                        if not a.startswith(("--host=", "--port=", "--log-level="))]
        service = ServiceProcess(service_args, port=port, log=Path(step.service.state_dir).with_suffix(".log"),
                                 log_level=service_config.log_level, host=host)
        print(f"\n=== {step.name}: {self._describe(step)}\n$ {as_text(service.command())}", flush=True)
        try:
            service.start()
        except ServiceDidNotStart as e:
            raise RecipeError(f"step {step.name!r}: the mixer service did not start: {e}") from None
        try:
            self._add_stages(step, service.url)
            self._train(step, trainer_config, service.url, during)
            if step.service.controller:
                self._save_controller(step, service.url, step.run_dir / "controller.json")
        finally:
            service.stop(grace=30)

    def _train(self, step: TrainStep, trainer_config, url: str | None,
               during: Callable[[str, subprocess.Popen], None] | None) -> None:
        command = step.trainer_command(trainer_config)
        print(f"$ {as_text(command)}", flush=True)
        env = {**os.environ, **({"OMP_NUM_THREADS": str(step.threads), "MKL_NUM_THREADS": str(step.threads)}
                                if step.threads else {})}
        child = subprocess.Popen(command, cwd=PACKAGE_ROOT, env=env)
        try:
            if during is not None:
                during(url, child)
            returncode = child.wait()
        except BaseException:
            child.kill()
            child.wait()
            raise
        if returncode != 0:
            raise RecipeError(f"step {step.name!r}: the trainer failed (exit {returncode}); rerun to resume it "
                              f"from its latest checkpoint. Command: {as_text(command)}")

    @contextmanager
    def _mirrored(self, step: TrainStep) -> Iterator[None]:
        """With an object-store output, the run's folder and its service's state dir are uploaded each
        time the trainer writes a checkpoint (the checkpoint first, so the state there is never older than
        it), so that another machine resumes the run from it."""
        if self.store is None:
            yield
            return
        stop = threading.Event()
        folders = [step.run_dir, *([Path(step.service.state_dir)] if step.service else [])]

        def latest() -> int | None:
            try:
                return latest_checkpoint(step.run_dir).stat().st_mtime_ns
            except (AttributeError, FileNotFoundError):  # none yet, or being replaced
                return None

        def mirror() -> None:
            seen = latest()
            while not stop.wait(1.0):
                if latest() != seen:
                    seen = latest()
                    try:
                        self.store.push(folders)
                    except RecipeError as e:  # the committed upload says it again, and stops the job
                        print(f"{step.name}: warning: its latest checkpoint was not uploaded: {e}", flush=True)

        thread = threading.Thread(target=mirror, name=f"mirror {step.name}", daemon=True)
        thread.start()
        try:
            yield
        except BaseException:
            stop.set()
            thread.join()
            try:  # what the failed run left, for a rerun elsewhere
                self.store.push(folders)
            except RecipeError as e:
                print(f"{step.name}: warning: its folders were not uploaded: {e}", flush=True)
            raise
        stop.set()
        thread.join()

    @staticmethod
    def _describe(step: TrainStep) -> str:
        if step.about:
            return step.about
        mix = ", ".join(f"{n} {w:g}" for n, w in (step.service.weights if step.service else
                                                   step.trainer.data.weights).items())
        steered = " (steered by the forgetting-budget controller)" if step.service and step.service.controller else ""
        return f"{step.role}, {step.trainer.steps} steps, mix {mix}{steered}"

    def _resumed(self, trainer):
        """A run that left a checkpoint resumes from it; one killed before its first checkpoint starts again
        with its partial folder moved aside (kept, never deleted)."""
        checkpoints = trainer.out / CHECKPOINT_DIR
        if any((checkpoints / name).exists() for name in (LATEST, FINAL, "latest.dcp", "final.dcp")):
            print(f"{trainer.out}: resuming from its latest checkpoint", flush=True)
            return replace(trainer, resume=True, init_from=None, hf_model=None)
        if trainer.out.exists() and any(trainer.out.iterdir()):
            aside = trainer.out.with_name(trainer.out.name + ".interrupted")
            shutil.rmtree(aside, ignore_errors=True)  # the previous leftovers of this same unfinished start
            trainer.out.rename(aside)
            print(f"{trainer.out}: killed before its first checkpoint; its partial folder moved to {aside}",
                  flush=True)
        return trainer

    @staticmethod
    def _admin(step: TrainStep) -> dict[str, str]:
        token = Path(step.service.admin_token_file).read_text().strip()
        return {"Authorization": f"Bearer {token}"}

    def _add_stages(self, step: TrainStep, url: str) -> None:
        """The recipe's later stages, each PUT once: a restarted service already holds those it logged."""
        if not step.later_stages:
            return
        logged = httpx.get(f"{url}/v1/mix", headers=self._admin(step), timeout=10).json()
        have = {stage["start_step"] for stage in logged["schedule"]}
        for start, weights in step.later_stages:
            if start in have:
                continue
            answer = httpx.put(f"{url}/v1/mix", headers=self._admin(step), timeout=10,
                               json={"weights": weights, "start_step": start, "by": "recipe",
                                     "reason": f"stage of {step.update}'s replay.stages"})
            if answer.status_code != 200:
                raise RecipeError(f"step {step.name!r}: the service refused the stage at step {start}: {answer.text}")

    def _save_controller(self, step: TrainStep, url: str, record: Path) -> None:
        answer = httpx.get(f"{url}/v1/controller", headers=self._admin(step), timeout=10)
        record.write_text(answer.text)


class Runner(StepRunner):
    """A recipe's plan, in order: its pipeline steps, each update's pilots, the sweep's choice and the full
    run, then the Hugging Face export, the lock and the report."""

    def __init__(self, plan: Plan, fresh: bool = False):
        super().__init__(plan.out, fresh, OutputStore(plan.store, plan.out) if plan.store else None)
        self.plan = plan
        self.choices: dict[str, Choice | None] = {}
        self.started = time.monotonic()

    # -- before anything starts

    def refuse_changed(self) -> None:
        """Every step whose inputs exist now is compared with its record before the first step runs."""
        for step in self.plan.steps():
            if all(is_uri(p) or Path(p).exists() for p in step.inputs):
                self._decide(step)

    # -- the whole job

    def run(self) -> Path:
        if self.store is not None:
            self.fetch()
        self.refuse_changed()  # before anything is written: a refused job leaves the folder as it was
        self.prepare()
        pending = [s for s in self.plan.pipeline if not self._decide(s)]
        if pending:
            with self.ray(self.plan.recipe.compute.ray_address, self.plan.recipe.compute.cpus):
                for index, step in enumerate(self.plan.pipeline, 1):
                    self.run_pipeline_step(step, f"[{index}/{len(self.plan.pipeline)}] ")
        for index, update in enumerate(self.plan.recipe.updates):
            for pilot in self.plan.pilots[update.name]:
                self.run_train_step(pilot)
            if self.plan.runs[update.name] is None:  # a sweep: the pilots choose the full run's share
                choice = self.choose(update.name)
                if choice is None:
                    self.write_lock()
                    if self.store is not None:
                        self.upload_results()
                    raise RecipeError(f"updates.{index}.replay.choose: no share kept forgetting within the "
                                      f"budget and choose.otherwise is stop; see {self.out / 'report.md'}")
                self.plan = make_plan(self.plan.recipe, self.plan.name,
                                      {u: c.share for u, c in self.choices.items() if c})
            else:
                self.choices.setdefault(update.name, None)
            self.run_train_step(self.plan.runs[update.name])
            for merge in self.plan.merges[update.name]:
                self.run_merge_step(merge)
        model = self.export_model()
        self.write_lock()
        from recipe.report import write_report

        report = write_report(self.plan, self.choices, self.seconds)
        if self.store is not None:
            self.upload_results()
        print(f"recipe {self.plan.name} done in {(time.monotonic() - self.started) / 60:.1f} min: "
              f"{len(self.plan.steps())} steps, model {model or '(no Hugging Face folder: a fresh model)'}, "
              f"report {report}", flush=True)
        return report

    def prepare(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        self.write_lock()
        if self.store is not None:  # the store is this recipe's from now on (its lock names it)
            self.store.push([self.out / LOCK])
        secrets = self.out / SECRETS
        secrets.mkdir(exist_ok=True, mode=0o700)
        for name in ("admin-token", "read-token"):
            token = secrets / name
            if not token.exists():
                import secrets as random_secrets

                token.write_text(random_secrets.token_urlsafe(32))
                token.chmod(0o600)

    # -- an object-store output

    def fetch(self) -> None:
        """What the store holds and the working copy lacks (another machine's run, a wiped cache): the step
        records and the lock; each finished step's outputs (replacing a partial local copy); of a run not
        finished, what it left there: its latest checkpoint and its service's state. So the rerun reuses
        the finished steps and resumes the unfinished trainer as it does in a local output folder."""
        store = self.store
        held = store.listing()
        fetched = [r for r in held if r.startswith(f"{RECORDS}/") and r.endswith(".json")
                   and not (self.out / r).is_file()]
        store.download({r: held[r] for r in [*fetched, *([LOCK] if LOCK in held and not (self.out / LOCK).exists()
                                                            else [])]})
        newly = {self.out / r for r in fetched}
        finished: dict[str, bool] = {}  # a finished step's output -> whether its record just came
        for record in set((self.out / RECORDS).glob("*.json")) - {self.records.hashes}:
            for output in json.loads(record.read_text()).get("outputs", []):
                finished[output] = finished.get(output, False) or record in newly
        wanted = []
        for r in held:
            if r.startswith((f"{RECORDS}/", "replaced/", f"{MODEL}/", "plots/")) or \
                    r in (LOCK, "report.md"):
                continue  # kept there; what the job makes again at its end, or has just fetched
            owner = next((o for o in finished if r == o or r.startswith(o.rstrip("/") + "/")), None)
            if owner is not None:
                if store.differs(r) if finished[owner] else not (self.out / r).exists():
                    wanted.append(r)
            elif not (self.out / r).exists():  # a run not finished: its latest checkpoint, those kept at
                wanted.append(r)               # --save-at steps (a next update may start there), its state
        files, size = store.download({r: held[r] for r in wanted})
        if fetched or files:
            print(f"fetched from {store.uri}: {len(fetched)} step records, {files} files ({size / 2**20:.1f} MiB)",
                  flush=True)

    def upload_results(self) -> None:
        """Every finished step's outputs (new or changed files only: a step reused costs a listing), the
        model folder, the plots, report.md and the lock."""
        finished = [s for s in self.plan.steps() if self.records.path(s).is_file()]
        outputs = [o for s in finished for o in (*s.outputs, self.records.path(s))]
        files, size = self.store.push(outputs)
        results = [self.out / MODEL, self.out / "plots", self.out / "report.md", self.out / LOCK]
        sent = self.store.push(results, mirror=True)
        print(f"uploaded {files + sent[0]} files ({(size + sent[1]) / 2**20:.1f} MiB) to {self.store.uri}; the "
              "rest was there already", flush=True)

    def choose(self, update: str) -> Choice | None:
        replay = next(u for u in self.plan.recipe.updates if u.name == update).replay
        outcomes = [outcome(p.name, p.share, p.run_dir, p.replayed, p.new) for p in self.plan.pilots[update]]
        choice = choose_share(outcomes, replay.choose.budget, replay.choose.otherwise)
        self.choices[update] = choice
        print(f"sweep {update}: " + ", ".join(f"share {o.share:g} forgets {o.forgetting:.4f}, adapts "
                                             f"{o.adaptation:.4f}" for o in outcomes), flush=True)
        print(f"sweep {update}: chose share {choice.share:g}: {choice.reason}" if choice else
              f"sweep {update}: no share met the budget", flush=True)
        return choice

    # -- outputs

    def export_model(self) -> Path | None:
        """The last update's Hugging Face folder, copied whole into OUTPUT/model (renamed into place)."""
        last = self.plan.runs[self.plan.recipe.updates[-1].name]
        source = last.run_dir / "hf"
        if not source.is_dir():
            return None
        target = self.out / MODEL
        if (target / "config.json").exists() and content_hash(str(target)) == content_hash(str(source)):
            return target
        staging = self.out / (MODEL + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(source, staging)
        if target.exists():
            shutil.move(str(target), self.out / "replaced" / f"model-{time.strftime('%Y%m%d-%H%M%S')}")
        staging.rename(target)
        return target

    def write_lock(self) -> None:
        """recipe.lock.json: the resolved recipe (every default), each input's content hash, the sweep's
        choices and each finished step's record: what the same batches are a function of."""
        recipe = self.plan.recipe
        inputs = sorted({p for s in self.plan.steps() for p in s.inputs
                         if not p.startswith(str(self.out))})
        lock = {"name": self.plan.name, "recipe": recipe.model_dump(mode="json"),
                "inputs": {p: content_hash(p) if is_uri(p) or Path(p).exists() else None for p in inputs},
                "chosen": {u: c.share if c else None for u, c in self.choices.items()},
                "steps": {s.name: self.records.path(s).name for s in self.plan.steps()
                          if self.records.path(s).is_file()}}
        if self.store is not None:  # the records and checkpoints name paths in it: a rerun works there too
            lock["work_dir"] = str(self.out)
        tmp = self.out / (LOCK + ".partial")
        tmp.write_text(json.dumps(lock, indent=2))
        tmp.rename(self.out / LOCK)
