"""The training rules of a language model, apart from any one architecture: the loss, which parameters
decay, and the FLOPs per token that MFU divides by.

The loop calls `model(tokens, targets)` for the mean cross-entropy (or `model(tokens)` for logits),
`model.optimizer_groups(weight_decay)`, `model.flops_per_token(seq_len)`, `model.num_params()` and reads
`model.config.vocab_size` (the embedding's rows); `trainer/hf_model.py`'s `HFCausalLM` implements those
with the functions below for every family (and for the fresh Llama of `trainer/model.py`).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy, in float32 whatever the logits' dtype: bf16 log-softmax over a large vocabulary
    loses the digits that tell a good model from a slightly worse one."""
    return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))


def decay_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay matrices (embeddings included, as in nanoGPT and most open-model recipes); never
    decay norm gains or biases. Tied weights appear once (`parameters()` deduplicates)."""
    params = list(model.parameters())
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def training_flops_per_token(model: nn.Module, input_embedding: torch.Tensor, output_weight: torch.Tensor,
                             n_layer: int, d_model: int, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward): 6N for the weights plus attention's
    12 * layers * d_model * seq (the PaLM appendix B count used for MFU). The input embedding is a lookup,
    not a matmul; a tied output head still multiplies, so it counts although it is the same tensor. A
    mixture of experts keeps its experts' matrices stacked (3-D, one per expert) and a token passes through
    top_k of them, so those count for top_k / experts (the config's num_experts_per_tok / num_local_experts)."""
    matmul_params = sum(p.numel() for p in model.parameters() if p.dim() == 2 and p is not input_embedding)
    if output_weight is input_embedding:
        matmul_params += output_weight.numel()
    config = getattr(model, "config", None)
    experts = getattr(config, "num_local_experts", 0)
    if experts:
        stacked = sum(p.numel() for p in model.parameters() if p.dim() == 3)
        matmul_params += stacked * config.num_experts_per_tok / experts
    return 6.0 * matmul_params + 12.0 * n_layer * d_model * seq_len
