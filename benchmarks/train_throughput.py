"""Training throughput and model FLOPs utilisation (MFU), with the data path against a no-data baseline.

    python -m benchmarks.train_throughput --device cuda --compile            # 125M, seq 1024, bf16
    python -m benchmarks.train_throughput --stream http://host:8000 ...      # read from the service
    python -m benchmarks.train_throughput --model test --seq-len 128 --micro-batch 4 --steps 5   # CPU smoke

Every measurement uses the trainer's own `train_step`. The baseline trains on token tensors already on
the device; each data path feeds the step as the trainer does, through `trainer.data.on_device` (a thread
turns the next batches into tensors, pinned on CUDA, while a step runs): the in-process mixer (--dataset,
or a small dataset made here when none is given) always, and the mixer service too with --stream. Printed,
a row per path: tokens/s, its ratio to the baseline, and data wait as a share of step time (the time the
loop waited for a batch nobody had ready); and MFU against --peak-tflops (known GPUs are looked up).

    python -m benchmarks.train_throughput --model test --seq-len 1024 --micro-batch 4 --document-masking

--document-masking adds a line: the step time with the documents of each row kept apart
(trainer/document_mask.py, transformers' packed-sequence masks) over the step time without, on the
in-process data path, measured in --rounds alternated rounds (a shared machine slows both alike); with
--doc-tokens, the made-up dataset's documents are that long (default 1000 tokens).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.train_config import DataConfig  # noqa: E402
from trainer.data import BatchSource, on_device, open_source  # noqa: E402
from trainer.document_mask import DocumentMasking  # noqa: E402
from trainer.model import MODEL_SIZES, fresh_model  # noqa: E402
from trainer.train import autocast_for, train_step  # noqa: E402

# Dense bf16 tensor-core peaks (TFLOP/s), by a substring of torch.cuda.get_device_name().
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "4090": 165.0}


def make_dataset(folder: Path, vocab_size: int, tokens: int, seed: int = 0, doc_tokens: int = 1000) -> Path:
    """A token dataset of random documents, written through pipeline.dataset with a real SentencePiece model."""
    import sentencepiece as spm

    from pipeline.dataset import build_manifest, commit_dataset, token_dtype, write_shard
    from pipeline.tokenizer.load import load_tokenizer

    rng = np.random.default_rng(seed)
    words = ["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), size=rng.integers(2, 9))) for _ in range(3000)]
    corpus = folder / "corpus.txt"
    corpus.write_text("\n".join(" ".join(rng.choice(words, size=20)) for _ in range(4000)))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(folder / "bench"), vocab_size=vocab_size,
                                   model_type="bpe", num_threads=1, minloglevel=2)
    staging = folder / "data.staging"
    staging.mkdir()
    info = load_tokenizer(folder / "bench.model").stage_copy(staging)
    dtype = token_dtype(info.vocab_size)
    docs = [rng.integers(3, info.vocab_size, size=doc_tokens).astype(dtype) for _ in range(tokens // doc_tokens)]
    for doc in docs:
        doc[-1] = info.eos_id
    shards = {split: [write_shard(staging, f"{split}-00000", docs, dtype)] for split in ("train", "val")}
    commit_dataset(staging, folder / "data", build_manifest(info, shards))
    return folder / "data"


def measure(model, optimizer, micro_batch, autocast, next_tokens, steps: int, warmup: int, label: str, device):
    """(tokens/s, share of time waiting for data) over `steps` timed steps after `warmup` untimed ones."""
    for _ in range(warmup):  # compilation, allocator, cuDNN autotuning
        train_step(model, optimizer, next_tokens(), micro_batch, 1.0, autocast)
    _sync(device)
    waited, tokens = 0.0, 0
    started = time.perf_counter()
    for _ in tqdm(range(steps), desc=label, unit="step"):
        before = time.perf_counter()
        batch = next_tokens()
        waited += time.perf_counter() - before
        tokens += batch.shape[0] * (batch.shape[1] - 1)
        train_step(model, optimizer, batch, micro_batch, 1.0, autocast)
    _sync(device)
    elapsed = time.perf_counter() - started
    return tokens / elapsed, waited / elapsed


def document_masking_cost(model, forward, optimizer, args, autocast, source: BatchSource, device) -> list[float]:
    """Step time with the documents kept apart over step time without, on the same batches: each round
    measures both, one after the other, so that a machine shared with other work slows both alike."""
    batches = on_device(source.batches(0), device)
    masking = DocumentMasking(source.eos_id)
    ratios = []
    for round_ in range(args.rounds):
        seconds = {}
        for documents in (None, masking):
            model.documents = documents
            tps, _ = measure(forward, optimizer, args.micro_batch, autocast, lambda: next(batches)[1], args.steps,
                             1, f"round {round_ + 1}: {'document-masked' if documents else 'causal'}", device)
            seconds[documents is not None] = 1 / tps
        ratios.append(seconds[True] / seconds[False])
    model.documents = None
    batches.close()
    return ratios


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=list(MODEL_SIZES), default="125m")
    p.add_argument("--vocab", type=int, default=32000, help="model vocabulary (>= the data's)")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--micro-batch", type=int, default=16)
    p.add_argument("--accumulation", type=int, default=1)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--dataset", metavar="PATH", help="token dataset for the data path (default: made here)")
    p.add_argument("--stream", metavar="URL",
                   help="also measure the path from a mixer service (allowing anonymous reads), whose geometry "
                        "both paths then take")
    p.add_argument("--peak-tflops", type=float, help="device peak for MFU (looked up for known GPUs)")
    p.add_argument("--document-masking", action="store_true",
                   help="also measure the in-process path with --document-masking (SDPA)")
    p.add_argument("--doc-tokens", type=int, default=1000, help="document length of the made-up dataset")
    p.add_argument("--rounds", type=int, default=3, help="alternated rounds of the --document-masking comparison")
    args = p.parse_args()

    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    rows, seq_len = args.micro_batch * args.accumulation, args.seq_len
    with tempfile.TemporaryDirectory() as scratch:
        sources: dict[str, BatchSource] = {}
        if args.stream:  # first: the service decides the geometry, which the in-process path then takes
            sources["stream"] = open_source(DataConfig(stream_url=args.stream),
                                            rank=0, world_size=1)
            seq_len, rows = sources["stream"].seq_len, sources["stream"].global_batch
        path = args.dataset or make_dataset(Path(scratch), 512, tokens=rows * (seq_len + 1) * 8,
                                            doc_tokens=args.doc_tokens)
        in_process = DataConfig(datasets={"bench": str(path)}, weights={"bench": 1.0}, seq_len=seq_len,
                                global_batch=rows, micro_batch=args.micro_batch)
        sources = {"in-process": open_source(in_process, rank=0, world_size=1), **sources}
        vocab = max(source.vocab_size for source in sources.values())
        if vocab > args.vocab:
            p.error(f"the data's vocabulary {vocab} exceeds --vocab {args.vocab}")

        torch.manual_seed(0)
        model = fresh_model(args.model, args.vocab, seq_len).to(device)
        forward = torch.compile(model) if args.compile else model
        optimizer = torch.optim.AdamW(model.optimizer_groups(0.1), lr=1e-4, betas=(0.9, 0.95), fused=device.type == "cuda")
        autocast = autocast_for(device)

        resident = torch.randint(0, vocab, (rows, seq_len + 1), device=device)
        base_tps, _ = measure(forward, optimizer, args.micro_batch, autocast, lambda: resident,
                              args.steps, args.warmup, "baseline (on-device tokens)", device)
        results = {}
        for name, source in sources.items():
            batches = on_device(source.batches(0), device)  # the trainer's own prefetching path
            results[name] = measure(forward, optimizer, args.micro_batch, autocast, lambda: next(batches)[1],
                                    args.steps, args.warmup, f"{name} data path", device)
            batches.close()
        masking_ratios = []
        if args.document_masking:
            masking_ratios = document_masking_cost(model, forward, optimizer, args, autocast, sources["in-process"],
                                                   device)
        for source in sources.values():
            source.close()

    flops = model.flops_per_token(seq_len)
    peak = args.peak_tflops
    if peak is None and device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    mfu = lambda tps: f"{tps * flops / (peak * 1e12):.1%}" if peak else "n/a"
    print(f"{args.model} ({model.num_params() / 1e6:.1f}M params) seq {seq_len} x {rows} rows on {device}"
          f"{' compiled' if args.compile else ''}, {flops / 1e6:.0f} MFLOP/token"
          + (f", MFU against {peak:.0f} TFLOP/s" if peak else ", MFU n/a (give --peak-tflops)"))
    print(f"{'path':<12} {'tokens/s':>12} {'vs baseline':>12} {'data wait':>10} {'MFU':>7}")
    print(f"{'baseline':<12} {base_tps:>12,.0f} {1:>12.3f} {'-':>10} {mfu(base_tps):>7}")
    for name, (tps, wait) in results.items():
        print(f"{name:<12} {tps:>12,.0f} {tps / base_tps:>12.3f} {wait:>10.2%} {mfu(tps):>7}")
    if masking_ratios:
        print(f"--document-masking: step time x{np.median(masking_ratios):.3f} of the causal step's (median of "
              f"{len(masking_ratios)} alternated rounds: {', '.join(f'{r:.3f}' for r in masking_ratios)}; "
              f"{args.doc_tokens}-token documents in rows of {seq_len}, in-process data)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
