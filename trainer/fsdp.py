"""Fully sharded data parallelism (FSDP2, `torch.distributed.fsdp.fully_shard`) for models that do not fit one
device with their optimizer state, and their sharded checkpoints (`torch.distributed.checkpoint`, DCP).

`--fsdp` under torchrun shards every transformer block, and then the rest of the model (embeddings, final
norm, head: one group, so tied embeddings stay one tensor), over all ranks: each rank keeps 1/world of the
weights, gradients and AdamW moments, and gathers a block's weights only while it computes. The model is
built whole on each rank's CPU first (from its seed, a trainer checkpoint or a Hugging Face folder) and
each rank keeps only its shards on the device; so the host, not the device, must hold one full copy.

A sharded checkpoint is a folder, `checkpoints/latest.dcp/` (and `step-NNNNNN.dcp/`, `final.dcp/`): DCP's
files, one per rank, with the model's and optimizer's shards by parameter name, and `trainer.pt`, what a
`.pt` checkpoint holds besides them (step, RNG, first evaluation, the run's config and schedule, the
architecture). Every rank writes its own shards (the folder must be on storage all ranks see), into
`NAME.partial/`, which rank 0 renames into place once all have written: a crash never leaves half a
checkpoint under the name --resume reads. DCP reshards on load, so a run may resume on another number
of ranks.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from trainer.checkpoint import TRAINER_STATE, CheckpointError
from trainer.errors import TrainerError

def require_world(world_size: int) -> None:
    """--fsdp shards over the ranks of a process group; one process has nothing to shard over."""
    if world_size < 2:
        raise TrainerError("--fsdp shards the model over the ranks torchrun (or Ray Train) starts, but this is one "
                           "process; run it as `torchrun --nproc-per-node N -m trainer --fsdp ...` with N >= 2, or "
                           "drop --fsdp")


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks, each its own FSDP group: the children of the model's longest ModuleList (the own
    GPT's `blocks`, a Llama's `model.layers`, a GPT-NeoX's `gpt_neox.layers`), found by shape rather than
    by name so that every supported family is covered by one rule."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []


def shard_model(model: nn.Module, device: torch.device, world_size: int) -> nn.Module:
    """Shard `model` (in place) over all ranks on `device`: each block, then the rest. Parameters become
    DTensors, so the optimizer must be made after this."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (world_size,))
    for block in transformer_blocks(model):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def global_value(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's whole value (e.g. clip_grad_norm_'s norm over sharded gradients); a tensor as it is."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's state dict on rank 0's CPU, gathered from the shards (every rank must call it;
    the others get an empty dict): what --save-hf writes."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """An unsharded optimizer's state keyed by parameter name, which `load_full_optimizer_state` hands to
    the optimizer of the sharded model (torch's own state dict is keyed by position in the groups)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True))


def load_full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Each rank keeps its shards of the full, name-keyed `state`."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


def save_sharded(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, trainer_state: dict[str, Any],
                 is_main: bool) -> None:
    """Write the sharded checkpoint folder `path` (every rank calls this)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    staging = path.with_name(path.name + ".partial")
    if is_main:
        shutil.rmtree(staging, ignore_errors=True)  # a crash's leftovers
        staging.mkdir(parents=True)
    dist.barrier()
    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=staging)  # fsyncs its files
    if is_main:
        torch.save(trainer_state, staging / TRAINER_STATE)
        _fsync(staging / TRAINER_STATE)
    dist.barrier()  # every rank's shards are written
    if is_main:
        # A folder cannot replace a folder in one rename: the old one steps aside first, and is what
        # `sharded_in_place` finds if a crash comes between the two renames.
        previous = path.with_name(path.name + ".old")
        shutil.rmtree(previous, ignore_errors=True)
        if path.exists():
            os.replace(path, previous)
        os.replace(staging, path)
        _fsync(path.parent)
        shutil.rmtree(previous, ignore_errors=True)
    dist.barrier()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_sharded(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load the shards of `path` into the sharded model and its optimizer (every rank calls this)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    # The optimizer's state must exist for DCP to know what to read into: get_state_dict makes it (a step
    # at lr 0 on zero gradients, which leaves the weights as they are).
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    try:
        dcp.load(state, checkpoint_id=path)
    except Exception as e:  # DCP raises CheckpointException and others for missing or foreign shards
        raise CheckpointError(f"{path}: cannot load its shards ({type(e).__name__}: {str(e).splitlines()[0]})") from e
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
