"""Model growth at the start of a continued run (`--grow`): the grown model computes exactly what the base did,
and the new capacity learns from there.

- `blocks:N`, block expansion as in LLaMA Pro (arXiv 2401.02415, `scripts/block_expansion.py`): a model of L
  layers gets N more, one after every L/N-th layer, each a copy of the layer before it with its attention
  output projection and its MLP down projection (weights and biases) zero, so it adds nothing to the residual
  stream. N must divide L. The grown model is built from its config and given a renamed state dict, so every
  layer's `layer_idx` is its own. `--train new-blocks` then trains only the inserted layers (LLaMA-Factory's
  `use_llama_pro`: layer ids range(stride - 1, L + N, stride)), plus the embedding rows of the tokens an
  extended tokenizer added, if any.
- `experts:E,top_k:K`, sparse upcycling (arXiv 2212.05055): a Llama or Mistral becomes transformers'
  MixtralForCausalLM, every MLP copied into E identical experts behind a router drawn at random (normal,
  the config's initializer_range, seeded: mergekit-moe's advice for upcycling). Mixtral renormalises the top-k
  router weights to sum to one (`MixtralTopKRouter`, transformers 5.25), so identical experts give the dense
  MLP's output whatever the router says. The trainer's loss is the language-model loss: no router
  load-balancing term (Mixtral's `router_aux_loss_coef`), as at the start of upcycling the experts are equal.

The grown model's config records what was grown under `replaymix_growth` (it travels in checkpoints, which
store the config, and into `--save-hf` folders); a model that was grown once is not grown again.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn as nn

from trainer.errors import TrainerError
from trainer.hf_model import HFCausalLM

GROWTH_KEY = "replaymix_growth"
TRAIN_MODES = ("all", "new-blocks")
# model_type -> (the decoder layers' attribute path, the projections into the residual stream, zeroed in an
# inserted block).
BLOCK_LAYOUTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "llama": ("model.layers", ("self_attn.o_proj", "mlp.down_proj")),
    "mistral": ("model.layers", ("self_attn.o_proj", "mlp.down_proj")),
    "qwen2": ("model.layers", ("self_attn.o_proj", "mlp.down_proj")),
    "gpt_neox": ("gpt_neox.layers", ("attention.dense", "mlp.dense_4h_to_h")),
}
# Dense families whose attention Mixtral's is (no biases), so their MLPs can be upcycled into a Mixtral.
UPCYCLABLE = ("llama", "mistral")
# Weights, gradients and AdamW's two moments: what training a parameter holds, in the weights' dtype.
TRAINING_COPIES = 4


class GrowthError(TrainerError):
    """A --grow or --train that cannot be done for this model or machine; the message says why and what to give."""


@dataclass(frozen=True)
class GrowSpec:
    """A parsed --grow: `blocks:N`, or `experts:E,top_k:K`."""

    kind: str  # "blocks" or "experts"
    blocks: int = 0
    experts: int = 0
    top_k: int = 0

    @classmethod
    def parse(cls, text: str) -> "GrowSpec":
        blocks = re.fullmatch(r"blocks:(\d+)", text.strip())
        if blocks:
            spec = cls("blocks", blocks=int(blocks.group(1)))
        else:
            experts = re.fullmatch(r"experts:(\d+),top_k:(\d+)", text.replace(" ", ""))
            if not experts:
                raise GrowthError(f"--grow {text!r}: expected blocks:N (N identity blocks, e.g. blocks:2) or "
                                  "experts:E,top_k:K (every MLP upcycled into E experts, K per token, e.g. "
                                  "experts:4,top_k:2)")
            spec = cls("experts", experts=int(experts.group(1)), top_k=int(experts.group(2)))
        if spec.kind == "blocks" and spec.blocks < 1:
            raise GrowthError(f"--grow {text}: insert at least one block")
        if spec.kind == "experts" and not (spec.experts >= 2 and 1 <= spec.top_k <= spec.experts):
            raise GrowthError(f"--grow {text}: needs at least 2 experts and 1 <= top_k <= experts")
        return spec

    def __str__(self) -> str:
        return f"blocks:{self.blocks}" if self.kind == "blocks" else f"experts:{self.experts},top_k:{self.top_k}"


def growth_record(model: HFCausalLM) -> dict[str, Any] | None:
    """What was grown (the config's `replaymix_growth`), or None for a model never grown."""
    return getattr(model.config, GROWTH_KEY, None)


# ---- memory -----------------------------------------------------------------------------------------------


def available_memory(device: str) -> int:
    """Bytes a training state may take: the GPU's total memory, or the CPU's available memory."""
    if device == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    with open("/proc/meminfo") as f:
        meminfo = dict(line.split(":", 1) for line in f)
    return int(meminfo["MemAvailable"].split()[0]) * 1024


def check_fits(parameters: int, dtype: torch.dtype, what: str, device: str = "cpu", world_size: int = 1,
               available: int | None = None) -> None:
    """Refuse a grown model whose training state (weights, gradients, two AdamW moments; sharded over
    `world_size` ranks with --fsdp) does not fit the device."""
    needed = parameters * torch.finfo(dtype).bits // 8 * TRAINING_COPIES // world_size
    available = available_memory(device) if available is None else available
    if needed > available:
        raise GrowthError(f"--grow {what}: the grown model has {parameters / 1e6:,.1f}M parameters, whose training "
                          f"state needs about {_size(needed)} per rank but the {device} has "
                          f"{_size(available)}; give fewer experts or blocks, --dtype bfloat16, or shard "
                          "it with --fsdp over more ranks")


def _size(size: int) -> str:
    return f"{size / 2**30:,.1f} GiB" if size >= 2**30 else f"{size / 2**20:,.1f} MiB"


# ---- block expansion --------------------------------------------------------------------------------------


def _submodule(root: nn.Module, path: str) -> nn.Module:
    for part in path.split("."):
        root = getattr(root, part)
    return root


def _layout(model: HFCausalLM, what: str) -> tuple[str, tuple[str, ...]]:
    model_type = model.config.model_type
    if model_type not in BLOCK_LAYOUTS:
        raise GrowthError(f"--grow {what}: block expansion knows the layers of {', '.join(BLOCK_LAYOUTS)} models, "
                          f"not {model_type!r}")
    return BLOCK_LAYOUTS[model_type]


def inserted_layers(layers: int, blocks: int) -> list[int]:
    """The indices, in the grown model, of the blocks inserted after every layers/blocks-th layer."""
    stride = layers // blocks + 1
    return list(range(stride - 1, layers + blocks, stride))


def _attention(model: HFCausalLM) -> str:
    """The attention kernel the base was built with (sdpa unless chosen otherwise): the grown model keeps it."""
    return getattr(model.config, "_attn_implementation", None) or "sdpa"


def _check_divides(layers: int, blocks: int) -> None:
    if layers % blocks:
        divisors = [str(d) for d in range(1, layers + 1) if layers % d == 0]
        raise GrowthError(f"--grow blocks:{blocks}: the model has {layers} layers, over which {blocks} new blocks "
                          f"cannot be spread evenly (one after every layers/N-th); give an N that divides {layers}: "
                          f"{', '.join(divisors)}")


def expand_blocks(model: HFCausalLM, blocks: int) -> HFCausalLM:
    """LLaMA Pro's block expansion: a new model with `blocks` identity blocks inserted (see the module's doc)."""
    from transformers import AutoModelForCausalLM

    what = f"blocks:{blocks}"
    layers_path, zeroed = _layout(model, what)
    layers = model.config.num_hidden_layers
    _check_divides(layers, blocks)
    new = set(inserted_layers(layers, blocks))
    sources = []  # the grown model's layers, by the base layer each copies
    for i in range(layers):
        sources.append(i)
        if len(sources) in new:
            sources.append(i)
    config = copy.deepcopy(model.config)
    config.num_hidden_layers = layers + blocks
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = [model.config.layer_types[i] for i in sources]
    dtype = next(model.parameters()).dtype
    grown = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=_attention(model))
    state = model.hf.state_dict()
    prefix = layers_path + "."
    renamed = {k: v for k, v in state.items() if not k.startswith(prefix)}
    for j, i in enumerate(sources):
        for key, value in state.items():
            if key.startswith(f"{prefix}{i}."):
                rest = key[len(f"{prefix}{i}."):]
                is_zeroed = j in new and any(rest.startswith(z + ".") for z in zeroed)
                renamed[f"{prefix}{j}.{rest}"] = torch.zeros_like(value) if is_zeroed else value.clone()
    grown.load_state_dict(renamed, strict=True)
    grown.generation_config = copy.deepcopy(model.hf.generation_config)
    return HFCausalLM(grown)


