"""The model the trainer makes afresh (`--model SIZE`): a `transformers` LlamaForCausalLM of a named size.

One model path, not two: a fresh model is the same `HFCausalLM` a continued Hugging Face folder is, so it
trains, checkpoints, resumes, grows its vocabulary and shards (--fsdp) through the code every Llama-,
Mistral-, Qwen2- or GPT-NeoX-family model goes through. (Until 2026-11 the trainer had its own GPT of the
same shape; `benchmarks/README.md`, "Own GPT or LlamaForCausalLM", has the measurement that retired it.)
"""

from __future__ import annotations

import math

import torch

from trainer.hf_model import HFCausalLM

# Named sizes: "test" keeps CPU tests and the demo in seconds; "125m"/"350m" match the paper's scale family.
MODEL_SIZES: dict[str, dict[str, int]] = {
    "test": dict(n_layer=4, n_head=4, d_model=128),
    "tiny": dict(n_layer=6, n_head=8, d_model=256),
    "125m": dict(n_layer=12, n_head=12, d_model=768),
    "350m": dict(n_layer=24, n_head=16, d_model=1024),
}


def ffn_hidden(d_model: int) -> int:
    """SwiGLU keeps the parameter count of a 4x MLP with 2/3 of the width, rounded up to 64 for kernels."""
    return 64 * math.ceil(8 * d_model / 3 / 64)


def llama_config(size: str, vocab_size: int, max_seq_len: int, tie_embeddings: bool = True):
    """The `LlamaConfig` of a named size (multi-head attention, RMSNorm eps 1e-5, rotary base 10,000)."""
    from transformers import LlamaConfig

    if size not in MODEL_SIZES:
        raise ValueError(f"--model {size!r}: unknown size; choose one of {', '.join(MODEL_SIZES)}")
    shape = MODEL_SIZES[size]
    # No BOS/EOS/pad ids: the data's tokenizer has its own, and a fresh model should not claim Llama's 1 and 2.
    return LlamaConfig(vocab_size=vocab_size, hidden_size=shape["d_model"], num_hidden_layers=shape["n_layer"],
                       num_attention_heads=shape["n_head"], num_key_value_heads=shape["n_head"],
                       intermediate_size=ffn_hidden(shape["d_model"]), max_position_embeddings=max_seq_len,
                       rms_norm_eps=1e-5, tie_word_embeddings=tie_embeddings, bos_token_id=None,
                       eos_token_id=None, pad_token_id=None)


def fresh_model(size: str, vocab_size: int, max_seq_len: int, tie_embeddings: bool = True) -> HFCausalLM:
    """A randomly initialised Llama of `size` (transformers' own initialisation: normal, std 0.02), with SDPA
    attention; seed torch first for a reproducible one."""
    from transformers import AutoModelForCausalLM

    config = llama_config(size, vocab_size, max_seq_len, tie_embeddings)
    return HFCausalLM(AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa"))
