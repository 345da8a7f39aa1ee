"""`--activation-checkpointing`: each decoder block keeps only its input for the backward pass and computes
its activations again there, so activation memory is one block's instead of every block's, for about one
more forward pass per step (benchmarks/README.md has the measured ratios).

The blocks are the ones --fsdp shards (`trainer.fsdp.transformer_blocks`: the model's longest ModuleList),
and they are checkpointed by transformers' own mechanism (`activation_checkpointing_enable`, torch's
non-reentrant `torch.utils.checkpoint`), which wraps a block's `forward`, not its `__call__`: FSDP2's
hooks stay outside the recomputed region, so a block's weights are gathered once more for the recompute,
as torchtitan does, and nothing else changes under --fsdp. The recompute runs the same kernels on the
same inputs, so the losses are those of a run without it, to the bit.
"""

from __future__ import annotations

import torch.nn as nn

from trainer.errors import TrainerError
from trainer.fsdp import transformer_blocks


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Recompute every decoder block of `model` (an `HFCausalLM`) in the backward pass; refuse a model whose
    blocks are not transformers' checkpointable decoder layers."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    hf = getattr(model, "hf", model)
    blocks = transformer_blocks(hf)
    kinds = sorted({type(block).__name__ for block in blocks})
    if not blocks or not all(isinstance(block, GradientCheckpointingLayer) for block in blocks) \
            or not getattr(hf, "supports_gradient_checkpointing", False):
        found = f"its blocks are {', '.join(kinds)}" if blocks else "it has no list of blocks"
        raise TrainerError(
            f"--activation-checkpointing: {type(hf).__name__} has no decoder blocks the trainer knows how to "
            f"recompute ({found}, not transformers' GradientCheckpointingLayer); drop --activation-checkpointing "
            "for this model")
    hf.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
