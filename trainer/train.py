"""The training loop: one rank's view of a (possibly DDP) run, from a fresh model, a checkpoint to
continue from (--init-from), or this run's own latest checkpoint (--resume).

Per step: fetch this rank's rows, split them into micro-batches (gradient accumulation, with DDP's
all-reduce only on the last), clip, step AdamW at the schedule's rate. Rank 0 writes metrics.jsonl
and checkpoints. Under torchrun, RANK/WORLD_SIZE/LOCAL_RANK select the rank.

Steps count updates done: the loop's update from step s to s + 1 trains on the batch the mixer serves as
step s, and is logged, evaluated and checkpointed as step s + 1 (see trainer/metrics_log.py).
"""

from __future__ import annotations

import contextlib
import math
import os
from contextlib import closing
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm import tqdm

from pipeline.tokenizer.report import ExtensionReport, ExtensionReportError
from service.wire import Batch
from trainer.checkpoint import (
    CHECKPOINT_DIR,
    FINAL,
    LATEST,
    TOKENIZER_DIR,
    CheckpointError,
    is_sharded_checkpoint,
    latest_checkpoint,
    load_checkpoint,
    named_checkpoint,
    restore_rng,
    save_checkpoint,
    trainer_state,
)
from trainer.data import BatchSource, on_device, open_eval_splits, open_source
from trainer.embedding_growth import grow_vocab, pad_optimizer_state
from trainer.evaluate import Evaluator, eval_record
from trainer.fsdp import (
    full_model_state,
    full_optimizer_state,
    global_value,
    load_full_optimizer_state,
    load_sharded,
    require_world,
    save_sharded,
    shard_model,
    sharded_name,
)
from trainer.hf_model import (
    DTYPES,
    HFCausalLM,
    check_save_dir,
    copy_tokenizer,
    from_record,
    is_hf_record,
    load_hf_model,
    prepare_vocabulary,
    resolve_folder,
    save_hf,
)
from trainer.lr_schedules import RunSchedule, build_schedule, continue_schedule
from trainer.errors import TrainerError
from trainer.metrics_log import METRICS_NAME, MetricsLog, read_metrics
from trainer.model import fresh_model
from trainer.run_dir import check_run_dir, delete_earlier_run
from trainer.stop_request import RunStopped, StopRequest
from trainer.train_config import RESUMABLE_FLAGS, TrainConfig, config_record, resume_differences

StepHook = Callable[[int, nn.Module, Batch], None]
# (step, path of checkpoints/latest.pt or latest.dcp/): called on every rank once a latest checkpoint is written.
CheckpointHook = Callable[[int, Path], None]


@dataclass(frozen=True)
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def require_device(kind: str) -> None:
    """Refuse --device cuda where torch sees no CUDA device, before anything starts (torch would fail later,
    deep in setting the device, with an AttributeError that names neither the flag nor the fix)."""
    if kind != "cuda" or torch.cuda.is_available():
        return
    if torch.version.cuda is None:
        why = (f"this torch ({torch.__version__}) is a CPU-only build; install a CUDA build of torch into this "
               "environment (see https://pytorch.org/get-started/locally/)")
    else:
        why = (f"torch {torch.__version__} is built for CUDA {torch.version.cuda} but sees no GPU; check nvidia-smi, "
               "the driver and CUDA_VISIBLE_DEVICES")
    raise TrainerError(f"--device cuda: no CUDA device is available: {why}; or train on the CPU with --device cpu")


def hf_export_dir(config: TrainConfig) -> Path:
    """Where a Hugging Face model is written at the end of the run: --save-hf, or RUN_DIR/hf."""
    return config.save_hf or config.out / "hf"


def require_dtype(dtype: str, device: str) -> None:
    """Refuse, before anything starts, weights in a dtype this device (or this trainer) cannot train in."""
    if dtype == "float16":
        raise TrainerError("--dtype float16: float16 weights overflow without loss scaling, which this trainer does "
                           "not do; use --dtype bfloat16 (or float32, which trains under bf16 autocast on CUDA)")
    if dtype == "bfloat16" and device == "cuda" and not torch.cuda.is_bf16_supported():
        raise TrainerError(f"--dtype bfloat16: this GPU ({torch.cuda.get_device_name()}) has no bfloat16 support "
                           "(it needs compute capability 8.0, Ampere, or newer); use --dtype float32")