# ---- sparse upcycling -------------------------------------------------------------------------------------


def _mixtral_config(dense: Any, experts: int, top_k: int) -> Any:
    from transformers import MixtralConfig

    return MixtralConfig(
        vocab_size=dense.vocab_size, hidden_size=dense.hidden_size, intermediate_size=dense.intermediate_size,
        num_hidden_layers=dense.num_hidden_layers, num_attention_heads=dense.num_attention_heads,
        num_key_value_heads=dense.num_key_value_heads, head_dim=getattr(dense, "head_dim", None),
        hidden_act=dense.hidden_act, max_position_embeddings=dense.max_position_embeddings,
        initializer_range=dense.initializer_range, rms_norm_eps=dense.rms_norm_eps,
        pad_token_id=dense.pad_token_id, bos_token_id=dense.bos_token_id, eos_token_id=dense.eos_token_id,
        tie_word_embeddings=dense.tie_word_embeddings, sliding_window=getattr(dense, "sliding_window", None),
        attention_dropout=dense.attention_dropout, rope_parameters=copy.deepcopy(dense.rope_parameters),
        num_local_experts=experts, num_experts_per_tok=top_k, architectures=["MixtralForCausalLM"])


def _check_upcyclable(dense: Any, what: str) -> None:
    if dense.model_type not in UPCYCLABLE:
        raise GrowthError(f"--grow {what}: upcycling makes a Mixtral, whose attention is a Llama's or Mistral's; "
                          f"this is a {dense.model_type!r} model (use --grow blocks:N for it)")
    if getattr(dense, "attention_bias", False) or getattr(dense, "mlp_bias", False):
        raise GrowthError(f"--grow {what}: this model's projections have biases, which a Mixtral has no place for")


