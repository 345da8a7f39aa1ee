"""A recipe planned into ordered, typed steps, each holding the config object of the part that runs it.

- `PipelineStep`: `pipeline.tokenizer extend` (an `ExtendConfig`) or `pipeline.tokenize` (a `TokenizeConfig`);
  the demo's own inputs are made by `pipeline.tokenizer train` (a `TokenizerTrainConfig`) and
  `pipeline.corpora.manpages` (a `ManpagesConfig`), steps of the same kind.
- `TrainStep`: a mixer service (`ServiceConfig`) and a trainer (`TrainConfig`) pulling from it: a sweep's
  pilot or an update's full run (a step with no service is a trainer mixing its datasets in process: the
  demo's pretraining and union runs).
- `MergeStep`: the update's start model (grown as its run grew it, if it did) and its continued model (the
  full run's final checkpoint) merged in memory (`trainer.merge.merge_state_dicts`) and scored on the full
  run's validation windows (`trainer.evaluate.score`): the alternative to replay that costs no training
  (`recipe/merging.py` runs it).

Every step declares its inputs (what its outputs depend on, content-hashed by the runner) and outputs,
and its command comes from `recipe.argv`, the one renderer per part. Where things go in the output folder:

    tokenizers/UPDATE/           an update's extended tokenizer (with extension_report.json)
    datasets/CORPUS.TAG/         a corpus tokenized with tokenizer TAG ("base" or the update that extended it)
    datasets/CORPUS.eval.TAG/    a corpus's held-out `eval` file, tokenized whole as a validation split
    runs/UPDATE/pilot-SHARE/     a sweep's pilot; runs/UPDATE/train/ the update's full run
    service/STEP/                each run's mixer state (its mix log: mix_log.jsonl)
    merges/UPDATE/NAME.json      a merge's losses on the update's validation sets
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from pipeline.corpora.manpages import ManpagesConfig
from pipeline.shard_cache import CacheConfig
from pipeline.tokenize import TokenizeConfig
from pipeline.tokenizer.extend import ExtendConfig
from pipeline.tokenizer.train import TokenizerTrainConfig
from recipe.argv import (extend_argv, manpages_argv, service_argv, tokenize_argv, train_tokenizer_argv,
                         trainer_argv)
from recipe.errors import RecipeError
from recipe.schema import Corpus, MergeOption, Recipe, Update
from service.service_config import ServiceConfig
from trainer.checkpoint import CHECKPOINT_DIR, FINAL, named_checkpoint
from trainer.lr_schedules import ScheduleConfig, build_schedule
from trainer.merge import MergeSpec
from trainer.train_config import DataConfig, OptimConfig, TrainConfig

BASE = "base"  # the tag of the model's own tokenizer
PORT_PLACEHOLDER = 0  # a service's port is chosen free when it starts; the plan shows PORT
SECRETS = "secrets"
MERGES = "merges"  # OUTPUT/merges/UPDATE/NAME.json: a merge's record
# An eval file is held out whole: every document in the validation split the trainer scores (the job takes
# fractions below 1; one document in 2**30 is lost to the train split).
WHOLE = 1 - 2**-30


# Each pipeline config: the module that runs it, and its renderer.
_PIPELINE_PARTS = {TokenizeConfig: ("pipeline.tokenize", tokenize_argv),
                   ExtendConfig: ("pipeline.tokenizer", extend_argv),
                   TokenizerTrainConfig: ("pipeline.tokenizer", train_tokenizer_argv),
                   ManpagesConfig: ("pipeline.corpora.manpages", manpages_argv)}


@dataclass(frozen=True)
class PipelineStep:
    name: str
    config: TokenizeConfig | ExtendConfig | TokenizerTrainConfig | ManpagesConfig
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]

    @property
    def module(self) -> str:
        return _PIPELINE_PARTS[type(self.config)][0]

    def command(self) -> list[str]:
        return [sys.executable, "-m", self.module, *_PIPELINE_PARTS[type(self.config)][1](self.config)]


@dataclass(frozen=True)
class TrainStep:
    name: str
    update: str
    role: str  # "pilot" or "train"
    share: float | None  # the fixed replayed share (None: stages or a controller decide it)
    service: ServiceConfig | None  # None: the trainer mixes its `data.datasets` in process
    trainer: TrainConfig
    later_stages: tuple[tuple[int, dict[str, float]], ...]  # (start step, weights) PUT once the service is up
    launcher: str
    workers: int
    threads: int | None
    replayed: tuple[str, ...]  # the corpora replayed (forgetting is measured on them)
    new: tuple[str, ...]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    about: str = ""  # what the run is, printed as it starts (default: its role, steps and mix)

    @property
    def run_dir(self) -> Path:
        return self.trainer.out

    def trainer_command(self, trainer: TrainConfig | None = None) -> list[str]:
        argv = trainer_argv(trainer or self.trainer)
        if self.launcher == "torchrun":
            # --standalone: its rendezvous on a free port of this node, not torchrun's fixed 29500, which a
            # second job (or a killed one's leftover) on the machine would hold.
            return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={self.workers}",
                    "-m", "trainer", *argv]
        if self.launcher == "ray":
            gpu = ["--use-gpu"] if self.trainer.device == "cuda" else []
            return [sys.executable, "-m", "trainer.ray_launcher", f"--num-workers={self.workers}", *gpu,
                    f"--storage-path={self.run_dir.parent / (self.run_dir.name + '.ray')}", "--", *argv]
        return [sys.executable, "-m", "trainer", *argv]

    def service_command(self, service: ServiceConfig | None = None) -> list[str]:
        return [sys.executable, "-m", "service", *service_argv(service or self.service)]


@dataclass(frozen=True)
class MergeStep:
    """A merge of an update's start and continued models, scored as the update's runs are: a row beside them."""

    name: str  # UPDATE/LABEL
    update: str
    option: MergeOption
    start: Path  # the model the update started from: a Hugging Face folder or a checkpoint
    grow: str | None  # the update's growth: the start is merged grown as its run grew it (computing what it did)
    seed: int  # the growth's seed (an upcycled router's), the trainer's --seed
    continued: Path  # the update's full run's final checkpoint
    eval_datasets: dict[str, str]  # the full run's, scored on its windows
    seq_len: int
    eval_batches: int
    micro_batch: int
    device: str
    replayed: tuple[str, ...]
    new: tuple[str, ...]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]  # the record of its losses, merges/UPDATE/LABEL.json

    @property
    def record(self) -> Path:
        return Path(self.outputs[0])

    def spec(self) -> MergeSpec:
        """The merge as `trainer.merge` states it: linear weighs the two models, the others add the task
        vector (continued minus start) to the start."""
        o = self.option
        if o.method == "linear":
            return MergeSpec("linear", (self.start, self.continued), weights=(1 - o.alpha, o.alpha))
        return MergeSpec(o.method, (self.continued,), base=self.start, density=o.density, lam=o.lam)

    def settings(self) -> dict:
        """What its losses are a function of besides its inputs' content."""
        return {"merge": self.spec().record(), "grow": self.grow, "seed": self.seed,
                "eval_datasets": dict(self.eval_datasets), "seq_len": self.seq_len,
                "eval_batches": self.eval_batches, "micro_batch": self.micro_batch, "device": self.device}


