"""The demo's runs as the recipe's typed steps (`recipe/plan.py`), run by the recipe's `StepRunner`.

The man pages rendered and the base tokenizer trained (what a recipe starts from, made here), the tokenizer
extension and the token datasets are `PipelineStep`s holding the pipeline's `ManpagesConfig`,
`TokenizerTrainConfig`, `ExtendConfig` and `TokenizeConfig`; phase 1, each phase-2 run and the union baseline are `TrainStep`s holding the
trainer's `TrainConfig` and (phase 2) the service's `ServiceConfig`. Their commands come from the one
renderer per part (`recipe/argv.py`) and `demo/experiment.py` runs them with `recipe.runner.StepRunner`:
the recipe's reuse rule (records in WORK_DIR/steps/), trainers resumed, services on the state dir they left.

The encodings, as a recipe plans them: the old text (English) is replayed and scored in the encoding the
continued model is used with (the extended tokenizer's), and scored in the base encoding too:

    datasets/en-base   English, base tokenizer: phase 1 trains on it; phase 2 scores it as `en-base`
    datasets/en        English, extended tokenizer: what phase 2 replays and scores as `en`
    datasets/de        German, extended tokenizer
    datasets/de-base   German, base tokenizer (only for the run without the extension, with en-base)
"""

from __future__ import annotations

from typing import Sequence

from demo.experiment_config import ControllerRun, ExperimentConfig, GrownRun, Phase2Run
from demo.forgetting_budget import BASE_ENCODING, OLD
from pipeline.corpora.manpages import ManpagesConfig
from pipeline.shard_cache import CacheConfig
from pipeline.tokenize import TokenizeConfig
from pipeline.tokenizer.extend import ExtendConfig
from pipeline.tokenizer.train import TokenizerTrainConfig
from recipe.argv import trainer_argv
from recipe.plan import PORT_PLACEHOLDER, PipelineStep, TrainStep
from service.service_config import ServiceConfig
from trainer.checkpoint import CHECKPOINT_DIR, named_checkpoint
from trainer.lr_schedules import ScheduleConfig
from trainer.model import MODEL_SIZES
from trainer.train_config import DataConfig, TrainConfig, parse_args

BASE_TOKENIZER, EXTENDED_TOKENIZER = "en.model", "en+de.model"
EXTENSION_REPORT = "en+de.report.json"  # written beside the extended model by `pipeline.tokenizer extend`
ADMIN_TOKEN, READ_TOKEN = "admin-token", "read-token"  # in the work dir, private


def render_step(cfg: ExperimentConfig, lang: str) -> PipelineStep:
    """The `lang` man pages rendered to corpora/LANG-manpages.jsonl, which the demo turns into its corpus
    (corpora/LANG.jsonl, with --extra-old/--extra-new appended). No inputs hashed: the installed pages are
    many files, and the rendered text is pinned by the demo itself (`corpus.json`)."""
    config = ManpagesConfig(lang=lang, out=cfg.work_dir / "corpora" / f"{lang}-manpages.jsonl",
                            limit=cfg.pages_per_language)
    return PipelineStep(f"rendering {cfg.pages_per_language} {lang} man pages", config, (), (str(config.out),))


def base_tokenizer_step(cfg: ExperimentConfig) -> PipelineStep:
    """The English BPE tokenizer phase 1 is trained with: the base model's own, in a recipe's terms."""
    english, base = cfg.work_dir / "corpora" / "en.jsonl", cfg.work_dir / "tokenizers" / BASE_TOKENIZER
    return PipelineStep(f"training the English base tokenizer ({cfg.base_vocab} pieces)",
                        TokenizerTrainConfig(inputs=(str(english),), out=base, vocab_size=cfg.base_vocab,
                                             model_type="bpe"), (str(english),), (str(base),))


def dataset_specs(runs: Sequence[Phase2Run]) -> list[tuple[str, str, str]]:
    """(dataset, corpus, tokenizer) of the token datasets these runs need: German with the base tokenizer
    only for a run without the extension."""
    specs = [("en-base", "en", BASE_TOKENIZER), ("en", "en", EXTENDED_TOKENIZER), ("de", "de", EXTENDED_TOKENIZER)]
    return specs + ([("de-base", "de", BASE_TOKENIZER)] if any(not spec.extend_tokenizer for spec in runs) else [])