def upcycle_experts(model: HFCausalLM, experts: int, top_k: int, seed: int = 0) -> HFCausalLM:
    """Sparse upcycling into a MixtralForCausalLM (see the module's doc)."""
    from transformers import AutoModelForCausalLM

    what = f"experts:{experts},top_k:{top_k}"
    dense = model.config
    _check_upcyclable(dense, what)
    dtype = next(model.parameters()).dtype
    moe = AutoModelForCausalLM.from_config(_mixtral_config(dense, experts, top_k), dtype=dtype,
                                           attn_implementation=_attention(model))
    source = model.hf
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        # Everything but the MLPs has the same names in both (embeddings, norms, attention, head).
        state = {k: v for k, v in source.state_dict().items() if ".mlp." not in k}
        missing, unexpected = moe.load_state_dict(state, strict=False)
        for dense_layer, moe_layer in zip(source.model.layers, moe.model.layers):
            mlp, block = dense_layer.mlp, moe_layer.mlp
            gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight], dim=0)  # Mixtral's chunk(2) order
            block.experts.gate_up_proj.copy_(gate_up.expand(experts, *gate_up.shape))
            block.experts.down_proj.copy_(mlp.down_proj.weight.expand(experts, *mlp.down_proj.weight.shape))
            block.gate.weight.copy_(torch.randn(block.gate.weight.shape, generator=generator)
                                    * dense.initializer_range)
    left = [k for k in missing if ".mlp." not in k] + list(unexpected)
    if left:  # a dense weight with no Mixtral counterpart would silently start random
        raise GrowthError(f"--grow {what}: the Mixtral has no place for {left[0]} of this model")
    moe.generation_config = copy.deepcopy(source.generation_config)
    return HFCausalLM(moe)


# ---- the one entry point ----------------------------------------------------------------------------------


def grown_parameters(model: HFCausalLM, spec: GrowSpec) -> int:
    """The parameter count `spec` would give, computed before anything is built."""
    c = model.config
    now = model.num_params()
    per_layer = sum(p.numel() for p in _layers(model)[0].parameters())
    if spec.kind == "blocks":
        return now + spec.blocks * per_layer
    mlp = sum(p.numel() for p in _layers(model)[0].mlp.parameters())
    return now + c.num_hidden_layers * ((spec.experts - 1) * mlp + spec.experts * c.hidden_size)


def active_parameters(model: HFCausalLM) -> int:
    """Parameters a token passes through: all of a dense model's; a Mixtral's with top_k of its experts
    (the compute an upcycled model spends per token, for a report beside its total parameter count)."""
    total = model.num_params()
    experts = getattr(model.config, "num_local_experts", None)
    if not experts:
        return total
    per_expert = sum(p[0].numel() for layer in _layers(model) for p in layer.mlp.experts.parameters())
    return total - (experts - model.config.num_experts_per_tok) * per_expert


