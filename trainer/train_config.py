"""The trainer's configuration: plain dataclasses, and the one place that turns CLI flags into them.

Each field's flag policy lives beside it, as field metadata (`_flag`): the CLI flag that sets it where that is
not the field's name in kebab case, whether --resume may change it (`Resume`), and which flag of a mixer
service decides it instead under --stream. Renaming a field carries its policy along.
"""

from __future__ import annotations

import argparse
import enum
from dataclasses import MISSING, Field, asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence, get_type_hints

from service.client import COMPUTE_MODES
from service.mix_schedule import ScheduleError, check_weight_names
from service.name_values import name_values, number_list
from trainer.dashboards import parse_loggers
from trainer.document_mask import check_attention
from trainer.errors import TrainerError
from trainer.growth import TRAIN_MODES, GrowSpec, GrowthError
from trainer.hf_model import DTYPES, HF_PREFIX
from trainer.model import MODEL_SIZES
from trainer.lr_schedules import SCHEDULES, ScheduleConfig


class Resume(enum.Enum):
    """What --resume does with a flag."""

    SAME = "same"  # defines what the run computes: a resume must give the value its checkpoint recorded
    MAY_CHANGE = "may change"  # how long, how often and how visibly the run goes on, and on what hardware
    HOW_IT_BEGAN = "how it began"  # a resumed run takes what these made from its checkpoint instead
    START_ONLY = "start only"  # as HOW_IT_BEGAN, and only starting a run may say it: a resume command drops it


def _flag(default: Any = MISSING, *, default_factory: Any = MISSING, flag: str | None = None,
          resume: Resume = Resume.SAME, service: str | None = None) -> Any:
    """A config field with its flag policy: `flag` where the CLI flag is not the field's name in kebab case,
    `resume`, and `service`, the flag of a mixer service that decides the value under --stream."""
    return field(default=default, default_factory=default_factory,
                 metadata={"flag": flag, "resume": resume, "service": service})


@dataclass(frozen=True)
class DataConfig:
    """Where batches come from: datasets mixed in-process at constant weights, or a mixer service."""

    datasets: dict[str, str] = _flag(default_factory=dict, flag="--dataset")  # name -> dataset folder
    weights: dict[str, float] = _flag(default_factory=dict, service="--weights")
    stream_url: str | None = _flag(None, flag="--stream", resume=Resume.MAY_CHANGE)
    # steps per request and decoded queue; None: the client's default
    stream_read_ahead: int | None = _flag(None, resume=Resume.MAY_CHANGE)
    # the service's read token (None: it allows anonymous reads)
    stream_token_file: Path | None = _flag(None, resume=Resume.MAY_CHANGE)
    # "service": the service sends the rows; "local": this process computes them under the service's leases
    # (service/local_compute.py), the same bytes, so a resumed run may switch.
    stream_compute: str = _flag("service", flag="--compute", resume=Resume.MAY_CHANGE)
    seq_len: int = _flag(256, service="--seq-len")
    global_batch: int = _flag(32, service="--global-batch")  # sequences per step over all ranks
    # sequences per forward pass on one rank; the rest is gradient accumulation (it only splits the same
    # global batch, so a resume may change it)
    micro_batch: int = _flag(8, resume=Resume.MAY_CHANGE)
    seed: int = _flag(0, flag="--data-seed", service="--seed")
    eval_datasets: dict[str, str] = _flag(default_factory=dict, flag="--eval-dataset")  # default: the training datasets
    eval_batches: int = 4  # micro-batches of each validation set per evaluation


@dataclass(frozen=True)
class OptimConfig:
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0


