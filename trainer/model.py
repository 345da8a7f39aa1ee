"""A decoder-only transformer in the style of current open models: RMSNorm, rotary positions, SwiGLU.

One file, read top to bottom: config and named sizes, the blocks, the model, and the FLOP count the
throughput benchmark divides by. Attention goes through `scaled_dot_product_attention`, which picks a
flash/memory-efficient kernel where the hardware has one.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from trainer.lm import decay_groups, next_token_loss, training_flops_per_token


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int
    max_seq_len: int = 1024  # length of the rotary tables; sequences may be shorter
    n_layer: int = 12
    n_head: int = 12
    d_model: int = 768
    tie_embeddings: bool = True
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5

    @property
    def ffn_hidden(self) -> int:
        # SwiGLU keeps the parameter count of a 4x MLP with 2/3 of the width, rounded up to 64 for kernels.
        return 64 * math.ceil(8 * self.d_model / 3 / 64)


# Named sizes. "test" keeps CPU tests in seconds; "125m"/"350m" match the paper's scale family.
MODEL_SIZES: dict[str, dict[str, int]] = {
    "test": dict(n_layer=4, n_head=4, d_model=128),
    "tiny": dict(n_layer=6, n_head=8, d_model=256),
    "125m": dict(n_layer=12, n_head=12, d_model=768),
    "350m": dict(n_layer=24, n_head=16, d_model=1024),
}


def config_for(size: str, vocab_size: int, max_seq_len: int, tie_embeddings: bool = True) -> GPTConfig:
    if size not in MODEL_SIZES:
        raise ValueError(f"--model {size!r}: unknown size; choose one of {', '.join(MODEL_SIZES)}")
    return GPTConfig(vocab_size=vocab_size, max_seq_len=max_seq_len, tie_embeddings=tie_embeddings, **MODEL_SIZES[size])


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32: under bf16 autocast the mean of squares loses too many bits.
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


def rotary_tables(head_dim: int, max_seq_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[..., :d/2], x[..., d/2:]) of a (batch, heads, seq, head_dim) tensor."""
    first, second = x.float().chunk(2, dim=-1)
    rotated = torch.cat((first * cos - second * sin, first * sin + second * cos), dim=-1)
    return rotated.type_as(x)


class Attention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model, bias=False)
        self.proj = nn.Linear(config.d_model, config.d_model, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        batch, seq, dim = x.shape
        q, k, v = self.qkv(x).view(batch, seq, 3, self.n_head, dim // self.n_head).permute(2, 0, 3, 1, 4)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(out.transpose(1, 2).reshape(batch, seq, dim))


class SwiGLU(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.gate_up = nn.Linear(config.d_model, 2 * config.ffn_hidden, bias=False)
        self.proj = nn.Linear(config.ffn_hidden, config.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.proj(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.attn_norm = RMSNorm(config.d_model, config.norm_eps)
        self.attn = Attention(config)
        self.mlp_norm = RMSNorm(config.d_model, config.norm_eps)
        self.mlp = SwiGLU(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.mlp(self.mlp_norm(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        cos, sin = rotary_tables(config.d_model // config.n_head, config.max_seq_len, config.rope_theta)
        # Derived from the config, so not saved: checkpoints hold only learned weights.
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)
        # GPT-2's scaled init of residual projections keeps the residual stream's variance flat with depth.
        for name, param in self.named_parameters():
            if name.endswith("proj.weight"):
                nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (batch, seq, vocab), or the mean cross-entropy against `targets` when given."""
        seq = tokens.shape[1]
        if seq > self.config.max_seq_len:
            raise ValueError(f"sequence of {seq} tokens exceeds the model's max_seq_len {self.config.max_seq_len}")
        cos, sin = self.rope_cos[:seq], self.rope_sin[:seq]
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x, cos, sin)
        logits = self.lm_head(self.norm(x))
        return logits if targets is None else next_token_loss(logits, targets)

    def record(self) -> dict:
        """What a checkpoint stores to rebuild the architecture (`trainer.checkpoint.model_config_of`)."""
        return asdict(self.config)

    def num_params(self, include_embedding: bool = True) -> int:
        total = sum(p.numel() for p in self.parameters())  # tied weights are counted once
        return total if include_embedding else total - self.embed.weight.numel()

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (`trainer.lm.training_flops_per_token`)."""
        c = self.config
        return training_flops_per_token(self, self.embed.weight, self.lm_head.weight, c.n_layer, c.d_model, seq_len)

    def optimizer_groups(self, weight_decay: float) -> list[dict]:
        return decay_groups(self, weight_decay)
