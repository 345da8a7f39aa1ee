"""Peak memory and step time of --activation-checkpointing against the same training without it.

    OMP_NUM_THREADS=1 python -m benchmarks.activation_checkpointing                 # 125m, seq 1024, CPU RSS
    OMP_NUM_THREADS=1 python -m benchmarks.activation_checkpointing --model test --seq-len 256   # a quick look

Each variant runs in its own process (a process's peak RSS never goes down): the trainer's fresh Llama of
--model, AdamW, and the trainer's own `train_step` on random tokens, --warmup untimed steps and then --steps
timed ones, with each decoder block recomputed (trainer/activation_checkpointing.py) or not. Printed: each
variant's peak RSS; the part of it above the RSS once the model is built, less the gradients and AdamW
moments (12 bytes a parameter): the activations and temporaries, which checkpointing is about; the step
time in CPU seconds of the process (one thread: a machine shared with other work slows the wall clock,
not this); and the checkpointed-over-plain ratios. On a GPU benchmarks/gpu_check.sh gives the device's
peak memory.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.activation_checkpointing import enable_activation_checkpointing  # noqa: E402
from trainer.model import MODEL_SIZES, fresh_model  # noqa: E402
from trainer.train import autocast_for, train_step  # noqa: E402

VARIANTS = ("plain", "checkpointed")


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def run_variant(args: argparse.Namespace) -> dict:
    """One variant in this process: its peak RSS and seconds per step."""
    torch.manual_seed(0)
    model = fresh_model(args.model, args.vocab, args.seq_len)
    if args.variant == "checkpointed":
        enable_activation_checkpointing(model)
    model.train()
    built = peak_rss_gib()
    optimizer = torch.optim.AdamW(model.optimizer_groups(0.1), lr=1e-4, betas=(0.9, 0.95))
    tokens = torch.randint(0, args.vocab, (args.micro_batch, args.seq_len + 1))
    autocast = autocast_for(torch.device("cpu"))
    losses = []
    for _ in range(args.warmup):
        losses.append(train_step(model, optimizer, tokens, args.micro_batch, 1.0, autocast)[0].item())
    started = time.process_time()
    for _ in range(args.steps):
        losses.append(train_step(model, optimizer, tokens, args.micro_batch, 1.0, autocast)[0].item())
    seconds = (time.process_time() - started) / args.steps
    state_gib = model.num_params() * (4 + 8) / 2**30  # fp32 gradients and AdamW's two moments
    return {"peak_gib": peak_rss_gib(), "built_gib": built, "state_gib": state_gib, "step_s": seconds,
            "losses": losses}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=list(MODEL_SIZES), default="125m")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # a child process's
    args = p.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args)))
        return 0
    shared = [f"--model={args.model}", f"--vocab={args.vocab}", f"--seq-len={args.seq_len}",
              f"--micro-batch={args.micro_batch}", f"--steps={args.steps}", f"--warmup={args.warmup}"]
    results = {}
    for variant in VARIANTS:
        print(f"{variant}: {args.warmup} + {args.steps} steps ...", flush=True)
        child = subprocess.run([sys.executable, "-m", "benchmarks.activation_checkpointing", *shared,
                                f"--variant={variant}"], capture_output=True, text=True, check=True)
        results[variant] = json.loads(child.stdout.strip().splitlines()[-1])
    plain, recomputed = results["plain"], results["checkpointed"]
    same = plain["losses"] == recomputed["losses"]
    print(f"{args.model} at seq {args.seq_len} x {args.micro_batch} on the CPU ({torch.get_num_threads()} thread(s))")
    activations = {name: r["peak_gib"] - r["built_gib"] - r["state_gib"] for name, r in results.items()}
    print(f"{'variant':<13} {'peak RSS GiB':>12} {'activations GiB':>15} {'CPU s/step':>10}")
    for name, r in results.items():
        print(f"{name:<13} {r['peak_gib']:>12.2f} {activations[name]:>15.2f} {r['step_s']:>10.2f}")
    print(f"activation checkpointing: peak RSS x{recomputed['peak_gib'] / plain['peak_gib']:.3f}, activations "
          f"x{activations['checkpointed'] / activations['plain']:.3f}, step time "
          f"x{recomputed['step_s'] / plain['step_s']:.3f}; losses {'equal to the bit' if same else 'DIFFER'}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
