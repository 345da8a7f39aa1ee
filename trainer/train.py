"""The training loop: one rank's view of a (possibly DDP or FSDP) run, from where it starts
(trainer/start_point.py: a fresh model, --init-from, or --resume).

Per step: fetch this rank's rows, split them into micro-batches (gradient accumulation, with DDP's
all-reduce only on the last), clip, step AdamW at the schedule's rate. Two components decide their own
timing: `RunMetrics` (train records, evaluations, the progress bar) and `Checkpointer` (which checkpoints a
step writes, plain or sharded). Rank 0 writes metrics.jsonl and checkpoints. Under torchrun,
RANK/WORLD_SIZE/LOCAL_RANK select the rank.

Steps count updates done: the loop's update from step s to s + 1 trains on the batch the mixer serves as
step s, and is logged, evaluated and checkpointed as step s + 1 (see trainer/metrics_log.py).
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm import tqdm

from service.wire import Batch
from trainer.activation_checkpointing import enable_activation_checkpointing
from trainer.checkpoint import (
    CHECKPOINT_DIR,
    FINAL,
    LATEST,
    TOKENIZER_DIR,
    named_checkpoint,
    save_checkpoint,
    sharded_name,
    trainer_state,
)
from trainer.dashboards import Dashboards
from trainer.data import BatchSource, on_device, open_eval_splits, open_source
from trainer.document_mask import DocumentMasking
from trainer.downstream import RunDownstream
from trainer.errors import TrainerError
from trainer.evaluate import Evaluator, autocast_for, eval_record
from trainer.fsdp import full_model_state, global_value, require_world, save_sharded
from trainer.hf_model import HFCausalLM, check_save_dir, copy_tokenizer, save_hf
from trainer.metrics_log import METRICS_NAME, MetricsLog, read_metrics
from trainer.run_dir import check_run_dir, delete_earlier_run
from trainer.start_point import TrainingState, build_state
from trainer.stop_request import RunStopped, StopRequest
from trainer.train_config import TrainConfig, config_record

StepHook = Callable[[int, nn.Module, Batch], None]
MIX_POLL_SECONDS = 10.0  # with --log-to, how often a service is asked for its mix's changes (GET /v1/mix)
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


def init_distributed(device: str) -> Distributed:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Distributed()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device == "cuda" else "gloo")
    return Distributed(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


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


def _check_batch_split(global_batch: int, world_size: int, micro_batch: int) -> None:
    """Refuse a global batch that the ranks cannot share in whole micro-batches."""
    rows = global_batch // world_size
    if global_batch % world_size or rows % micro_batch:
        raise TrainerError(
            f"global batch {global_batch} over {world_size} ranks gives {rows} rows per rank, which must be a "
            f"whole multiple of --micro-batch {micro_batch}; change --micro-batch, --global-batch (with --stream "
            "the service's) or the number of ranks"
        )


def _run(config: TrainConfig, source: BatchSource, dist_info: Distributed, device: torch.device,
         on_step: StepHook | None, on_checkpoint: CheckpointHook | None, stop: StopRequest) -> HFCausalLM:
    _check_batch_split(source.global_batch, dist_info.world_size, config.data.micro_batch)
    state = build_state(config, source, device, dist_info.world_size)
    model = state.model
    _configure_compute(model, config, source.eos_id)
    if state.start_step >= config.steps:
        if dist_info.is_main:
            _report_finished(config, state.start_step)
        return model
    autocast = autocast_for(device)
    forward = _wrapped(model, config, dist_info, device)
    metrics = RunMetrics(config, source, state, dist_info, device, autocast)
    checkpoints = Checkpointer(config, state, dist_info, on_checkpoint)
    metrics.start(state.start_step)
    checkpoints.save(state.start_step, metrics.first_eval, started=True)
    metrics.restart_clock()
    # Closed when the loop ends, however it ends: its thread must not outlive the run (see on_device).
    with closing(on_device(source.batches(state.start_step), device)) as batches, closing(metrics):
        for step in range(state.start_step, config.steps):
            signum = stop.agreed()
            if signum:
                checkpoints.save_latest(step, metrics.first_eval)
                raise RunStopped(signum, step, config.out / CHECKPOINT_DIR / LATEST, dist_info.is_main)
            batch, tokens = metrics.next_batch(batches)
            lr = state.schedule(step)
            for group in state.optimizer.param_groups:
                group["lr"] = lr
            loss_sum, grad_norm = train_step(forward, state.optimizer, tokens, config.data.micro_batch,
                                             config.optim.grad_clip, autocast)
            done = step + 1
            if on_step is not None:
                on_step(done, model, batch)
            metrics.step_done(done, batch, loss_sum, grad_norm, lr)
            if checkpoints.save(done, metrics.first_eval):
                metrics.restart_clock()  # checkpoint time is not training throughput
    _export_hf(config, state, dist_info)
    if dist_info.is_main:
        print(f"trained steps {state.start_step}..{config.steps} of {model.num_params() / 1e6:.1f}M-parameter "
              f"model: final loss {metrics.last_loss:.4f}, metrics in {config.out / METRICS_NAME}", flush=True)
    return model


def _configure_compute(model: HFCausalLM, config: TrainConfig, eos_id: int) -> None:
    """--attention's kernel; the documents of a row kept apart (--document-masking) or their boundary's
    prediction untrained (--eod-mask-loss), for training and evaluation alike; each block's activations
    recomputed in the backward pass (--activation-checkpointing)."""
    if model.config._attn_implementation != config.attention:
        try:
            model.hf.set_attn_implementation(config.attention)
        except (ImportError, ValueError) as e:
            raise TrainerError(f"--attention {config.attention}: transformers cannot use it here "
                               f"({str(e).splitlines()[0]}); use --attention sdpa") from e
    if config.document_masking or config.eod_mask_loss:
        model.documents = DocumentMasking(eos_id, keep_apart=config.document_masking,
                                          mask_boundary_loss=config.eod_mask_loss)
    if config.activation_checkpointing:
        enable_activation_checkpointing(model)


def _wrapped(model: HFCausalLM, config: TrainConfig, dist_info: Distributed, device: torch.device) -> nn.Module:
    """What the loop calls forward on: the model, compiled with --compile, under DDP on 2+ ranks without --fsdp
    (FSDP's own hooks reduce the gradients)."""
    forward: nn.Module = torch.compile(model) if config.compile else model
    if dist_info.world_size > 1 and not config.fsdp:
        forward = nn.parallel.DistributedDataParallel(
            forward, device_ids=[device.index] if device.type == "cuda" else None
        )
    return forward


def _export_hf(config: TrainConfig, state: TrainingState, dist_info: Distributed) -> None:
    """A model that came with its tokenizer goes back as a Hugging Face folder (--save-hf or RUN_DIR/hf)."""
    if state.tokenizer_dir is None:
        return
    # Under --fsdp every rank sends its shards to rank 0, which alone holds (and writes) the whole model.
    weights = full_model_state(state.model) if config.fsdp else state.model.state_dict()
    if dist_info.is_main:
        exported = save_hf(weights, state.model, state.tokenizer_dir, hf_export_dir(config))
        print(f"Hugging Face folder (AutoModelForCausalLM.from_pretrained): {exported}", flush=True)


def _say_what_is_not_evaluated(config: TrainConfig, evaluator: Evaluator) -> None:
    """Once, at the start: evaluation switched off, or sets left out for want of a val split."""
    if not config.eval_every:
        print("no evaluation in this run (--eval-every 0): metrics.jsonl gets no validation loss, forgetting or "
              "adaptation", flush=True)
        return
    for name, root in evaluator.skipped.items():
        print(f"eval set {name!r} is not evaluated: the val split of {root} is empty; give a held-out set with "
              "--eval-dataset NAME=PATH, or tokenize the dataset again with a larger `python -m pipeline.tokenize "
              "--val-fraction`", flush=True)
    if evaluator.skipped and not evaluator.windows:
        print("no evaluation in this run: no dataset has a val split", flush=True)


class RunMetrics:
    """What the run measures, each when it is due: a train record every --log-every steps and at the last
    (loss and source shares reduced over the ranks), an evaluation every --eval-every steps, at the last, and
    at step 0 (the baseline forgetting and adaptation are measured against). Rank 0 writes them to
    metrics.jsonl and prints one line per evaluation; the progress bar shows the last train record."""

    def __init__(self, config: TrainConfig, source: BatchSource, state: TrainingState, dist_info: Distributed,
                 device: torch.device, autocast: Callable[[], contextlib.AbstractContextManager]):
        self.config, self.source, self.model = config, source, state.model
        self.dist, self.device, self.autocast = dist_info, device, autocast
        # Made first: eval sets that cannot be scored refuse the run before the earlier one is deleted below.
        # --eval-every 0 evaluates nothing; training datasets without a val split are left out.
        splits = open_eval_splits(config.data, source) if config.eval_every else {}
        self.evaluator = Evaluator(splits, source.seq_len, config.data.eval_batches, config.data.micro_batch,
                                   state.model.config.vocab_size, dist_info.rank, dist_info.world_size,
                                   lockstep=config.fsdp, skip_empty=not config.data.eval_datasets)
        self.evaluating = bool(self.evaluator.windows)
        if dist_info.is_main:
            _say_what_is_not_evaluated(config, self.evaluator)
        # --downstream-tasks: checked (tasks known, a tokenizer) before anything is deleted; scored by rank 0.
        self.downstream = None
        if dist_info.is_main and config.downstream_tasks:
            self.downstream = RunDownstream(config.downstream_tasks, config.downstream_include,
                                            config.downstream_limit, state.tokenizer_dir)
        self.log = None
        if dist_info.is_main:
            if config.overwrite:  # only now that the run has started: a run that fails to start deletes nothing
                delete_earlier_run(config.out)
            self.log = MetricsLog(config.out, resume_step=state.start_step if config.resume else None)
            if self.downstream is not None and config.resume:
                scored = [r["scores"] for r in read_metrics(config.out) if r["kind"] == "downstream"]
                self.downstream.first = scored[0] if scored else None
        # --log-to: every record also charted, and the mix's changes as they are learnt of (trainer/dashboards.py).
        self.dashboards = None
        if dist_info.is_main and config.log_to:
            self.dashboards = Dashboards(config.log_to, config.out, config_record(config),
                                         resume_step=state.start_step if config.resume else None)
        self.mix_polled = -math.inf  # when the source's mix changes were last asked for
        self.first_eval = state.first_eval
        # With --document-masking or --eod-mask-loss every record says how its losses were computed.
        documents = state.model.documents
        self.loss_terms = {} if documents is None else documents.record()
        self.last_loss = float("nan")
        self.tokens_per_step = source.global_batch * source.seq_len
        self.stats = StepStats()
        self.bar = tqdm(total=config.steps, initial=state.start_step, desc="train", unit="step",
                        disable=not (dist_info.is_main and config.progress))

    def log_due(self, step: int) -> bool:
        return step % self.config.log_every == 0 or step == self.config.steps

    def eval_due(self, step: int) -> bool:
        return self.evaluating and (step % self.config.eval_every == 0 or step == self.config.steps)

    def start(self, step: int) -> None:
        """At the run's start step: the baseline evaluation, unless a resumed run measured it already."""
        if step == 0 and self.first_eval is None and self.evaluating:
            self.evaluate(0)
        if step == 0 and self.downstream is not None and self.downstream.first is None:
            self.score_downstream(0)

    def next_batch(self, batches: Iterator[tuple[Batch, torch.Tensor]]) -> tuple[Batch, torch.Tensor]:
        """The next batch, its wait counted as data wait."""
        started = time.perf_counter()
        batch = next(batches)
        self.stats.record(time.perf_counter() - started, self.tokens_per_step)
        return batch

    def step_done(self, step: int, batch: Batch, loss_sum: torch.Tensor, grad_norm: torch.Tensor, lr: float) -> None:
        """After the update that reached `step` (trained on `batch`): its train record and evaluation, when due."""
        self.bar.update(1)
        if self.log_due(step):
            self._log_train(step, batch, loss_sum, grad_norm, lr)
        if self.eval_due(step):
            self.evaluate(step)
            self.restart_clock()  # evaluation time is not training throughput
        if step == self.config.steps and self.downstream is not None:
            self.score_downstream(step)

    def restart_clock(self) -> None:
        self.stats.reset()

    def evaluate(self, step: int) -> None:
        losses = self.evaluator(self.model, self.device, self.autocast)
        self.first_eval = self.first_eval or losses
        if self.log is None:
            return
        self._write({**eval_record(step, losses, self.first_eval), **self.loss_terms})
        self.source.report_losses(step, losses)
        # One line per evaluation, also without the bar: a long run shows how it goes.
        train_loss = "" if math.isnan(self.last_loss) else f"train loss {self.last_loss:.4f}, "
        tqdm.write(f"step {step}/{self.config.steps}: {train_loss}val loss "
                   + ", ".join(f"{name} {loss:.4f}" for name, loss in losses.items()), file=sys.stdout)

    def score_downstream(self, step: int) -> None:
        """Rank 0: the --downstream-tasks of the model at `step`, with their change since the run's start."""
        record = self.downstream.record(self.model, self.device, step)
        self._write(record)
        tqdm.write(f"step {step}/{self.config.steps}: downstream " + ", ".join(
            f"{task} {metric} {value:.4f} ({record['change'][task][metric]:+.4f})"
            for task, metrics in record["scores"].items() for metric, value in metrics.items()), file=sys.stdout)

    def _log_train(self, step: int, batch: Batch, loss_sum: torch.Tensor, grad_norm: torch.Tensor, lr: float) -> None:
        names = self.source.names
        counts = torch.from_numpy(np.bincount(batch.sources, minlength=len(names)).astype(np.float64))
        reduced = torch.cat([loss_sum.double().cpu().view(1), counts])
        if self.dist.world_size > 1:
            reduced = reduced.to(self.device)
            dist.all_reduce(reduced)
            reduced = reduced.cpu()
        self.last_loss = reduced[0].item() / self.dist.world_size
        tokens_per_s, wait_share = self.stats.summary()
        self.stats.reset()
        if self.log is not None:
            shares = (reduced[1:] / reduced[1:].sum()).tolist()
            self._write({
                "kind": "train", "step": step, "batch_step": step - 1, "loss": self.last_loss, "lr": lr,
                "grad_norm": global_value(grad_norm).item(),
                "tokens_per_s": tokens_per_s, "data_wait_share": wait_share,
                "source_share": dict(zip(names, shares)),
                **self.loss_terms,
                **({"max_memory_gib": torch.cuda.max_memory_allocated(self.device) / 2**30}
                   if self.device.type == "cuda" else {}),
            })
        self.bar.set_postfix(loss=f"{self.last_loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:,.0f}",
                             wait=f"{wait_share:.1%}")

    def _write(self, record: dict) -> None:
        """A record to metrics.jsonl (rank 0) and the dashboards, with the mix changes learnt of by then."""
        self.log.write(record)
        if self.dashboards is None:
            return
        if time.monotonic() - self.mix_polled >= MIX_POLL_SECONDS or record["step"] == self.config.steps:
            self.mix_polled = time.monotonic()
            self.dashboards.mix_changes(record["step"], self.source.mix_changes())
        self.dashboards.record(record)

    def close(self) -> None:
        self.bar.close()
        if self.dashboards is not None:
            self.dashboards.close()


class Checkpointer:
    """Which checkpoints a step writes, and writing them: checkpoints/latest.pt every --checkpoint-every steps
    and at the last, step-NNNNNN.pt at each --save-at step, final.pt at the last; `.pt` files written by rank
    0, or under --fsdp folders of shards that every rank writes into. A Hugging Face model's tokenizer is
    copied into checkpoints/ before the first checkpoint that needs it."""

    def __init__(self, config: TrainConfig, state: TrainingState, dist_info: Distributed,
                 on_checkpoint: CheckpointHook | None):
        self.config, self.state, self.dist, self.on_checkpoint = config, state, dist_info, on_checkpoint
        self.folder = config.out / CHECKPOINT_DIR
        self.run_config = config_record(config)
        self.saved_step = -1  # the step the latest checkpoint was last written at

    def due(self, step: int, started: bool = False) -> list[str]:
        """The checkpoints to write at `step`: after an update, latest (every --checkpoint-every steps and at
        the last), the step's own (a --save-at step) and final (at the last); at the step a run starts from
        (`started`), only a --save-at step's own."""
        names = [named_checkpoint(step)] if step in self.config.save_at else []
        if started:
            return names
        last = step == self.config.steps
        latest = [LATEST] if step % self.config.checkpoint_every == 0 or last else []
        return latest + names + ([FINAL] if last else [])

    def save(self, step: int, first_eval: dict[str, float] | None, started: bool = False) -> bool:
        """Write the checkpoints due at `step`; whether there were any."""
        names = self.due(step, started)
        if names:
            self._write(step, names, first_eval)
        return bool(names)

    def save_latest(self, step: int, first_eval: dict[str, float] | None) -> None:
        """The latest checkpoint of `step`, unless it is written already (a run asked to stop)."""
        if self.saved_step != step:
            self._write(step, [LATEST], first_eval)

    def _write(self, step: int, names: list[str], first_eval: dict[str, float] | None) -> None:
        model, optimizer, schedule = self.state.model, self.state.optimizer, self.state.schedule.record()
        if LATEST in names:
            self.saved_step = step
        if self.dist.is_main:
            self._carry_tokenizer()  # before the checkpoint that needs it
        for name in names:
            if self.config.fsdp:  # every rank writes its shards
                save_sharded(self.folder / sharded_name(name), model, optimizer,
                             trainer_state(model, step, first_eval, self.run_config, schedule), self.dist.is_main)
            elif self.dist.is_main:
                save_checkpoint(self.folder / name, model, optimizer, step, first_eval, self.run_config, schedule)
        if self.dist.world_size > 1:
            dist.barrier()
        if self.on_checkpoint is not None and LATEST in names:
            self.on_checkpoint(step, self.folder / (sharded_name(LATEST) if self.config.fsdp else LATEST))

    def _carry_tokenizer(self) -> None:
        carried = self.folder / TOKENIZER_DIR
        if self.state.tokenizer_dir is not None and self.state.tokenizer_dir != carried:
            copy_tokenizer(self.state.tokenizer_dir, carried)
            self.state.tokenizer_dir = carried
