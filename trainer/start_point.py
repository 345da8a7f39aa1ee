"""Where a run starts, said once: a fresh model (from --model's seed, or a Hugging Face folder, --init-from
hf:PATH), a checkpoint a new run starts from (--init-from CKPT: its own step count, maybe a grown
vocabulary), or this run's own latest checkpoint (--resume: the run goes on as if never stopped).

`build_state` turns the start point into what the loop trains: the model (sharded under --fsdp), its
optimizer, the learning-rate schedule, the step to go on from, and the tokenizer it carries.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from pipeline.tokenizer.report import ExtensionReport, ExtensionReportError
from trainer.checkpoint import (
    TOKENIZER_DIR,
    CheckpointError,
    is_sharded_checkpoint,
    latest_checkpoint,
    load_checkpoint,
    restore_rng,
)
from trainer.data import BatchSource
from trainer.embedding_growth import grow_vocab, pad_optimizer_state
from trainer.errors import TrainerError
from trainer.fsdp import full_optimizer_state, load_full_optimizer_state, load_sharded, shard_model
from trainer.growth import GrowSpec, grow, select_trainable, undecayed_held_rows
from trainer.hf_model import (
    DTYPES,
    HFCausalLM,
    from_record,
    is_hf_record,
    load_hf_model,
    prepare_vocabulary,
    resolve_folder,
)
from trainer.lr_schedules import RunSchedule, build_schedule, continue_schedule
from trainer.model import fresh_model
from trainer.train_config import RESUMABLE_FLAGS, TrainConfig, resume_differences


@dataclass(frozen=True)
class StartPoint:
    """The checkpoint a run starts from (`path`, its `payload`), or none (a fresh or Hugging Face model), and
    whether it is this run's own (`resumed`)."""

    path: Path | None
    payload: dict[str, Any] | None
    resumed: bool

    @classmethod
    def of(cls, config: TrainConfig) -> StartPoint:
        resume_path = latest_checkpoint(config.out) if config.resume else None  # there: check_run_dir made sure
        path = resume_path or config.init_from
        return cls(path, None if path is None else load_checkpoint(path), resumed=resume_path is not None)

    @property
    def sharded(self) -> bool:
        """A folder of shards (an --fsdp run's), which only a sharded model can take."""
        return self.path is not None and is_sharded_checkpoint(self.path)

    @property
    def carried_tokenizer(self) -> Path | None:
        """The tokenizer a checkpoint's run carries (one that began from a Hugging Face folder); None: the run
        began from a fresh model, which trains on whatever ids its data has."""
        folder = self.path.parent / TOKENIZER_DIR if self.path is not None else None
        return folder if folder is not None and folder.is_dir() else None

    def model(self) -> HFCausalLM:
        """The checkpoint's model, with its weights; a sharded checkpoint's come once the model is sharded."""
        if not is_hf_record(self.payload["model_config"]):
            raise CheckpointError(f"{self.path}: a checkpoint of the trainer's former own GPT, which this trainer no "
                                  "longer builds (a fresh model is a transformers Llama now); start a new run with "
                                  "--model SIZE")
        model = from_record(self.payload["model_config"])
        if "model" in self.payload:
            model.load_state_dict(self.payload["model"])
        return model


@dataclass
class TrainingState:
    model: HFCausalLM
    optimizer: torch.optim.Optimizer
    schedule: RunSchedule
    start_step: int
    first_eval: dict[str, float] | None
    tokenizer_dir: Path | None = None  # a Hugging Face model's tokenizer: what --save-hf writes beside it


def build_state(config: TrainConfig, source: BatchSource, device: torch.device, world_size: int = 1) -> TrainingState:
    """The model, optimizer and schedule of the run's start point; with --fsdp sharded over the `world_size`
    ranks."""
    start = StartPoint.of(config)
    if start.sharded and not (config.fsdp and start.resumed):
        # Only a sharded model can take the shards; a new run from one needs the whole model first.
        raise CheckpointError(
            f"{start.path}: a sharded checkpoint (an --fsdp run's); resume that run with --fsdp under torchrun"
            if start.resumed else
            f"{start.path}: a sharded checkpoint (an --fsdp run's), which --init-from cannot start a new run from; "
            "resume its run instead, or start from its Hugging Face folder (--init-from hf:RUN_DIR/hf)")
    if start.resumed:
        _check_resumable(start, config)

    model, tokenizer_dir = _build_model(config, start, source)
    grown = config.grow is not None and not start.resumed  # a resumed run's checkpoint holds the grown model
    if grown:
        model = _grown(model, config, world_size)
    select_trainable(model, config.train)
    if config.save_hf is not None and tokenizer_dir is None:
        raise TrainerError(f"--save-hf {config.save_hf}: a Hugging Face folder holds the model's tokenizer, and a "
                           "model made afresh with --model has none (its vocabulary is its data's ids); start from "
                           "a Hugging Face folder with --init-from hf:PATH, or drop --save-hf")
    cast_parameters(model, DTYPES[config.dtype])
    keep_optimizer = start.payload is not None and not (config.init_from and config.reset_optimizer) and not grown
    optimizer_state = start.payload.get("optimizer") if keep_optimizer else None
    if config.fsdp:
        model, optimizer = _sharded(model, optimizer_state, config, device, world_size)
        if start.sharded:
            load_sharded(start.path, model, optimizer)
    else:
        model.to(device)
        optimizer = _make_optimizer(model, config, device)
        if optimizer_state is not None:
            _load_optimizer(optimizer, optimizer_state, config)
    schedule = _schedule(config, start)
    if not start.resumed:
        return TrainingState(model, optimizer, schedule, 0, None, tokenizer_dir)
    restore_rng(start.payload["rng"])
    return TrainingState(model, optimizer, schedule, start.payload["step"], start.payload.get("first_eval"),
                         tokenizer_dir)