@dataclass(frozen=True)
class TrainConfig:
    out: Path = _flag(resume=Resume.HOW_IT_BEGAN)
    data: DataConfig
    # ScheduleConfig (trainer/lr_schedules.py) knows no CLI: the flags of its fields that are not their kebab names.
    schedule: ScheduleConfig = field(metadata={"flags": {"name": "--lr-schedule", "continued": "--continue-schedule"}})
    optim: OptimConfig = OptimConfig()
    model: str = "test"
    untied: bool = False
    steps: int = _flag(100, resume=Resume.MAY_CHANGE)
    eval_every: int = _flag(50, resume=Resume.MAY_CHANGE)
    log_every: int = _flag(1, resume=Resume.MAY_CHANGE)
    checkpoint_every: int = _flag(100, resume=Resume.MAY_CHANGE)
    save_at: tuple[int, ...] = _flag((), resume=Resume.MAY_CHANGE)
    init_from: Path | None = _flag(None, resume=Resume.START_ONLY)  # a trainer checkpoint
    # --init-from hf:PATH: a Hugging Face folder (or Hub id)
    hf_model: str | None = _flag(None, flag="--init-from", resume=Resume.START_ONLY)
    dtype: str = "float32"  # the weights' (and optimizer state's) dtype
    # where to write the Hugging Face folder at the end (default RUN_DIR/hf)
    save_hf: Path | None = _flag(None, resume=Resume.MAY_CHANGE)
    reset_optimizer: bool = _flag(False, resume=Resume.HOW_IT_BEGAN)
    extension_report: Path | None = _flag(None, resume=Resume.HOW_IT_BEGAN)
    resume: bool = _flag(False, resume=Resume.HOW_IT_BEGAN)
    # start afresh in an --out that holds an earlier run, deleting it
    overwrite: bool = _flag(False, resume=Resume.START_ONLY)
    seed: int = 0  # model initialisation
    device: str = _flag("cpu", resume=Resume.MAY_CHANGE)
    compile: bool = _flag(False, resume=Resume.MAY_CHANGE)
    progress: bool = _flag(True, flag="--no-progress", resume=Resume.MAY_CHANGE)
    fsdp: bool = False  # shard weights, gradients and optimizer state over the ranks (trainer/fsdp.py)
    # --grow blocks:N | experts:E,top_k:K at the start of a continued run (trainer/growth.py); a resume gives it
    # again, so a grown checkpoint is never resumed as another model
    grow: str | None = None
    train: str = "all"  # which parameters train: all, or new-blocks (those --grow blocks:N inserted)
    # trainer/document_mask.py: positions restart and attention stays inside each document of a row
    document_masking: bool = False
    eod_mask_loss: bool = False  # the prediction made at an EOS (the next document's first token) is not trained
    # transformers' attn_implementation: the same function, computed by another kernel
    attention: str = _flag("sdpa", resume=Resume.MAY_CHANGE)
    # recompute each decoder block's activations in the backward pass: the same losses, less memory
    activation_checkpointing: bool = _flag(False, resume=Resume.MAY_CHANGE)
    log_to: tuple[str, ...] = _flag((), resume=Resume.MAY_CHANGE)  # dashboards (trainer/dashboards.py)
    # lm-evaluation-harness tasks scored at the run's start and end (trainer/downstream.py)
    downstream_tasks: tuple[str, ...] = _flag((), resume=Resume.MAY_CHANGE)
    downstream_include: Path | None = _flag(None, resume=Resume.MAY_CHANGE)  # a folder of one's own task YAMLs
    downstream_limit: int | None = _flag(None, resume=Resume.MAY_CHANGE)  # documents per task (None: all)


@dataclass(frozen=True)
class FlagPolicy:
    """One leaf field of TrainConfig, dotted through the nested configs (e.g. "data.seq_len"), with its policy."""

    path: str
    flag: str
    resume: Resume
    service: str | None
    default: Any

    @property
    def dest(self) -> str:
        """The argparse attribute of the flag."""
        return self.flag[2:].replace("-", "_")


def _default(f: Field) -> Any:
    if f.default is not MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not MISSING else None


def _policies(cls: type, prefix: str = "", flags: Mapping[str, str] | None = None) -> Iterator[FlagPolicy]:
    """The policy of every leaf field of `cls`, in field order; `flags`: flags a nesting field names for them."""
    types = get_type_hints(cls)
    for f in fields(cls):
        if is_dataclass(types[f.name]):
            yield from _policies(types[f.name], f"{prefix}{f.name}.", f.metadata.get("flags"))
            continue
        flag = f.metadata.get("flag") or (flags or {}).get(f.name) or "--" + f.name.replace("_", "-")
        yield FlagPolicy(prefix + f.name, flag, f.metadata.get("resume", Resume.SAME), f.metadata.get("service"),
                         _default(f))