def _layers(model: HFCausalLM) -> nn.ModuleList:
    return _submodule(model.hf, BLOCK_LAYOUTS.get(model.config.model_type, ("model.layers", ()))[0])


def grow(model: HFCausalLM, spec: GrowSpec, seed: int = 0, new_token_rows_from: int | None = None,
         device: str = "cpu", world_size: int = 1, available: int | None = None) -> HFCausalLM:
    """The grown model, with what was grown recorded in its config: `new_token_rows_from` is the first
    embedding row of the tokens an extended tokenizer added (None: none were), which --train new-blocks
    trains besides the new blocks. Refused before anything is built if it will not fit the device."""
    if growth_record(model) is not None:
        raise GrowthError(f"--grow {spec}: this model was grown already ({growth_record(model)['grow']}); train it "
                          "on without --grow")
    if spec.kind == "experts":
        _check_upcyclable(model.config, str(spec))
    else:
        _layout(model, str(spec))
        _check_divides(model.config.num_hidden_layers, spec.blocks)
    check_fits(grown_parameters(model, spec), next(model.parameters()).dtype, str(spec), device, world_size, available)
    layers = model.config.num_hidden_layers
    if spec.kind == "blocks":
        grown = expand_blocks(model, spec.blocks)
        record = {"grow": str(spec), "layers_before": layers, "new_layers": inserted_layers(layers, spec.blocks)}
    else:
        grown = upcycle_experts(model, spec.experts, spec.top_k, seed)
        record = {"grow": str(spec), "from_architecture": model.config.architectures or [model.config.model_type],
                  "router_seed": seed}
    record["new_token_rows_from"] = new_token_rows_from
    setattr(grown.config, GROWTH_KEY, record)
    return grown


def grow_folder(folder: str, spec: GrowSpec, out: str, seed: int = 0, dtype: str = "float32") -> str:
    """A Hugging Face folder grown into `out` (weights, config with the growth recorded, the folder's tokenizer):
    for a demo or a notebook that wants the grown model without training it."""
    from pathlib import Path

    from trainer.hf_model import load_hf_model, save_hf

    grown = grow(load_hf_model(folder, dtype), spec, seed)
    return str(save_hf(grown.state_dict(), grown, Path(folder), Path(out)))


# ---- what trains ------------------------------------------------------------------------------------------


def _vocab_weights(model: HFCausalLM) -> list[nn.Parameter]:
    weights = [model.hf.get_input_embeddings().weight, model.hf.get_output_embeddings().weight]
    return weights[:1] if weights[0] is weights[1] else weights


def select_trainable(model: HFCausalLM, mode: str) -> None:
    """--train: `all` trains every parameter; `new-blocks` only the blocks --grow blocks:N inserted and the
    embedding (and untied head) rows of new tokens: the other rows' gradients are zeroed by a hook, so with
    no weight decay on them (`undecayed_held_rows`) AdamW leaves them exactly as they are."""
    if mode not in TRAIN_MODES:
        raise GrowthError(f"--train {mode!r}: choose one of {', '.join(TRAIN_MODES)}")
    if mode == "all":
        return
    record = growth_record(model)
    if record is None or "new_layers" not in record:
        raise GrowthError("--train new-blocks trains the blocks --grow blocks:N inserts; give --grow blocks:N "
                          "(or --train all)")
    for p in model.parameters():
        p.requires_grad_(False)
    layers = _layers(model)
    for i in record["new_layers"]:
        layers[i].requires_grad_(True)
    rows_from = record.get("new_token_rows_from")
    if rows_from is None or rows_from >= model.config.vocab_size:
        return
    for weight in _vocab_weights(model):
        weight.requires_grad_(True)
        weight.register_hook(_keep_rows_from(rows_from))


def _keep_rows_from(first: int) -> Callable[[torch.Tensor], torch.Tensor]:
    def hook(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        grad[:first] = 0
        return grad

    return hook


def undecayed_held_rows(model: HFCausalLM, groups: list[dict], mode: str) -> list[dict]:
    """AdamW's groups (decay first, then no decay, as `HFCausalLM.optimizer_groups` makes them); under --train
    new-blocks the embedding and head move to the no-decay group, since decay would move the rows whose
    gradients are held at zero."""
    if mode != "new-blocks":
        return groups
    vocab = _vocab_weights(model)
    held = {id(w) for w in vocab}
    return [{**groups[0], "params": [p for p in groups[0]["params"] if id(p) not in held]},
            {**groups[1], "params": [p for p in groups[1]["params"] if id(p) not in held] + vocab}]
