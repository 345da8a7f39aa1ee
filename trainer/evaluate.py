"""Validation loss on named held-out sets, and forgetting/adaptation against the run's first evaluation.

Each set is scored on fixed, evenly spaced windows of its val split, so every evaluation of every run
sees the same tokens. A training dataset whose val split is empty (tokenized with --val-fraction 0, or a
small corpus) is left out of evaluation, which the run says once at its start (`skipped`). Under DDP the windows are split across ranks and the sums all-reduced. Under FSDP
every forward pass gathers weights from all ranks, so every rank must make as many as the others
(`lockstep`): a rank with fewer windows makes up the difference with passes whose loss it does not count.
"""

from __future__ import annotations

import contextlib
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from pipeline.dataset import DatasetError, TokenDataset, TokenSplit


def validation_windows(split: TokenSplit, seq_len: int, count: int, where: str) -> np.ndarray:
    """(count, seq_len + 1) token windows spread evenly over the split."""
    if split.num_tokens < seq_len + 1:
        # A small corpus tokenized at the default --val-fraction gets an empty val split: name both fixes.
        raise DatasetError(
            f"{where}: the val split of {split.root} holds {split.num_tokens} tokens, fewer than one window of "
            f"{seq_len + 1} (the sequence length + 1); give a held-out set with --eval-dataset NAME=PATH, or "
            "tokenize the dataset again with a larger `python -m pipeline.tokenize --val-fraction`"
        )
    starts = np.linspace(0, split.num_tokens - (seq_len + 1), count).astype(np.int64)
    return np.stack([split.read(int(s), seq_len + 1).astype(np.int64) for s in starts])


class Evaluator:
    def __init__(
        self,
        splits: Mapping[str, TokenSplit],
        seq_len: int,
        batches: int,
        micro_batch: int,
        vocab_size: int,
        rank: int = 0,
        world_size: int = 1,
        lockstep: bool = False,
        skip_empty: bool = False,
    ):
        """`skip_empty`: leave out sets whose val split holds no token (the training datasets' own, which a
        run may lack) instead of refusing them (a set given for evaluation must have one)."""
        self.windows = {}
        self.idle_passes: dict[str, tuple[int, torch.Tensor]] = {}  # name -> (uncounted passes, their input)
        self.skipped = {name: split.root for name, split in splits.items() if skip_empty and split.num_tokens == 0}
        for name, split in splits.items():
            if name in self.skipped:
                continue
            windows = validation_windows(split, seq_len, batches * micro_batch, where=f"eval set {name!r}")
            if windows.max() >= vocab_size:
                raise DatasetError(
                    f"eval set {name!r}: token id {windows.max()} >= the model's vocabulary {vocab_size}; "
                    "it was tokenized with another tokenizer"
                )
            self.windows[name] = torch.from_numpy(windows[rank::world_size])
            if lockstep:
                passes = -(-len(self.windows[name]) // micro_batch)
                most = -(-len(windows[0::world_size]) // micro_batch)  # rank 0's share is never smaller
                self.idle_passes[name] = (most - passes, torch.from_numpy(windows[:1]))
        self.micro_batch = micro_batch
        self.distributed = world_size > 1

    @torch.no_grad()
    def __call__(
        self, model: nn.Module, device: torch.device, autocast: Callable[[], AbstractContextManager]
    ) -> dict[str, float]:
        was_training = model.training
        model.eval()
        losses = {}
        for name, windows in self.windows.items():
            total = torch.zeros(2, dtype=torch.float64, device=device)  # summed loss, window count
            for chunk in windows.split(self.micro_batch):
                chunk = chunk.to(device)
                with autocast():
                    loss = model(chunk[:, :-1], chunk[:, 1:])
                total += torch.stack([loss.double() * len(chunk), torch.tensor(len(chunk), device=device)])
            passes, window = self.idle_passes.get(name, (0, None))
            for _ in range(passes):
                with autocast():
                    model(window[:, :-1].to(device), window[:, 1:].to(device))
            if self.distributed:
                dist.all_reduce(total)
            losses[name] = (total[0] / total[1]).item()
        model.train(was_training)
        return losses


def autocast_for(device: torch.device) -> Callable[[], AbstractContextManager]:
    """bf16 autocast on CUDA (weights and optimizer stay fp32); full precision on the CPU."""
    if device.type == "cuda":
        return lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext


def score(model: nn.Module, eval_datasets: Mapping[str, str | Path], seq_len: int, batches: int, micro_batch: int,
          device: str = "cpu") -> dict[str, float]:
    """A model's loss on each dataset's val split, over the windows a run with these settings (--seq-len,
    --eval-batches, --micro-batch) scores at every evaluation: a model made outside a run (a merge) compares
    with the runs' own evaluations exactly."""
    splits = {name: TokenDataset(str(path)).val for name, path in eval_datasets.items()}
    evaluator = Evaluator(splits, seq_len, batches, micro_batch, model.config.vocab_size)
    where = torch.device(device)
    return evaluator(model.to(where), where, autocast_for(where))


def eval_record(step: int, losses: Mapping[str, float], first: Mapping[str, float]) -> dict:
    """The metrics line of one evaluation. Forgetting is the rise of a set's loss since the run's first
    evaluation (meaningful for the old data), adaptation its fall (meaningful for the new data)."""
    return {
        "kind": "eval",
        "step": step,
        "val_loss": dict(losses),
        "forgetting": {name: losses[name] - first[name] for name in losses if name in first},
        "adaptation": {name: first[name] - losses[name] for name in losses if name in first},
    }
