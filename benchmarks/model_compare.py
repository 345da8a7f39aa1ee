"""Own GPT or LlamaForCausalLM? The trainer's own model against a `transformers` Llama of the same shape
(RMSNorm, rotary, SwiGLU, tied embeddings: the same parameters and FLOPs), each through the trainer's
`train_step`, interleaved so that a shared machine's noise hits both alike.

    .venv/bin/python -m benchmarks.model_compare                     # CPU, the "tiny" size
    .venv/bin/python -m benchmarks.model_compare --device cuda --size 125m --seq-len 1024 --batch 16
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from trainer.hf_model import HFCausalLM
from trainer.model import GPT, MODEL_SIZES, config_for
from trainer.train import autocast_for, train_step


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=list(MODEL_SIZES), default="tiny")
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=5, help="timed steps per round")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    args = p.parse_args()
    from transformers import AutoModelForCausalLM, LlamaConfig

    device = torch.device(args.device)
    torch.manual_seed(0)
    own = GPT(config_for(args.size, args.vocab, args.seq_len)).to(device)
    c = own.config
    llama = HFCausalLM(AutoModelForCausalLM.from_config(LlamaConfig(
        vocab_size=args.vocab, hidden_size=c.d_model, num_hidden_layers=c.n_layer, num_attention_heads=c.n_head,
        num_key_value_heads=c.n_head, intermediate_size=c.ffn_hidden, max_position_embeddings=args.seq_len,
        rms_norm_eps=c.norm_eps, tie_word_embeddings=True), attn_implementation="sdpa")).to(device)
    tokens = torch.randint(0, args.vocab, (args.batch, args.seq_len + 1), device=device)
    autocast = autocast_for(device)
    models = {"own GPT": own, "LlamaForCausalLM": llama}
    optimizers = {name: torch.optim.AdamW(m.optimizer_groups(0.1), lr=1e-4) for name, m in models.items()}
    times: dict[str, list[float]] = {name: [] for name in models}
    for name, model in models.items():  # warm-up
        train_step(model, optimizers[name], tokens, args.batch, 1.0, autocast)
    for _ in range(args.rounds):
        for name, model in models.items():
            started = time.perf_counter()
            for _ in range(args.steps):
                train_step(model, optimizers[name], tokens, args.batch, 1.0, autocast)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append((time.perf_counter() - started) / args.steps)
    base = statistics.median(times["own GPT"])
    for name, model in models.items():
        step = statistics.median(times[name])
        print(f"{name:17s} {model.num_params() / 1e6:7.2f}M params  {model.flops_per_token(args.seq_len) / 1e6:7.1f} "
              f"MFLOP/token  {step * 1000:8.1f} ms/step  {args.batch * args.seq_len / step:10,.0f} tokens/s  "
              f"ratio to own GPT {step / base:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