POLICIES: tuple[FlagPolicy, ...] = tuple(_policies(TrainConfig))
_BY_PATH = {policy.path: policy for policy in POLICIES}
RESUMABLE_FLAGS = tuple(dict.fromkeys(p.flag for p in POLICIES if p.resume is Resume.MAY_CHANGE))


def flag_of(path: str) -> str:
    """The CLI flag of a dotted TrainConfig field, e.g. "data.seq_len" -> "--seq-len"."""
    return _BY_PATH[path].flag


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return str(value) if isinstance(value, Path) else value


def config_record(config: TrainConfig) -> dict[str, Any]:
    """The config as plain JSON-able values (paths as strings, tuples as lists): what checkpoints store."""
    return _jsonable(asdict(config))


def resume_differences(recorded: Mapping[str, Any], config: TrainConfig) -> list[tuple[str, Any, Any]]:
    """(flag, checkpoint's value, given value) for each flag that defines the run and differs from the
    `config_record` a checkpoint stored. A value the checkpoint lacks reads as the field's default: a flag
    added after the checkpoint was written did then what its default does now (e.g. no --fsdp)."""
    differences = []
    for policy in POLICIES:
        if policy.resume is not Resume.SAME:
            continue
        value: Any = config
        stored: Any = recorded
        for part in policy.path.split("."):
            value = getattr(value, part)
            stored = stored.get(part, MISSING) if isinstance(stored, Mapping) else MISSING
        stored = _jsonable(policy.default) if stored is MISSING else stored
        if stored != _jsonable(value):
            differences.append((policy.flag, stored, _jsonable(value)))
    return differences


# What only starting a run may say, with how many values each takes (none for a switch).
_NOT_ON_RESUME = {p.flag: 0 if isinstance(p.default, bool) else 1 for p in POLICIES if p.resume is Resume.START_ONLY}


def resume_command(argv: Sequence[str]) -> list[str]:
    """The flags that resume the run `argv` started (or resumed): the same ones, with --resume, and without
    those that only start a run (--init-from, --overwrite). The parser takes no abbreviations, so every flag
    in `argv` is spelt as it is here."""
    kept: list[str] = []
    skip = 0
    for token in argv:
        if skip:
            skip -= 1
            continue
        name, attached, _ = token.partition("=")
        if name in _NOT_ON_RESUME:
            skip = 0 if attached else _NOT_ON_RESUME[name]
            continue
        kept.append(token)
    return kept if "--resume" in kept else [*kept, "--resume"]