Step = PipelineStep | TrainStep | MergeStep


@dataclass
class Plan:
    recipe: Recipe
    name: str
    out: Path
    base_tokenizer: str
    pipeline: list[PipelineStep] = field(default_factory=list)
    # Per update, in order: its pilots (a sweep's) and its full run (None until a sweep has chosen).
    pilots: dict[str, list[TrainStep]] = field(default_factory=dict)
    runs: dict[str, TrainStep | None] = field(default_factory=dict)
    merges: dict[str, list[MergeStep]] = field(default_factory=dict)  # planned with the update's full run
    store: str | None = None  # an object-store output of record (`out` is then its local working copy)

    def steps(self) -> list[Step]:
        trains = [s for u in self.recipe.updates
                  for s in [*self.pilots[u.name], self.runs[u.name], *self.merges.get(u.name, [])] if s]
        return [*self.pipeline, *trains]


def make_plan(recipe: Recipe, name: str, chosen: dict[str, float] | None = None) -> Plan:
    """The steps of `recipe`; a sweep's full run is planned once `chosen` gives its update's share."""
    out = recipe.work_folder(name)
    if recipe.tokenizer is None and not recipe.is_hf:
        raise RecipeError(f"model {recipe.model!r}: a fresh model needs `tokenizer:` (the tokenizer its data uses)")
    check_strategies(recipe)
    base = recipe.tokenizer or recipe.model[3:]
    plan = Plan(recipe, name, out, base, store=recipe.output if recipe.output_in_store else None)
    tokenizer, tag = base, BASE
    earlier: dict[str, Corpus] = dict(recipe.old)
    datasets: dict[tuple[str, str], str] = {}  # (corpus, tag) -> the dataset of its text in that encoding
    evals: dict[tuple[str, str], str] = {}  # (corpus, tag) -> the dataset scored as its validation set

    def tokenized(corpus_name: str, corpus: Corpus, tok: str, tok_tag: str) -> None:
        if (corpus_name, tok_tag) in datasets:
            return
        target = out / "datasets" / f"{corpus_name}.{tok_tag}"
        plan.pipeline.append(PipelineStep(
            f"tokenize {corpus_name} ({tok_tag} tokenizer)",
            TokenizeConfig(inputs=[corpus.path], tokenizer=tok, out=str(target), text_field=corpus.text_field,
                           split=corpus.split, config=corpus.config, val_fraction=recipe.data.val_fraction,
                           seed=recipe.data.seed, num_cpus=recipe.compute.cpus),
            (corpus.path, tok), (str(target),)))
        datasets[corpus_name, tok_tag] = str(target)
        evals[corpus_name, tok_tag] = str(target)
        if corpus.eval:
            held = out / "datasets" / f"{corpus_name}.eval.{tok_tag}"
            plan.pipeline.append(PipelineStep(
                f"tokenize {corpus_name}'s eval set ({tok_tag} tokenizer)",
                TokenizeConfig(inputs=[corpus.eval], tokenizer=tok, out=str(held), text_field=corpus.text_field,
                               val_fraction=WHOLE, seed=recipe.data.seed, num_cpus=recipe.compute.cpus),
                (corpus.eval, tok), (str(held),)))
            evals[corpus_name, tok_tag] = str(held)

    start: tuple[str, Path | None] = (recipe.model, None)  # what the first update starts from
    for index, update in enumerate(recipe.updates):
        report = None
        if update.tokenizer.extend:
            extended = out / "tokenizers" / update.name
            plan.pipeline.append(PipelineStep(
                f"extend the tokenizer with {update.tokenizer.extend} pieces of {', '.join(update.new)}",
                ExtendConfig(base=Path(tokenizer), inputs=tuple(c.path for c in update.new.values()),
                             old_inputs=tuple(c.path for c in earlier.values()), new_pieces=update.tokenizer.extend,
                             out=extended, text_field=_one_text_field(update), num_cpus=recipe.compute.cpus),
                (tokenizer, *(c.path for c in update.new.values()), *(c.path for c in earlier.values())),
                (str(extended),)))
            tokenizer, tag = str(extended), update.name
            report = extended / "extension_report.json"
        for corpus_name, corpus in {**earlier, **update.new}.items():
            tokenized(corpus_name, corpus, tokenizer, tag)
        if tag != BASE:  # the replayed corpora in the model's original encoding too, for bits per byte there
            for corpus_name, corpus in earlier.items():
                tokenized(corpus_name, corpus, base, BASE)
        eval_sets = {n: evals[n, tag] for n in {**earlier, **update.new}}
        if tag != BASE:
            eval_sets |= {f"{n}-{BASE}": evals[n, BASE] for n in earlier}
        mix = {n: datasets[n, tag] for n in {**earlier, **update.new}}
        continued = index + 1 < len(recipe.updates) and recipe.updates[index + 1].schedule.kind == "continue"
        context = _RunContext(recipe, out, update, index, start, report, mix, eval_sets, earlier, continued)
        replay = update.replay
        plan.pilots[update.name] = [context.step(f"pilot-{s:g}", "pilot", s) for s in (replay.sweep or [])]
        share = chosen.get(update.name) if chosen else None
        if replay.kind == "sweep" and share is None:
            plan.runs[update.name] = None
        else:
            plan.runs[update.name] = context.step("train", "train", share)
            plan.merges[update.name] = [context.merge(option, plan.runs[update.name]) for option in update.merges]
        # The next update continues this one's model: its final one, or (schedule: continue) the one saved
        # where this run's final decay begins, so that it goes on at the constant rate, not re-warmed.
        checkpoints = out / "runs" / update.name / "train" / CHECKPOINT_DIR
        start = ("checkpoint", checkpoints / (named_checkpoint(context.anneal_start()) if continued else FINAL))
        earlier |= update.new
    return plan