def _grown(model: HFCausalLM, config: TrainConfig, world_size: int) -> HFCausalLM:
    """--grow: the model grown before the first step (trainer/growth.py), refused if its training state will
    not fit the device; the rows of the tokens --extension-report added are the ones --train new-blocks trains."""
    new_rows = ExtensionReport.load(config.extension_report).base_vocab_size if config.extension_report else None
    return grow(model, GrowSpec.parse(config.grow), seed=config.seed, new_token_rows_from=new_rows,
                device=config.device, world_size=world_size if config.fsdp else 1)


def cast_parameters(model: nn.Module, dtype: torch.dtype) -> None:
    """Weights to `dtype`, buffers as they are (rotary tables keep their float32 precision)."""
    for param in model.parameters():
        param.data = param.data.to(dtype)


def _make_optimizer(model: HFCausalLM, config: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    return torch.optim.AdamW(
        undecayed_held_rows(model, model.optimizer_groups(config.optim.weight_decay), config.train),
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


def _build_model(config: TrainConfig, start: StartPoint, source: BatchSource) -> tuple[HFCausalLM, Path | None]:
    """The model to train, its vocabulary grown to --extension-report's and checked against the data's,
    and the folder of the tokenizer it trains with: a Hugging Face folder's own (or its extension), carried
    into the run's checkpoints; None for a fresh model, which trains on whatever ids its data has."""
    if start.payload is None and config.hf_model is None:
        torch.manual_seed(config.seed)
        return fresh_model(config.model, source.vocab_size, source.seq_len, tie_embeddings=not config.untied), None
    if start.payload is None:
        folder = resolve_folder(config.hf_model)
        return _with_tokenizer(load_hf_model(str(folder), config.dtype), folder, config.extension_report,
                               f"--init-from hf:{config.hf_model}", source)
    model = start.model()
    if start.carried_tokenizer is not None:
        report = None if start.resumed else config.extension_report
        return _with_tokenizer(model, start.carried_tokenizer, report, str(start.path), source)
    rows = model.config.vocab_size  # a fresh model's checkpoint: its vocabulary is its data's
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
        raise CheckpointError(f"{start.path}: the model's vocabulary is {model.config.vocab_size} but the data's is "
                              f"{source.vocab_size}; {hint}")
    return model, None


def _with_tokenizer(model: HFCausalLM, base_tokenizer: Path, report: Path | None, where: str,
                    source: BatchSource) -> tuple[HFCausalLM, Path]:
    """A model that carries its tokenizer (--init-from hf:PATH, or a checkpoint of a run that started so),
    grown to `report`'s extension of it, with the folder of the tokenizer it now trains with."""
    tokenizer_dir, tokenizer_size = prepare_vocabulary(model, base_tokenizer, report)
    # Fewer is fine: a tokenizer loaded with its model's config may add special tokens at the end (Qwen2's
    # <|endoftext|>), which leaves every id of the data meaning what it did.
    if source.vocab_size > tokenizer_size:
        raise CheckpointError(f"{where}: the data's vocabulary is {source.vocab_size} but the model's tokenizer "
                              f"({tokenizer_dir}) has {tokenizer_size} pieces; the data was made with another "
                              "tokenizer: pass --extension-report DIR/extension_report.json of the extended "
                              "tokenizer it was made with, or tokenize it with the model's tokenizer")
    return model, tokenizer_dir


def _check_resumable(start: StartPoint, config: TrainConfig) -> None:
    """Refuse to resume with flags that would make it another run than the one checkpointed."""
    differences = resume_differences(start.payload.get("run_config", {}), config)
    if differences:
        listed = "".join(f"\n  {flag}: checkpoint {stored!r}, given {given!r}" for flag, stored, given in differences)
        raise CheckpointError(
            f"{start.path}: --resume continues the run as it was started, but these flags differ from the ones its "
            f"checkpoint recorded:{listed}\ngive the checkpoint's values (only {', '.join(RESUMABLE_FLAGS)} may "
            "change on resume), or start a new run in another --out"
        )


def _schedule(config: TrainConfig, start: StartPoint) -> RunSchedule:
    """A resumed run follows the schedule its checkpoint recorded, a --continue-schedule run the --init-from
    checkpoint's, continued; any other run builds its own from the flags."""
    if not (start.resumed or config.schedule.continued):
        try:
            return RunSchedule(build_schedule(config.schedule, config.steps))
        except ValueError as e:  # phases that do not fit --steps: the message names the flags to change
            raise TrainerError(str(e)) from e
    if start.payload.get("schedule") is None:
        raise CheckpointError(
            f"{start.path}: records no learning-rate schedule (an older trainer wrote it); start a new run from it "
            "with --init-from and this run's own schedule flags"
        )
    recorded = RunSchedule.from_record(start.payload["schedule"])
    if start.resumed:
        return recorded
    try:
        return continue_schedule(recorded, start.payload["step"], config.steps, config.schedule.decay_steps)
    except ValueError as e:
        raise CheckpointError(f"{start.path}: cannot --continue-schedule: {e}") from e