def build_parser() -> argparse.ArgumentParser:
    """Every flag with its help and default. Abbreviations are off: a resume command is rebuilt from the
    flags as typed (`resume_command`), and one spelling per flag keeps the CLIs' names comparable."""
    p = argparse.ArgumentParser(
        prog="python -m trainer",
        description="Continue (or start) pretraining a causal LM on a replay-mixed token stream.",
        allow_abbrev=False,
        epilog="Steps count optimizer updates: step s is the state after s updates, and the update from s to s+1 "
               "trains on the batch a mixer serves as its step s. metrics.jsonl records each update at the step it "
               "reached (with the batch_step it trained on), each evaluation at the step it measured, and "
               "checkpoints/step-NNNNNN.pt the state at step NNNNNN. SIGINT or SIGTERM (Ctrl-C) ends the "
               "current step, checkpoints, prints the command that resumes the run, and exits 130 or 143.",
    )
    src = p.add_argument_group("data (give --dataset for in-process mixing, or --stream for a mixer service)")
    src.add_argument("--dataset", action="append", default=[], metavar="NAME=PATH",
                     help="a token dataset (from `python -m pipeline.tokenize`) to mix in-process; repeat for each "
                          "(default: none; give this or --stream)")
    src.add_argument("--weights", type=lambda text: number_list(text, "--weights"), metavar="NAME=W,...",
                     help="in-process mixing weights, one per --dataset name (default: equal); with --stream the "
                          "service's schedule decides them")
    src.add_argument("--stream", metavar="URL[,URL...]",
                     help="pull batches from a mixer service (`python -m service`) instead (default: none); several "
                          "URLs (its replicas, or with --compute local its owner and standbys): the next when one fails")
    src.add_argument("--stream-token-file", type=Path, metavar="PATH",
                     help="with --stream: file holding the service's read token (its --read-token-file); omit it only "
                          "for a service started with --allow-anonymous-reads (default: none)")
    src.add_argument("--stream-read-ahead", type=int, metavar="STEPS",
                     help="with --stream: fetch STEPS steps per request and keep STEPS ready, so about 3 x STEPS "
                          "are served ahead of training (default: ~4 MiB per request); small values make a ratio "
                          "change without start_step land sooner")
    src.add_argument("--compute", choices=COMPUTE_MODES, default=DataConfig.stream_compute,
                     help="with --stream: who computes this rank's rows. service: the service sends them over HTTP; "
                          "local: this process reads the service's datasets itself (storage every node reads, a "
                          "read token) under leases from the service, so only the schedule crosses the network; "
                          "the same bytes either way (default %(default)s)")
    src.add_argument("--seq-len", type=int, metavar="TOKENS",
                     help=f"tokens per training sequence (default {DataConfig.seq_len}); with --stream the service "
                          "decides it")
    src.add_argument("--global-batch", type=int, metavar="SEQUENCES",
                     help=f"sequences per step over all ranks (default {DataConfig.global_batch}); with --stream the "
                          "service decides it")
    src.add_argument("--micro-batch", type=int, default=DataConfig.micro_batch, metavar="SEQUENCES",
                     help="sequences per forward pass on one rank; a rank's share of the global batch must be a "
                          "multiple of it, and the passes of one step accumulate gradients (default %(default)s)")
    src.add_argument("--data-seed", type=int, metavar="SEED",
                     help=f"the in-process mixer's seed: which samples make each batch (default {DataConfig.seed}); "
                          "with --stream the service's --seed decides it")
    src.add_argument("--eval-dataset", action="append", default=[], metavar="NAME=PATH",
                     help="a validation set, scored on its val split; repeat for each (default: the val splits of the "
                          "training datasets)")
    src.add_argument("--eval-batches", type=int, default=DataConfig.eval_batches, metavar="N",
                     help="micro-batches of each validation set per evaluation (default %(default)s)")

    model = p.add_argument_group("model")
    model.add_argument("--model", choices=list(MODEL_SIZES),
                       help=f"size of a Llama made afresh (transformers' LlamaForCausalLM; default {TrainConfig.model}); "
                            "not with --init-from hf:PATH")
    model.add_argument("--untied", action="store_true",
                       help="separate input and output embeddings (default: tied)")
    model.add_argument("--init-from", metavar="CKPT|hf:PATH",
                       help="start from a trainer checkpoint's weights and optimizer state, or (hf:PATH) from a "
                            "Hugging Face causal LM folder saved by save_pretrained (Llama, Mistral, Qwen2 or "
                            "GPT-NeoX family; a Hub id where a network exists) with its tokenizer. Steps restart at "
                            "0; the schedule is this run's own unless --continue-schedule (default: a fresh --model)")
    model.add_argument("--dtype", choices=list(DTYPES), default=TrainConfig.dtype,
                       help="dtype of the weights and optimizer state; float32 trains under bf16 autocast on CUDA, "
                            "bfloat16 halves the memory (default %(default)s)")
    model.add_argument("--save-hf", type=Path, metavar="DIR",
                       help="with --init-from hf:PATH (or a checkpoint of such a run): write the trained model as a "
                            "Hugging Face folder (safetensors, config, generation config, tokenizer) here at the "
                            "end of the run (default: RUN_DIR/hf)")
    model.add_argument("--reset-optimizer", action="store_true",
                       help="with --init-from: fresh AdamW state (default: the checkpoint's)")
    model.add_argument("--extension-report", type=Path, metavar="PATH",
                       help="extended.report.json from `pipeline.tokenizer extend`, to grow the embeddings to an "
                            "extended tokenizer; for a Hugging Face model the extension_report.json inside the "
                            "extended tokenizer folder, which becomes the run's tokenizer (default: none, the "
                            "vocabulary stays)")
    model.add_argument("--grow", metavar="blocks:N|experts:E,top_k:K",
                       help="with --init-from: grow the model before the first step so that it computes what it did. "
                            "blocks:N inserts N identity blocks as LLaMA Pro (one after every layers/N-th layer, N "
                            "dividing the layers); experts:E,top_k:K upcycles every MLP of a Llama or Mistral into E "
                            "copies behind a router (a Mixtral). The optimizer starts afresh; the checkpoints record "
                            "the growth, and --resume gives --grow again (default: no growth)")
    model.add_argument("--train", choices=TRAIN_MODES, default=TrainConfig.train,
                       help="which parameters train: all, or new-blocks, only the blocks --grow blocks:N inserts and "
                            "the embedding rows of the tokens --extension-report adds (default %(default)s)")

    docs = p.add_argument_group("documents in a packed row (trainer/document_mask.py)")
    docs.add_argument("--document-masking", action="store_true",
                      help="keep the documents of a row apart: positions restart at 0 and attention stays inside "
                           "each document, found from the row's EOS tokens (transformers' packed-sequence path; "
                           "a row of one document computes as without it). Costs the causal kernel's fast path "
                           "(see benchmarks/README.md). Off by default: a continued model keeps the attention it "
                           "was pretrained with unless you know it was pretrained with document masking (Llama 3 "
                           "was, Llama 2 was not) (default: causal over the whole row)")
    docs.add_argument("--eod-mask-loss", action="store_true",
                      help="do not train the prediction made at an EOS, the next document's first token (Megatron's "
                           "eod_mask_loss); metrics.jsonl says so on every record (default: every token is trained)")
    docs.add_argument("--attention", choices=("sdpa", "eager", "flex_attention", "flash_attention_2"),
                      default=TrainConfig.attention,
                      help="transformers' attention implementation; flex_attention trains only on a GPU, "
                           "flash_attention_2 needs the flash-attn package and cannot take --document-masking "
                           "(default %(default)s)")

    opt = p.add_argument_group("optimisation")
    opt.add_argument("--steps", type=int, default=TrainConfig.steps,
                     help="optimizer updates in the whole run (default %(default)s)")
    # The schedule flags default to None so that --continue-schedule can tell which were given.
    opt.add_argument("--lr-schedule", choices=SCHEDULES,
                     help=f"learning-rate schedule (default {ScheduleConfig.name})")
    opt.add_argument("--max-lr", type=float, metavar="LR", help=f"peak learning rate (default {ScheduleConfig.max_lr})")
    opt.add_argument("--min-lr", type=float, metavar="LR",
                     help=f"final learning rate (default {ScheduleConfig.min_lr})")
    opt.add_argument("--const-lr", type=float, metavar="LR",
                     help="infinite schedule's constant rate (default (max+min)/2)")
    opt.add_argument("--warmup-steps", type=int, metavar="STEPS",
                     help="linear warmup to --max-lr (default 1%% of --steps)")
    opt.add_argument("--cooldown-steps", type=int, metavar="STEPS",
                     help="infinite: max->const steps after warmup (default 59%% of --steps)")
    opt.add_argument("--decay-steps", type=int, metavar="STEPS",
                     help="infinite anneal (default 15%% of --steps) or WSD cooldown (20%%); with "
                          "--continue-schedule, the length of this run's final decay (default: the checkpoint's)")
    opt.add_argument("--cooldown-shape", choices=("cosine", "inv_sqrt"),
                     help=f"infinite schedule's cooldown curve (default {ScheduleConfig.cooldown_shape})")
    opt.add_argument("--continue-schedule", action="store_true",
                     help="with --init-from: no re-warming; follow the schedule recorded in the checkpoint from the "
                          "step it was saved at (an infinite schedule's constant rate, or WSD's stable one), with "
                          "its final decay moved to the end of this run. Other schedule flags than --decay-steps "
                          "are refused with it (default: a fresh schedule)")
    opt.add_argument("--lr-start-step", type=int, help=argparse.SUPPRESS)  # only to point old command lines to --continue-schedule
    opt.add_argument("--weight-decay", type=float, default=OptimConfig.weight_decay, metavar="DECAY",
                     help="AdamW weight decay of the matrices (default %(default)s)")
    opt.add_argument("--grad-clip", type=float, default=OptimConfig.grad_clip, metavar="NORM",
                     help="clip the global gradient norm to NORM (default %(default)s)")

    run = p.add_argument_group("run")
    run.add_argument("--out", type=Path, required=True, metavar="RUN_DIR",
                     help="the run's folder: metrics.jsonl and checkpoints/ (required; one that holds an earlier run "
                          "needs --resume or --overwrite)")
    run.add_argument("--resume", action="store_true",
                     help="continue from RUN_DIR's latest checkpoint, on the schedule it recorded. Give the flags the "
                          "run started with: any difference is refused, except in "
                          f"{', '.join(RESUMABLE_FLAGS)}, which may change (and --extension-report and "
                          "--reset-optimizer, which a resumed run ignores; default: start a run)")
    run.add_argument("--overwrite", action="store_true",
                     help="start afresh in a RUN_DIR that holds an earlier run, deleting its metrics.jsonl and "
                          "checkpoints/ (default: such a RUN_DIR is refused)")
    run.add_argument("--eval-every", type=int, default=TrainConfig.eval_every, metavar="STEPS",
                     help="evaluate every STEPS steps, and at step 0 and the last; 0: no evaluation, said once at "
                          "the start (default %(default)s)")
    run.add_argument("--log-every", type=int, default=TrainConfig.log_every, metavar="STEPS",
                     help="write a train record to metrics.jsonl every STEPS steps, and at the last (default "
                          "%(default)s)")
    run.add_argument("--checkpoint-every", type=int, default=TrainConfig.checkpoint_every, metavar="STEPS",
                     help="rewrite checkpoints/latest.pt every STEPS steps, and at the last (default %(default)s)")
    run.add_argument("--save-at", type=int, action="append", default=[], metavar="STEP",
                     help="also keep checkpoints/step-NNNNNN.pt of this step, e.g. before the anneal; repeat for "
                          "each (default: none)")
    run.add_argument("--seed", type=int, default=TrainConfig.seed,
                     help="seed of the model's initialisation (default %(default)s)")
    run.add_argument("--device", choices=("cpu", "cuda"), default=TrainConfig.device,
                     help="where to train; cuda needs a CUDA build of torch and a visible GPU (default %(default)s)")
    run.add_argument("--compile", action="store_true", help="torch.compile the model (default: eager)")
    run.add_argument("--fsdp", action="store_true",
                     help="under torchrun (2+ ranks): shard the weights, gradients and AdamW state over the ranks "
                          "(FSDP2), for a model that does not fit one device with its optimizer state; "
                          "checkpoints become folders of shards (checkpoints/latest.dcp/), resumed with --fsdp "
                          "(default: DDP, every rank holds the whole model)")
    run.add_argument("--activation-checkpointing", action="store_true",
                     help="keep only each decoder block's input for the backward pass and recompute the rest there "
                          "(with or without --fsdp): activation memory of one block instead of all, for about one "
                          "more forward pass per step (x1.16 step time, x0.49 activations at 125m on the CPU; "
                          "benchmarks/README.md); the same losses "
                          "(default: keep every activation)")
    run.add_argument("--log-to", action="append", default=[], metavar="tensorboard,wandb",
                     help="also chart every metrics.jsonl record, the replay share in force at each step and (with "
                          "--stream) the service's mix changes: TensorBoard event files in RUN_DIR/tensorboard, "
                          "W&B offline files in RUN_DIR/wandb (WANDB_MODE=online to upload); needs the dashboards "
                          "extra (default: metrics.jsonl only)")
    run.add_argument("--downstream-tasks", action="append", default=[], metavar="T1,T2",
                     help="with a Hugging Face model: score these lm-evaluation-harness tasks (multiple_choice or "
                          "loglikelihood) at the run's start and end, on rank 0; metrics.jsonl and trainer.report "
                          "give each task's change. Needs the downstream extra; not with --fsdp (default: none)")
    run.add_argument("--downstream-include", type=Path, metavar="DIR",
                     help="a folder of your own harness task YAML files (default: the harness's own tasks only)")
    run.add_argument("--downstream-limit", type=int, metavar="N",
                     help="score only the first N documents of each downstream task (default: all)")
    run.add_argument("--no-progress", action="store_true",
                     help="no progress bar: one line per evaluation and a summary at the end (default: a bar)")
    return p