def check_strategies(recipe: Recipe) -> None:
    """What the trainer or a merge would refuse later, refused now: the model grown by one update only (a
    grown checkpoint is not grown again: later updates continue it as it is), never a fresh model's first
    update (it has nothing to continue), --train new-blocks without FSDP; merges of a start model (not a fresh
    model's random initialisation) and of unsharded checkpoints."""
    if recipe.updates[0].merges and not recipe.is_hf:
        raise RecipeError(f"updates.0.merges: a merge weighs the model an update started from, and the first update "
                          f"of a fresh model ({recipe.model}) starts from random weights; merge a later update's, or "
                          "start from hf:PATH")
    grown_by = None
    for index, update in enumerate(recipe.updates):
        if update.grow is None:
            continue
        key = f"updates.{index}.grow"
        if grown_by is not None:
            raise RecipeError(f"{key}: the model was grown by update {grown_by!r} already, and later updates "
                              "continue the grown model; a grown model is not grown again: drop grow here")
        if index == 0 and not recipe.is_hf:
            raise RecipeError(f"{key}: grow grows the model an update continues, and the first update of a fresh "
                              f"model ({recipe.model}) continues none; grow a later update, or start from hf:PATH")
        if update.train == "new-blocks" and recipe.compute.fsdp:
            raise RecipeError(f"updates.{index}.train: new-blocks is not supported with compute.fsdp (the new "
                              "tokens' rows are held by a gradient hook sharded parameters do not run); use "
                              "train: all, or fsdp: false")
        grown_by = update.name
    for index, update in enumerate(recipe.updates):
        if update.merges and recipe.compute.fsdp:
            raise RecipeError(f"updates.{index}.merges: a merge reads the full run's final checkpoint whole, and "
                              "an fsdp run's is sharded; drop merges, or fsdp: false")