def pipeline_steps(cfg: ExperimentConfig, runs: Sequence[Phase2Run]) -> list[PipelineStep]:
    """The tokenizer extension, then every token dataset the runs need."""
    corpora, tokenizers, datasets = (cfg.work_dir / d for d in ("corpora", "tokenizers", "datasets"))
    base, extended = tokenizers / BASE_TOKENIZER, tokenizers / EXTENDED_TOKENIZER
    english, german = str(corpora / "en.jsonl"), str(corpora / "de.jsonl")
    steps = [PipelineStep(
        f"extending the English tokenizer with up to {cfg.new_pieces} German pieces",
        ExtendConfig(base=base, inputs=(german,), old_inputs=(english,), new_pieces=cfg.new_pieces, out=extended),
        (str(base), german, english), (str(extended), str(tokenizers / EXTENSION_REPORT)))]
    for name, lang, model in dataset_specs(runs):
        config = TokenizeConfig(inputs=[str(corpora / f"{lang}.jsonl")], tokenizer=str(tokenizers / model),
                                out=str(datasets / name), seed=cfg.seed, val_fraction=cfg.val_fraction)
        steps.append(PipelineStep(f"tokenizing the {lang} corpus with {model} into datasets/{name}", config,
                                  (config.inputs[0], str(config.tokenizer)), (config.out,)))
    return steps


def _trainer(cfg: ExperimentConfig, config: TrainConfig) -> TrainConfig:
    """`config` with the preset's extra trainer flags, read by the trainer's own parser."""
    if not cfg.extra_trainer_args:
        return config
    return parse_args([*trainer_argv(config), *cfg.extra_trainer_args])


def _step(name: str, about: str, share: float | None, trainer: TrainConfig, service: ServiceConfig | None,
          inputs: Sequence[object]) -> TrainStep:
    outputs = (str(trainer.out), *([str(service.state_dir)] if service else []))
    return TrainStep(name, "demo", "train", share, service, trainer, (), "process", 1, None, ("en",), ("de",),
                     tuple(str(i) for i in inputs), outputs, about)