def cast_parameters(model: nn.Module, dtype: torch.dtype) -> None:
    """Weights to `dtype`, buffers as they are (rotary tables keep their float32 precision)."""
    for param in model.parameters():
        param.data = param.data.to(dtype)


def init_distributed(device: str) -> Distributed:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Distributed()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device == "cuda" else "gloo")
    return Distributed(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


@dataclass
class TrainingState:
    model: HFCausalLM
    optimizer: torch.optim.Optimizer
    schedule: RunSchedule
    start_step: int
    first_eval: dict[str, float] | None
    tokenizer_dir: Path | None = None  # a Hugging Face model's tokenizer: what --save-hf writes beside it


def _make_optimizer(model: HFCausalLM, config: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    return torch.optim.AdamW(
        model.optimizer_groups(config.optim.weight_decay),
        lr=0.0,  # set from the schedule before every step
        betas=(config.optim.beta1, config.optim.beta2),
        fused=device.type == "cuda",
    )


def _load_optimizer(optimizer: torch.optim.Optimizer, state: dict, config: TrainConfig) -> None:
    optimizer.load_state_dict(state)
    pad_optimizer_state(optimizer)
    # The checkpoint's hyperparameters came along with its state; this run's flags decide them.
    for group, weight_decay in zip(optimizer.param_groups, (config.optim.weight_decay, 0.0)):
        group["weight_decay"] = weight_decay
        group["betas"] = (config.optim.beta1, config.optim.beta2)


def build_state(config: TrainConfig, source: BatchSource, device: torch.device, world_size: int = 1) -> TrainingState:
    """A fresh model, a continued one (--init-from: own step count, maybe grown vocabulary), or a resumed one;
    with --fsdp sharded over the `world_size` ranks."""
    resume_path = latest_checkpoint(config.out) if config.resume else None  # there: check_run_dir made sure
    payload = load_checkpoint(resume_path or config.init_from) if (resume_path or config.init_from) else None
    where = resume_path or config.init_from
    sharded = where is not None and is_sharded_checkpoint(where)
    if sharded and not (config.fsdp and resume_path is not None):
        # Only a sharded model can take the shards; a new run from one needs the whole model first.
        raise CheckpointError(
            f"{where}: a sharded checkpoint (an --fsdp run's); resume that run with --fsdp under torchrun"
            if resume_path is not None else
            f"{where}: a sharded checkpoint (an --fsdp run's), which --init-from cannot start a new run from; "
            "resume its run instead, or start from its Hugging Face folder (--init-from hf:RUN_DIR/hf)")
    if resume_path is not None:
        _check_resumable(resume_path, payload, config)

    model, tokenizer_dir = _build_model(config, payload, where, resume_path is not None, source)
    if config.save_hf is not None and tokenizer_dir is None:
        raise TrainerError(f"--save-hf {config.save_hf}: a Hugging Face folder holds the model's tokenizer, and a "
                           "model made afresh with --model has none (its vocabulary is its data's ids); start from "
                           "a Hugging Face folder with --init-from hf:PATH, or drop --save-hf")
    cast_parameters(model, DTYPES[config.dtype])
    optimizer_state = None if payload is None or (config.init_from and config.reset_optimizer) else payload.get("optimizer")
    if config.fsdp:
        model, optimizer = _sharded(model, optimizer_state, config, device, world_size)
        if sharded:
            load_sharded(where, model, optimizer)
    else:
        model.to(device)
        optimizer = _make_optimizer(model, config, device)
        if optimizer_state is not None:
            _load_optimizer(optimizer, optimizer_state, config)
    schedule = _schedule(config, payload, resume_path or config.init_from, resumed=resume_path is not None)
    if resume_path is not None:
        restore_rng(payload["rng"])
        return TrainingState(model, optimizer, schedule, payload["step"], payload.get("first_eval"), tokenizer_dir)
    return TrainingState(model, optimizer, schedule, 0, None, tokenizer_dir)


def _sharded(model: HFCausalLM, optimizer_state: dict | None, config: TrainConfig, device: torch.device,
             world_size: int) -> tuple[HFCausalLM, torch.optim.Optimizer]:
    """--fsdp: the whole model sharded over the ranks, with an optimizer over its shards holding their part of
    a `.pt` checkpoint's optimizer state (loaded as a plain run loads it, then handed over by name)."""
    full_state = None
    if optimizer_state is not None:
        plain = _make_optimizer(model, config, torch.device("cpu"))
        _load_optimizer(plain, optimizer_state, config)
        full_state = full_optimizer_state(model, plain)
    shard_model(model, device, world_size)
    optimizer = _make_optimizer(model, config, device)
    if full_state is not None:
        load_full_optimizer_state(model, optimizer, full_state)
    return model, optimizer


def _build_model(config: TrainConfig, payload: dict[str, Any] | None, where: Path | None, resumed: bool,
                 source: BatchSource) -> tuple[HFCausalLM, Path | None]:
    """The model to train, its vocabulary grown to --extension-report's and checked against the data's,
    and the folder of the tokenizer it trains with: a Hugging Face folder's own (or its extension), carried
    into the run's checkpoints; None for a fresh model, which trains on whatever ids its data has."""
    if payload is None and config.hf_model is None:
        torch.manual_seed(config.seed)
        return fresh_model(config.model, source.vocab_size, source.seq_len, tie_embeddings=not config.untied), None
    if payload is not None and not is_hf_record(payload["model_config"]):
        raise CheckpointError(f"{where}: a checkpoint of the trainer's former own GPT, which this trainer no longer "
                              "builds (a fresh model is a transformers Llama now); start a new run with --model SIZE")
    if payload is None or (where.parent / TOKENIZER_DIR).is_dir():
        return _build_hf_model(config, payload, where, resumed, source)
    model = from_record(payload["model_config"])  # a fresh model's checkpoint: its vocabulary is its data's
    if "model" in payload:  # else a sharded checkpoint's shards come once the model is sharded
        model.load_state_dict(payload["model"])
    rows = model.config.vocab_size
    if config.extension_report is not None and rows != source.vocab_size:
        report = ExtensionReport.load(config.extension_report)
        if report.base_vocab_size != rows:
            raise ExtensionReportError(
                f"{config.extension_report}: base.vocab_size is {report.base_vocab_size} but the checkpoint's model "
                f"has {rows}; pass the report of the tokenizer extension made from this model's tokenizer")
        grow_vocab(model, report)
    if model.config.vocab_size != source.vocab_size:
        hint = ("pass --extension-report extended.report.json from `pipeline.tokenizer extend`"
                if model.config.vocab_size < source.vocab_size
                else "train on data made with the checkpoint's tokenizer (or an extension of it)")
        raise CheckpointError(
            f"{where}: the model's vocabulary is {model.config.vocab_size} but the data's is {source.vocab_size}; {hint}")
    return model, None


def _build_hf_model(config: TrainConfig, payload: dict[str, Any] | None, where: Path | None, resumed: bool,
                    source: BatchSource) -> tuple[HFCausalLM, Path]:
    """A model that carries its tokenizer: --init-from hf:PATH, or a checkpoint of a run that started so."""
    if payload is None:
        folder = resolve_folder(config.hf_model)
        model, base_tokenizer = load_hf_model(str(folder), config.dtype), folder
        where = f"--init-from hf:{config.hf_model}"
    else:
        model = from_record(payload["model_config"])
        if "model" in payload:  # else a sharded checkpoint's shards come once the model is sharded
            model.load_state_dict(payload["model"])
        base_tokenizer = where.parent / TOKENIZER_DIR
    report = None if resumed else config.extension_report
    tokenizer_dir, tokenizer_size = prepare_vocabulary(model, base_tokenizer, report)
    # Fewer is fine: a tokenizer loaded with its model's config may add special tokens at the end (Qwen2's
    # <|endoftext|>), which leaves every id of the data meaning what it did.
    if source.vocab_size > tokenizer_size:
        raise CheckpointError(f"{where}: the data's vocabulary is {source.vocab_size} but the model's tokenizer "
                              f"({tokenizer_dir}) has {tokenizer_size} pieces; the data was made with another "
                              "tokenizer: pass --extension-report DIR/extension_report.json of the extended "
                              "tokenizer it was made with, or tokenize it with the model's tokenizer")
    return model, tokenizer_dir


def _check_resumable(path: Path, payload: dict[str, Any], config: TrainConfig) -> None:
    """Refuse to resume with flags that would make it another run than the one checkpointed."""
    differences = resume_differences(payload.get("run_config", {}), config)
    if differences:
        listed = "".join(f"\n  {flag}: checkpoint {stored!r}, given {given!r}" for flag, stored, given in differences)
        raise CheckpointError(
            f"{path}: --resume continues the run as it was started, but these flags differ from the ones its "
            f"checkpoint recorded:{listed}\ngive the checkpoint's values (only {', '.join(RESUMABLE_FLAGS)} may "
            "change on resume), or start a new run in another --out"
        )


def _schedule(config: TrainConfig, payload: dict[str, Any] | None, path: Path | None, resumed: bool) -> RunSchedule:
    """A resumed run follows the schedule its checkpoint recorded, a --continue-schedule run the --init-from
    checkpoint's, continued; any other run builds its own from the flags."""
    if not (resumed or config.schedule.continued):
        return RunSchedule(build_schedule(config.schedule, config.steps))
    if payload.get("schedule") is None:
        raise CheckpointError(
            f"{path}: records no learning-rate schedule (an older trainer wrote it); start a new run from it "
            "with --init-from and this run's own schedule flags"
        )
    recorded = RunSchedule.from_record(payload["schedule"])
    if resumed:
        return recorded
    try:
        return continue_schedule(recorded, payload["step"], config.steps, config.schedule.decay_steps)
    except ValueError as e:
        raise CheckpointError(f"{path}: cannot --continue-schedule: {e}") from e


def autocast_for(device: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
    """bf16 autocast on CUDA (weights and optimizer stay fp32); full precision on the CPU."""
    if device.type == "cuda":
        return lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext


def train_step(
    forward: nn.Module,
    optimizer: torch.optim.Optimizer,
    tokens: torch.Tensor,
    micro_batch: int,
    grad_clip: float,
    autocast: Callable[[], contextlib.AbstractContextManager],
) -> tuple[torch.Tensor, torch.Tensor]:
    """One update on this rank's rows: gradient accumulation over micro-batches (DDP all-reduces only on
    the last one), clipping, AdamW at the lr already set. Returns (mean loss, grad norm) as tensors, so
    nothing waits for the device here."""
    micro_batches = tokens.split(micro_batch)
    loss_sum = torch.zeros((), device=tokens.device)
    is_ddp = isinstance(forward, nn.parallel.DistributedDataParallel)
    for i, micro in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        with forward.no_sync() if is_ddp and not last else contextlib.nullcontext():
            with autocast():
                loss = forward(micro[:, :-1], micro[:, 1:]) / len(micro_batches)
            loss.backward()
        loss_sum += loss.detach()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    grad_norm = nn.utils.clip_grad_norm_(params, grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum, grad_norm


class StepStats:
    """Time and data wait accumulated between two log lines."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.started = time.perf_counter()
        self.data_wait = 0.0
        self.tokens = 0

    def record(self, wait: float, tokens: int) -> None:
        self.data_wait += wait
        self.tokens += tokens

    def summary(self) -> tuple[float, float]:
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        return self.tokens / elapsed, self.data_wait / elapsed


def train(config: TrainConfig, on_step: StepHook | None = None, on_checkpoint: CheckpointHook | None = None) -> HFCausalLM:
    """Run the training described by `config`; return the trained (unwrapped) model.

    `on_step(step, model, batch)` is called on every rank after each update (tests check DDP with it);
    `on_checkpoint(step, path)` on every rank after each latest checkpoint (the Ray launcher reports it).
    Raises RunStopped after the checkpoint a SIGINT or SIGTERM asked for.
    """
    require_device(config.device)
    require_dtype(config.dtype, config.device)
    check_run_dir(config.out, config.resume, config.overwrite)
    # The default RUN_DIR/hf is this run's own: --resume (or --overwrite) replaces it.
    check_save_dir(hf_export_dir(config), config.overwrite or (config.resume and config.save_hf is None))
    dist_info = init_distributed(config.device)
    if config.fsdp:
        require_world(dist_info.world_size)
    device = torch.device(f"cuda:{dist_info.local_rank}" if config.device == "cuda" else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    # From here a signal waits for the next step boundary, also one that comes while the data opens.
    with StopRequest(dist_info.world_size, device, announce=dist_info.is_main) as stop:
        source = open_source(config.data, dist_info.rank, dist_info.world_size)
        try:
            return _run(config, source, dist_info, device, on_step, on_checkpoint, stop)
        finally:
            source.close()


def _report_finished(config: TrainConfig, step: int) -> None:
    """--resume of a run already at (or past) its --steps: say so, and what is kept, instead of training nothing."""
    trained = [r for r in read_metrics(config.out) if r["kind"] == "train"]
    last = f", last train loss {trained[-1]['loss']:.4f} at step {trained[-1]['step']}" if trained else ""
    print(f"{config.out}: the run is finished: its checkpoint is at step {step} and --steps is {config.steps}, so "
          f"there is nothing to train. Kept as they were: {CHECKPOINT_DIR}/ and {METRICS_NAME}{last}. To train on, "
          f"start a new run from it (--init-from {config.out / CHECKPOINT_DIR / LATEST} --out ANOTHER_DIR), or "
          "resume with a larger --steps, which holds the recorded schedule's final rate", flush=True)


def _run(config: TrainConfig, source: BatchSource, dist_info: Distributed, device: torch.device,
         on_step: StepHook | None, on_checkpoint: CheckpointHook | None, stop: StopRequest) -> HFCausalLM:
    rows = source.global_batch // dist_info.world_size
    if source.global_batch % dist_info.world_size or rows % config.data.micro_batch:
        raise ValueError(
            f"global batch {source.global_batch} over {dist_info.world_size} ranks gives {rows} rows per rank, "
            f"which must be a whole multiple of --micro-batch {config.data.micro_batch}"
        )
    state = build_state(config, source, device, dist_info.world_size)
    model = state.model
    if state.start_step >= config.steps:
        if dist_info.is_main:
            _report_finished(config, state.start_step)
        return model
    evaluator = Evaluator(open_eval_splits(config.data, source), source.seq_len, config.data.eval_batches,
                          config.data.micro_batch, model.config.vocab_size, dist_info.rank, dist_info.world_size,
                          lockstep=config.fsdp)

    autocast = autocast_for(device)
    forward: nn.Module = torch.compile(model) if config.compile else model
    if dist_info.world_size > 1 and not config.fsdp:  # FSDP's own hooks reduce the gradients
        forward = nn.parallel.DistributedDataParallel(
            forward, device_ids=[device.index] if device.type == "cuda" else None
        )

    log = None
    if dist_info.is_main:
        if config.overwrite:  # only now that the run has started: a run that fails to start deletes nothing
            delete_earlier_run(config.out)
        log = MetricsLog(config.out, resume_step=state.start_step if config.resume else None)
    run_config = config_record(config)
    first_eval = state.first_eval
    last_loss = float("nan")
    saved_step = -1  # the step checkpoints/latest.pt was last written at

    def evaluate(step: int) -> None:
        nonlocal first_eval
        losses = evaluator(model, device, autocast)
        first_eval = first_eval or losses
        if log is not None:
            log.write(eval_record(step, losses, first_eval))
            source.report_losses(step, losses)
            # One line per evaluation, also without the bar: a long run shows how it goes.
            train_loss = "" if math.isnan(last_loss) else f"train loss {last_loss:.4f}, "
            tqdm.write(f"step {step}/{config.steps}: {train_loss}val loss "
                       + ", ".join(f"{name} {loss:.4f}" for name, loss in losses.items()), file=sys.stdout)

    def checkpoint(step: int, *names: str) -> None:
        nonlocal saved_step
        saved_step = step if LATEST in names else saved_step
        if dist_info.is_main:
            tokenizer_copy = config.out / CHECKPOINT_DIR / TOKENIZER_DIR
            if state.tokenizer_dir is not None and state.tokenizer_dir != tokenizer_copy:
                copy_tokenizer(state.tokenizer_dir, tokenizer_copy)  # before the checkpoint that needs it
                state.tokenizer_dir = tokenizer_copy
            for name in names if not config.fsdp else ():
                save_checkpoint(config.out / CHECKPOINT_DIR / name, model, state.optimizer, step, first_eval,
                                run_config, state.schedule.record())
        for name in names if config.fsdp else ():  # every rank writes its shards
            save_sharded(config.out / CHECKPOINT_DIR / sharded_name(name), model, state.optimizer,
                         trainer_state(model, step, first_eval, run_config, state.schedule.record()),
                         dist_info.is_main)
        if dist_info.world_size > 1:
            dist.barrier()
        if on_checkpoint is not None and LATEST in names:
            latest = sharded_name(LATEST) if config.fsdp else LATEST
            on_checkpoint(step, config.out / CHECKPOINT_DIR / latest)

    if state.start_step == 0 and first_eval is None:
        evaluate(0)  # the baseline forgetting and adaptation are measured against
    if state.start_step in config.save_at:
        checkpoint(state.start_step, named_checkpoint(state.start_step))

    tokens_per_step = source.global_batch * source.seq_len
    stats = StepStats()
    bar = tqdm(total=config.steps, initial=state.start_step, desc="train", unit="step",
               disable=not (dist_info.is_main and config.progress))
    # Closed when the loop ends, however it ends: its thread must not outlive the run (see on_device).
    with closing(on_device(source.batches(state.start_step), device)) as batches:
        for step in range(state.start_step, config.steps):
            signum = stop.agreed()
            if signum:
                if saved_step != step:
                    checkpoint(step, LATEST)
                bar.close()
                raise RunStopped(signum, step, config.out / CHECKPOINT_DIR / LATEST, dist_info.is_main)
            wait_started = time.perf_counter()
            batch, tokens = next(batches)
            stats.record(time.perf_counter() - wait_started, tokens_per_step)

            lr = state.schedule(step)
            for group in state.optimizer.param_groups:
                group["lr"] = lr
            loss_sum, grad_norm = train_step(forward, state.optimizer, tokens, config.data.micro_batch,
                                             config.optim.grad_clip, autocast)
            done = step + 1
            bar.update(1)
            if on_step is not None:
                on_step(done, model, batch)

            if done % config.log_every == 0 or done == config.steps:
                counts = torch.from_numpy(np.bincount(batch.sources, minlength=len(source.names)).astype(np.float64))
                reduced = torch.cat([loss_sum.double().cpu().view(1), counts])
                if dist_info.world_size > 1:
                    reduced = reduced.to(device)
                    dist.all_reduce(reduced)
                    reduced = reduced.cpu()
                last_loss = reduced[0].item() / dist_info.world_size
                tokens_per_s, wait_share = stats.summary()
                stats.reset()
                if log is not None:
                    shares = (reduced[1:] / reduced[1:].sum()).tolist()
                    log.write({
                        "kind": "train", "step": done, "batch_step": step, "loss": last_loss, "lr": lr,
                        "grad_norm": global_value(grad_norm).item(),
                        "tokens_per_s": tokens_per_s, "data_wait_share": wait_share,
                        "source_share": dict(zip(source.names, shares)),
                        **({"max_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30}
                           if device.type == "cuda" else {}),
                    })
                bar.set_postfix(loss=f"{last_loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:,.0f}",
                                wait=f"{wait_share:.1%}")
            if done % config.eval_every == 0 or done == config.steps:
                evaluate(done)
            names = [LATEST] if done % config.checkpoint_every == 0 or done == config.steps else []
            names += [named_checkpoint(done)] if done in config.save_at else []
            names += [FINAL] if done == config.steps else []
            if names:
                checkpoint(done, *names)
            if done % config.eval_every == 0 or names:
                stats.reset()  # evaluation and checkpoint time is not training throughput
    bar.close()
    if state.tokenizer_dir is not None:  # a model that came with its tokenizer goes back as a folder
        # Under --fsdp every rank sends its shards to rank 0, which alone holds (and writes) the whole model.
        weights = full_model_state(model) if config.fsdp else model.state_dict()
        if dist_info.is_main:
            exported = save_hf(weights, model, state.tokenizer_dir, hf_export_dir(config))
            print(f"Hugging Face folder (AutoModelForCausalLM.from_pretrained): {exported}", flush=True)
    if dist_info.is_main:
        print(f"trained steps {state.start_step}..{config.steps} of {model.num_params() / 1e6:.1f}M-parameter "
              f"model: final loss {last_loss:.4f}, metrics in {config.out / 'metrics.jsonl'}", flush=True)
    return model