def _one_text_field(update: Update) -> str:
    fields = {c.text_field for c in update.new.values()}
    if len(fields) > 1:
        raise RecipeError(f"updates.{update.name}.new: a tokenizer extension reads one text field; the new "
                          f"corpora name several ({', '.join(sorted(fields))})")
    return fields.pop()


@dataclass
class _RunContext:
    """What every run of one update shares; `step` makes a pilot or the full run of it."""

    recipe: Recipe
    out: Path
    update: Update
    index: int
    start: tuple[str, Path | None]
    report: Path | None
    mix: dict[str, str]
    eval_sets: dict[str, str]
    earlier: dict[str, Corpus]
    continued_next: bool  # the next update continues this one's schedule: keep the checkpoint before the decay

    def anneal_start(self) -> int:
        """The step where the full run's final decay begins (its schedule's own rule for the length)."""
        schedule = build_schedule(self._schedule(self.update.steps), self.update.steps) \
            if self.update.schedule.kind != "continue" else None
        decay = getattr(schedule, "anneal_steps", None) or getattr(schedule, "decay_steps", None)
        if schedule is None or decay is None:
            raise RecipeError(f"updates.{self.index + 1}.schedule.kind: continue goes on at the constant rate of the "
                              f"previous update's infinite or wsd schedule; updates.{self.index}.schedule.kind is "
                              f"{self.update.schedule.kind}, which has none: make it infinite or wsd")
        return self.update.steps - decay

    def weights(self, share: float) -> dict[str, float]:
        old = {n: c.weight for n, c in self.earlier.items()}
        new = {n: c.weight for n, c in self.update.new.items()}
        return ({n: round(share * w / sum(old.values()), 6) for n, w in old.items()}
                | {n: round((1 - share) * w / sum(new.values()), 6) for n, w in new.items()})

    def step(self, label: str, role: str, share: float | None) -> TrainStep:
        recipe, update, replay = self.recipe, self.update, self.update.replay
        name = f"{update.name}/{label}"
        run_dir = self.out / "runs" / update.name / label
        steps = replay.pilot_steps if role == "pilot" else update.steps
        every = recipe.evaluation.every if role == "train" else min(recipe.evaluation.every, max(1, steps // 4))
        controller, later = None, ()
        if role == "pilot":
            first = self.weights(share)
        elif replay.kind == "stages":
            first = self.weights(replay.stages[0].share)
            later = tuple((s.at, self.weights(s.share)) for s in replay.stages[1:])
        elif replay.kind == "budget":
            controller, first = self._controller(replay.budget, every), self.weights(replay.start_share)
        elif replay.kind == "sweep" and replay.then == "controller":  # the chosen share is the controller's start
            controller, first, share = self._controller(replay.choose.budget, every), self.weights(share), None
        else:
            share = replay.fixed_share if share is None else share
            first = self.weights(share)
        secrets = self.out / SECRETS
        service = ServiceConfig(
            datasets=dict(self.mix), weights=first, seq_len=recipe.data.seq_len,
            global_batch=recipe.data.global_batch, seed=recipe.data.seed, state_dir=_state_dir(self.out / "service" / name),
            port=PORT_PLACEHOLDER, admin_token_file=secrets / "admin-token", read_token_file=secrets / "read-token",
            controller=controller, log_level="warning", cache=CacheConfig.default())
        trainer = TrainConfig(
            out=run_dir,
            data=DataConfig(stream_url=f"http://127.0.0.1:{PORT_PLACEHOLDER}", stream_token_file=secrets / "read-token",
                            micro_batch=recipe.data.micro_batch, eval_datasets=dict(self.eval_sets),
                            eval_batches=recipe.evaluation.batches,
                            stream_read_ahead=2 if controller or later else None),
            schedule=self._schedule(steps),
            optim=OptimConfig(),
            steps=steps, eval_every=every, log_every=1, checkpoint_every=recipe.training.checkpoint_every,
            save_at=(self.anneal_start(),) if self.continued_next and role == "train" else (),
            init_from=self.start[1], hf_model=self.start[0][3:] if self.start[1] is None and recipe.is_hf else None,
            model=recipe.model if not recipe.is_hf else TrainConfig.model,
            dtype=recipe.training.dtype, extension_report=self.report, seed=recipe.training.seed,
            device=recipe.compute.device, compile=recipe.training.compile, progress=False, fsdp=recipe.compute.fsdp,
            grow=update.grow, train=update.train)
        inputs = (*self.mix.values(), *self.eval_sets.values(),
                  *([self.start[0][3:]] if trainer.hf_model else [str(self.start[1])] if self.start[1] else []),
                  *([str(self.report)] if self.report else []))
        return TrainStep(name, update.name, role, share, service, trainer, later, recipe.compute.launcher,
                         recipe.compute.workers, recipe.compute.threads, tuple(self.earlier), tuple(update.new),
                         inputs, (str(run_dir), str(service.state_dir)))

    def merge(self, option: MergeOption, full: TrainStep) -> MergeStep:
        """`option`'s merge of this update's start model and `full`'s final one, scored on `full`'s windows."""
        start = Path(self.start[0][3:]) if self.start[1] is None else self.start[1]
        continued = full.run_dir / CHECKPOINT_DIR / FINAL
        name = f"{self.update.name}/{option.label}"
        record = self.out / MERGES / self.update.name / f"{option.label}.json"
        data = full.trainer.data
        return MergeStep(name, self.update.name, option, start, full.trainer.grow, full.trainer.seed, continued,
                         dict(data.eval_datasets),
                         self.recipe.data.seq_len, data.eval_batches, data.micro_batch, self.recipe.compute.device,
                         full.replayed, full.new, (str(start), str(continued), *data.eval_datasets.values()),
                         (str(record),))

    def _controller(self, budget: float, every: int) -> tuple[str, dict]:
        replay = self.update.replay
        old = replay.old or (next(iter(self.earlier)) if len(self.earlier) == 1 else None)
        if old is None or old not in self.earlier:
            raise RecipeError(f"updates.{self.index}.replay.old: a forgetting budget holds one replayed corpus; "
                              f"name it (one of {', '.join(self.earlier)})")
        return ("forgetting-budget", {"old": old, "budget": budget, "min_share": replay.min_share,
                                      "max_share": replay.max_share, "interval": every})

    def _schedule(self, steps: int) -> ScheduleConfig:
        s = self.update.schedule
        if s.kind == "continue":
            if self.start[1] is None:
                raise RecipeError(f"updates.{self.index}.schedule.kind: continue follows the previous update's "
                                  "schedule, and the first update has none (a Hugging Face folder records no "
                                  "schedule); use cosine, infinite or wsd there")
            return ScheduleConfig(continued=True, decay_steps=s.decay_steps)
        return ScheduleConfig(name=s.kind, max_lr=s.max_lr, min_lr=s.min_lr, warmup_steps=s.warmup_steps,
                              decay_steps=s.decay_steps if s.kind != "cosine" else None)


def _state_dir(path: Path) -> str | Path:
    """The service's state dir as its config types it (a Path, or a string once URIs are allowed)."""
    annotation = next(f.type for f in fields(ServiceConfig) if f.name == "state_dir")
    return str(path) if str(annotation).startswith("str") else path


def with_port(step: TrainStep, port: int, host: str = "127.0.0.1") -> tuple[ServiceConfig, TrainConfig]:
    """The step's service and trainer configs for a service listening on `host`:`port`."""
    return (replace(step.service, port=port, host=host),
            replace(step.trainer, data=replace(step.trainer.data, stream_url=f"http://{host}:{port}")))