def parse_args(argv: Sequence[str] | None = None) -> TrainConfig:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        datasets = name_values(args.dataset, "--dataset", "PATH")
        eval_datasets = name_values(args.eval_dataset, "--eval-dataset", "PATH")
    except argparse.ArgumentTypeError as e:
        parser.error(str(e))
    if bool(datasets) == bool(args.stream):
        parser.error("give either --dataset NAME=PATH (one or more) or --stream URL, not both or neither")
    if args.stream:
        # Left unset unless given, so that a value the service would silently override is refused instead.
        given = [p for p in POLICIES if p.service is not None and getattr(args, p.dest) is not None]
        if given:
            parser.error(f"{', '.join(p.flag for p in given)}: with --stream the mixer service decides these (its "
                         f"{', '.join(p.service for p in given)}); drop them here")
    if args.weights and datasets:
        try:
            check_weight_names(args.weights, datasets, "--weights")
        except ScheduleError as e:
            parser.error(str(e))
    if args.stream_token_file is not None and not args.stream:
        parser.error("--stream-token-file needs --stream")
    if args.compute != DataConfig.stream_compute and not args.stream:
        parser.error(f"--compute {args.compute} needs --stream: in-process mixing (--dataset) computes here anyway")
    if args.stream_read_ahead is not None and (not args.stream or args.stream_read_ahead < 1):
        parser.error("--stream-read-ahead needs --stream and a positive number of steps")
    hf_model = args.init_from[len(HF_PREFIX):] if args.init_from and args.init_from.startswith(HF_PREFIX) else None
    if args.init_from == HF_PREFIX:
        parser.error("--init-from hf:PATH: give the Hugging Face folder after hf:")
    if hf_model and args.model:
        parser.error("--model sizes a fresh model; --init-from hf:PATH trains the model in PATH; pick one")
    if hf_model and args.untied:
        parser.error("--untied: a Hugging Face model's config decides whether its embeddings are tied; drop it")
    if args.save_hf and not (hf_model or args.init_from or args.resume):
        parser.error("--save-hf writes a Hugging Face model: start from one with --init-from hf:PATH")
    if args.resume and args.init_from:
        parser.error("--resume continues this run; --init-from starts a new one from a checkpoint; pick one")
    if args.resume and args.overwrite:
        parser.error("--resume continues the run in --out; --overwrite deletes it to start afresh; pick one")
    grow = None
    if args.grow is not None:
        try:
            grow = GrowSpec.parse(args.grow)
        except GrowthError as e:
            parser.error(str(e))
        if not (args.init_from or args.resume):
            parser.error("--grow grows the model a run continues: give --init-from CKPT|hf:PATH")
    if args.train == "new-blocks" and (grow is None or grow.kind != "blocks"):
        parser.error("--train new-blocks needs --grow blocks:N: it trains the blocks that inserts")
    if args.train == "new-blocks" and args.fsdp:
        parser.error("--train new-blocks is not supported with --fsdp yet (the new tokens' rows are held by a "
                     "gradient hook FSDP's sharded parameters do not run); use --train all, or DDP")
    if args.document_masking:
        try:
            check_attention(args.attention)
        except TrainerError as e:
            parser.error(str(e))
    try:
        log_to = parse_loggers(",".join(args.log_to)) if args.log_to else ()
    except TrainerError as e:
        parser.error(str(e))
    downstream_tasks = tuple(task.strip() for text in args.downstream_tasks for task in text.split(",") if task.strip())
    if (args.downstream_include or args.downstream_limit) and not downstream_tasks:
        parser.error("--downstream-include and --downstream-limit need --downstream-tasks")
    if args.downstream_tasks and args.fsdp:
        parser.error("--downstream-tasks is not supported with --fsdp yet (rank 0 alone scores the tasks, and a "
                     "sharded model needs every rank); score RUN_DIR/hf afterwards with python -m trainer.downstream")
    if args.lr_start_step is not None:
        parser.error("--lr-start-step was replaced by --continue-schedule, which takes the step and the whole "
                     "schedule from the --init-from checkpoint")
    schedule_flags = [p for p in POLICIES if p.path.startswith("schedule.") and p.path != "schedule.continued"]
    schedule = {p.path.partition(".")[2]: getattr(args, p.dest)
                for p in schedule_flags if getattr(args, p.dest) is not None}
    if args.continue_schedule:
        if not ((args.init_from and not hf_model) or args.resume):
            parser.error("--continue-schedule continues the schedule of a trainer checkpoint; give it with "
                         "--init-from CKPT (a Hugging Face folder records no schedule)")
        conflicting = [flag_of(f"schedule.{name}") for name in schedule if name != "decay_steps"]
        if conflicting:
            parser.error(f"--continue-schedule follows the checkpoint's recorded schedule, which {', '.join(conflicting)} "
                         "would contradict; drop them (only --decay-steps, this run's final decay, may be given)")
    data = DataConfig(
        datasets=datasets,
        weights=args.weights or {name: 1.0 for name in datasets},
        stream_url=args.stream,
        stream_read_ahead=args.stream_read_ahead,
        stream_token_file=args.stream_token_file,
        stream_compute=args.compute,
        seq_len=DataConfig.seq_len if args.seq_len is None else args.seq_len,
        global_batch=DataConfig.global_batch if args.global_batch is None else args.global_batch,
        micro_batch=args.micro_batch,
        seed=DataConfig.seed if args.data_seed is None else args.data_seed,
        eval_datasets=eval_datasets,
        eval_batches=args.eval_batches,
    )
    # With --stream the service's global batch is checked against --micro-batch once it is known.
    if not args.stream and data.global_batch % data.micro_batch:
        parser.error(f"--global-batch {data.global_batch} is not a multiple of --micro-batch {data.micro_batch}")
    for flag, value in (("--steps", args.steps), ("--seq-len", data.seq_len), ("--micro-batch", data.micro_batch),
                        ("--log-every", args.log_every), ("--checkpoint-every", args.checkpoint_every),
                        ("--eval-batches", args.eval_batches)):
        if value <= 0:
            parser.error(f"{flag} must be positive, got {value}")
    if args.eval_every < 0:
        parser.error(f"--eval-every must be positive, or 0 for no evaluation, got {args.eval_every}")
    return TrainConfig(
        out=args.out,
        data=data,
        schedule=ScheduleConfig(**schedule, continued=args.continue_schedule),
        optim=OptimConfig(weight_decay=args.weight_decay, grad_clip=args.grad_clip),
        model=args.model or TrainConfig.model,
        untied=args.untied,
        steps=args.steps,
        eval_every=args.eval_every,
        log_every=args.log_every,
        checkpoint_every=args.checkpoint_every,
        save_at=tuple(sorted(set(args.save_at))),
        init_from=Path(args.init_from) if args.init_from and not hf_model else None,
        hf_model=hf_model,
        dtype=args.dtype,
        save_hf=args.save_hf,
        reset_optimizer=args.reset_optimizer,
        extension_report=args.extension_report,
        resume=args.resume,
        overwrite=args.overwrite,
        seed=args.seed,
        device=args.device,
        compile=args.compile,
        progress=not args.no_progress,
        fsdp=args.fsdp,
        grow=None if grow is None else str(grow),
        train=args.train,
        document_masking=args.document_masking,
        eod_mask_loss=args.eod_mask_loss,
        attention=args.attention,
        activation_checkpointing=args.activation_checkpointing,
        log_to=log_to,
        downstream_tasks=downstream_tasks,
        downstream_include=args.downstream_include,
        downstream_limit=args.downstream_limit,
    )