def phase1_step(cfg: ExperimentConfig) -> TrainStep:
    """Phase 1: English alone (base encoding), infinite schedule, a checkpoint saved just before the anneal.
    In-process mixing: the batch geometry is the trainer's own; phase 2's services decide it for theirs."""
    english = str(cfg.work_dir / "datasets" / "en-base")
    steps = cfg.phase1_steps
    trainer = TrainConfig(
        out=cfg.work_dir / "runs" / "phase1-en",
        # Scored on English only: German ids of the extended tokenizer do not exist in this model yet.
        data=DataConfig(datasets={"en": english}, weights={"en": 1.0}, seq_len=cfg.seq_len,
                        global_batch=cfg.global_batch, micro_batch=cfg.micro_batch, eval_datasets={"en": english},
                        eval_batches=cfg.eval_batches),
        schedule=ScheduleConfig(name="infinite", max_lr=cfg.max_lr, min_lr=cfg.min_lr, warmup_steps=max(1, steps // 100),
                                cooldown_steps=round(0.59 * steps), decay_steps=cfg.anneal_steps(steps)),
        model=cfg.model, steps=steps, eval_every=cfg.eval_every, log_every=1, save_at=(cfg.phase1_anneal_start,),
        device=cfg.device, seed=cfg.seed)
    return _step("phase 1", f"pretraining a {cfg.model} Llama on English for {steps} steps", None,
                 _trainer(cfg, trainer), None, [english])


def union_step(cfg: ExperimentConfig) -> TrainStep:
    """The baseline the paper measures continuing against: from scratch on English and German together,
    both in the extended encoding from the first step, re-warmed cosine."""
    assert cfg.union is not None
    share, datasets = cfg.union_german_share, cfg.work_dir / "datasets"
    both = {lang: str(datasets / lang) for lang in ("en", "de")}
    trainer = TrainConfig(
        out=cfg.work_dir / "runs" / cfg.union.name,
        data=DataConfig(datasets=both, weights={"en": float(f"{1 - share:.4f}"), "de": float(f"{share:.4f}")},
                        seq_len=cfg.seq_len, global_batch=cfg.global_batch, micro_batch=cfg.micro_batch,
                        eval_datasets=dict(both), eval_batches=cfg.eval_batches),
        schedule=ScheduleConfig(name="cosine", max_lr=cfg.max_lr, min_lr=cfg.min_lr,
                                warmup_steps=max(1, cfg.union_steps // 100)),
        model=cfg.model, steps=cfg.union_steps, eval_every=cfg.eval_every, log_every=1, device=cfg.device,
        seed=cfg.seed)
    return _step("union baseline", f"a {cfg.model} Llama from scratch on English + German ({share:.1%} German) "
                 f"for {cfg.union_steps} steps, re-warmed cosine", None, _trainer(cfg, trainer), None,
                 both.values())


def phase2_schedule(cfg: ExperimentConfig, spec: Phase2Run) -> ScheduleConfig:
    """A re-warmed cosine (its peak and warmup the run's own where it changes them), or phase 1's infinite
    schedule as its checkpoint recorded it: the constant rate, then this run's anneal."""
    if not spec.rewarm:
        return ScheduleConfig(continued=True, decay_steps=cfg.anneal_steps(cfg.phase2_steps))
    peak, floor = (cfg.max_lr, cfg.min_lr) if spec.max_lr is None else (spec.max_lr, float(f"{spec.max_lr / 10:.3g}"))
    return ScheduleConfig(name="cosine", max_lr=peak, min_lr=floor,
                          warmup_steps=spec.warmup_steps or cfg.phase2_warmup())


def growth(cfg: ExperimentConfig, spec: Phase2Run) -> dict[str, str]:
    """The trainer's --grow and --train of a run that grows the phase-1 model (none for the others)."""
    if not isinstance(spec, GrownRun):
        return {}
    return {"grow": spec.grow_spec(MODEL_SIZES[cfg.model]["n_layer"]), "train": spec.train}


def phase2_step(cfg: ExperimentConfig, spec: Phase2Run, budget: float | None = None) -> TrainStep:
    """Phase 2: one run on the German stream served by the mixer from the phase-1 checkpoint, English replayed
    at spec.replay (changed live, or steered by the service's controller with `budget`, for the runs that
    say so)."""
    work, steered = cfg.work_dir, isinstance(spec, ControllerRun)
    datasets = work / "datasets"
    if spec.extend_tokenizer:
        mix = {"en": str(datasets / "en"), "de": str(datasets / "de")}
        evals = {**mix, BASE_ENCODING: str(datasets / "en-base")}
        report = work / "tokenizers" / EXTENSION_REPORT
    else:  # the model's own tokenizer throughout: both corpora in the base encoding
        mix = {"en": str(datasets / "en-base"), "de": str(datasets / "de-base")}
        evals, report = dict(mix), None
    start = work / "runs" / "phase1-en" / CHECKPOINT_DIR / named_checkpoint(cfg.phase1_anneal_start)
    controller = None
    if steered:
        assert isinstance(spec, ControllerRun) and budget is not None
        # A decision at most per evaluation: the controller learns nothing new between two.
        controller = ("forgetting-budget", {"old": OLD, "budget": budget, "min_share": spec.min_share,
                                            "max_share": spec.max_share, "interval": cfg.eval_every})
    # At the service's default log level: its log shows every request the trainer made.
    service = ServiceConfig(
        datasets=mix, weights={"en": spec.replay, "de": 1 - spec.replay}, seq_len=cfg.seq_len,
        global_batch=cfg.global_batch, seed=cfg.seed + spec.seed, state_dir=str(work / "service" / spec.name),
        port=PORT_PLACEHOLDER, admin_token_file=work / ADMIN_TOKEN, read_token_file=work / READ_TOKEN,
        controller=controller, cache=CacheConfig.default())
    trainer = TrainConfig(
        out=work / "runs" / spec.name,
        data=DataConfig(stream_url=f"http://127.0.0.1:{PORT_PLACEHOLDER}", stream_token_file=work / READ_TOKEN,
                        micro_batch=cfg.micro_batch, eval_datasets=evals, eval_batches=cfg.eval_batches,
                        # The client reads a few steps ahead only, so a change without start_step (the
                        # operator's, or the controller's after an evaluation) lands a few steps after it was made.
                        stream_read_ahead=2 if spec.switch_to is not None or steered else None),
        schedule=phase2_schedule(cfg, spec), model=cfg.model, steps=cfg.phase2_steps, eval_every=cfg.eval_every,
        log_every=1, init_from=start, reset_optimizer=spec.reset_optimizer, extension_report=report,
        device=cfg.device, seed=cfg.seed + spec.seed, **growth(cfg, spec))
    about = (f"{spec.replay:.0%} English replay" + (f", seed {spec.seed}" if spec.seed else "")
             + (f", switched live to {spec.switch_to:.0%}" if spec.switch_to is not None else "")
             + (", then steered by the forgetting-budget controller" if steered else "")
             + (f", grown by {growth(cfg, spec)['grow']} (training {spec.train})" if isinstance(spec, GrownRun) else "")
             + (", no re-warming" if not spec.rewarm else ", re-warmed cosine"))
    return _step(f"phase 2: {spec.name}", about, spec.replay, _trainer(cfg, trainer), service,
                 [*mix.values(), *evals.values(), start, *([report] if report else [])])


