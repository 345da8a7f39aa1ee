"""--activation-checkpointing (trainer/activation_checkpointing.py): the losses of the plain run, to the bit in
one process and up to the sharding's rounding under --fsdp; a model without blocks it knows is refused."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from tests.test_ddp import _datasets, _flags, _records
from tests.test_fsdp import _spawn
from trainer.activation_checkpointing import enable_activation_checkpointing
from trainer.errors import TrainerError
from trainer.hf_model import HFCausalLM
from trainer.train import train
from trainer.train_config import parse_args

torch.set_num_threads(1)


def _blocks_recompute(step: int, model: nn.Module, batch) -> None:
    assert all(layer.gradient_checkpointing for layer in model.hf.model.layers)


@pytest.mark.timeout(300)
def test_the_losses_are_those_of_the_plain_run(tmp_path, token_dataset_factory, english_model, english_lines,
                                               german_lines):
    datasets = _datasets(token_dataset_factory, english_model, english_lines, german_lines)
    train(parse_args(_flags(datasets, tmp_path / "plain")))
    train(parse_args([*_flags(datasets, tmp_path / "recomputed"), "--activation-checkpointing"]),
          on_step=_blocks_recompute)
    for kind, loss in (("train", "loss"), ("eval", "val_loss")):
        plain, recomputed = _records(tmp_path / "plain", kind), _records(tmp_path / "recomputed", kind)
        assert [r[loss] for r in recomputed] == [r[loss] for r in plain] and len(plain) >= 3  # to the bit

    _spawn([*_flags(datasets, tmp_path / "fsdp"), "--fsdp", "--activation-checkpointing"])
    for a, b in zip(_records(tmp_path / "fsdp", "train"), _records(tmp_path / "plain", "train"), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-4)  # as test_fsdp: reduce-scatter rounding


def test_a_model_without_blocks_it_knows_is_refused():
    class Blockless(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)])

    with pytest.raises(TrainerError) as refused:
        enable_activation_checkpointing(HFCausalLM(Blockless()))
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith("--activation-checkpointing: Blockless has no decoder blocks the trainer knows how to "
                              "recompute (its blocks are Linear, not transformers' GradientCheckpointingLayer)")
