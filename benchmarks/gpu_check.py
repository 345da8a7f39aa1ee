"""The GPU check of issue 13: tokens/s and MFU of a ~125M and a ~1.1B Llama-family model continued by the
trainer (`python -m trainer --init-from hf:...`, bf16 weights, torch.compile, SDPA attention), fed in-process
and by the HTTP stream; the data wait share; that a resume after a kill reproduces the next 10 steps'
losses; peak memory. One table at the end. Targets: MFU >= 45% at 1B on an H100/H200, data wait < 1%.
Issue 26's rows: the ~125M in-process again with --document-masking (step-time cost of the block mask) and
the ~1.1B in-process again with --activation-checkpointing (peak memory and step-time cost), each to read
against its size's plain in-process row.

    benchmarks/gpu_check.sh              # on a CUDA machine, about 10 minutes on one H100/H200 (not run yet)
    benchmarks/gpu_check.sh --dry-run    # tiny models on the CPU: the same path end to end, in about a minute

Everything is made here: random-weight models from configs (`save_pretrained`), a word-level tokenizer
of the model's vocabulary, a token dataset of random ids. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.train_throughput import PEAK_BF16_TFLOPS  # noqa: E402

VOCAB = 32000


@dataclass(frozen=True)
class Size:
    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    seq_len: int
    global_batch: int
    micro_batch: int
    steps: int


GPU_SIZES = (
    Size("125M", 768, 12, 12, 12, 2048, 2048, 32, 16, 40),
    Size("1.1B", 2048, 22, 32, 4, 5632, 2048, 16, 8, 30),  # the TinyLlama shape
)
# Issue 26: a size's in-process run again with one flag, to read against its plain in-process row.
VARIANTS = {0: ("in-process +doc-masking", "--document-masking"),
            1: ("in-process +act-ckpt", "--activation-checkpointing")}
DRY_SIZES = (Size("tiny-a", 64, 2, 4, 2, 128, 64, 8, 4, 12), Size("tiny-b", 96, 2, 4, 4, 192, 64, 8, 4, 12))


def make_model(folder: Path, size: Size, tokenizer_dir: Path) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=size.hidden, num_hidden_layers=size.layers,
                         num_attention_heads=size.heads, num_key_value_heads=size.kv_heads,
                         intermediate_size=size.intermediate, max_position_embeddings=size.seq_len,
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(folder)
    return folder


def make_tokenizer(folder: Path) -> Path:
    """A word-level tokenizer of VOCAB pieces: the data is random ids, so only the vocabulary size matters."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(folder)
    return folder


def make_dataset(folder: Path, tokenizer_dir: Path, tokens: int) -> Path:
    from pipeline.dataset import build_manifest, commit_dataset, token_dtype, write_shard
    from pipeline.tokenizer.load import load_tokenizer

    staging = folder.with_name(folder.name + ".staging")
    staging.mkdir(parents=True)
    info = load_tokenizer(tokenizer_dir).stage_copy(staging)
    dtype = token_dtype(info.vocab_size)
    rng = np.random.default_rng(0)
    docs = [rng.integers(3, VOCAB, size=2000).astype(dtype) for _ in range(max(tokens // 2000, 2))]
    for doc in docs:
        doc[-1] = info.eos_id
    shards = {"train": [write_shard(staging, "train-00000", docs, dtype)],
              "val": [write_shard(staging, "val-00000", docs[:2], dtype)]}
    commit_dataset(staging, folder, build_manifest(info, shards))
    return folder


def trainer(args: list[str], **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "trainer", *args], cwd=REPO, **popen)


def train_records(run: Path) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines() if (run / "metrics.jsonl").exists() else []
    return [r for r in map(json.loads, lines) if r["kind"] == "train"]


def run_trainer(args: list[str], log: Path) -> None:
    with log.open("w") as out:
        code = trainer(args, stdout=out, stderr=subprocess.STDOUT).wait()
    if code != 0:
        raise SystemExit(f"the trainer failed ({code}); its output:\n{log.read_text()[-4000:]}")


def steady(records: list[dict], skip: int) -> tuple[float, float, float]:
    """(tokens/s, data wait share, peak GiB) over the train records after the first `skip` (compilation)."""
    kept = records[skip:] or records
    return (float(np.median([r["tokens_per_s"] for r in kept])), float(np.mean([r["data_wait_share"] for r in kept])),
            max(r.get("max_memory_gib", float("nan")) for r in records))


def flops_per_token(model_dir: Path, seq_len: int) -> float:
    from transformers import AutoConfig, AutoModelForCausalLM

    from trainer.hf_model import HFCausalLM

    with torch.device("meta"):  # counts only: no memory, no time
        model = HFCausalLM(AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir)))
    return model.flops_per_token(seq_len)


def resume_reproduces(base: list[str], work: Path) -> str:
    """Train 20 steps straight; train the same again, SIGKILL it after its step-10 checkpoint, resume; the
    losses of steps 11..20 must be equal to the bit."""
    straight, killed = work / "straight", work / "killed"
    run_trainer([*base, "--steps", "20", "--checkpoint-every", "10", "--out", str(straight)], work / "straight.log")
    with (work / "killed.log").open("w") as out:
        proc = trainer([*base, "--steps", "20", "--checkpoint-every", "10", "--out", str(killed)],
                       stdout=out, stderr=subprocess.STDOUT)
        while proc.poll() is None and not any(r["step"] >= 12 for r in train_records(killed)):
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    done = max((r["step"] for r in train_records(killed)), default=0)
    if done >= 20:
        return "not checked: the run finished before the kill"
    resumed = [a for a in base if not a.startswith("hf:") and a != "--init-from"]
    run_trainer([*resumed, "--steps", "20", "--checkpoint-every", "10", "--out", str(killed), "--resume"],
                work / "resumed.log")
    expect = {r["step"]: r["loss"] for r in train_records(straight) if r["step"] > 10}
    got = {r["step"]: r["loss"] for r in train_records(killed) if r["step"] > 10}
    return "yes (bit-exact)" if got == expect and len(got) == 10 else f"NO: {got} != {expect}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="tiny models on the CPU, no compile: the path end to end")
    p.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak (looked up for known GPUs)")
    args = p.parse_args()
    if not args.dry_run and not torch.cuda.is_available():
        build = f"a CPU-only build ({torch.__version__})" if torch.version.cuda is None else \
            f"torch {torch.__version__} for CUDA {torch.version.cuda}, but no visible GPU"
        print(f"gpu_check: no CUDA device: {build}. Run it on a machine with a GPU and a CUDA build of torch, or "
              "`benchmarks/gpu_check.sh --dry-run` for the CPU path.", file=sys.stderr)
        return 2
    sizes = DRY_SIZES if args.dry_run else GPU_SIZES
    device = ["--device", "cpu"] if args.dry_run else ["--device", "cuda", "--compile"]
    peak = args.peak_tflops
    if peak is None and not args.dry_run:
        name = torch.cuda.get_device_name()
        peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    from service.launcher import ServiceProcess, free_port

    rows = []
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as scratch:
        work = Path(scratch)
        tokenizer_dir = make_tokenizer(work / "tokenizer")
        for size in sizes:
            data = make_dataset(work / f"data-{size.name}", tokenizer_dir,
                                tokens=size.global_batch * (size.seq_len + 1) * (size.steps + 4))
            model_dir = make_model(work / f"model-{size.name}", size, tokenizer_dir)
            common = ["--init-from", f"hf:{model_dir}", "--dtype", "bfloat16", *device, "--steps", str(size.steps),
                      "--micro-batch", str(size.micro_batch), "--eval-every", str(size.steps), "--eval-batches", "1",
                      "--log-every", "1", "--checkpoint-every", str(size.steps), "--no-progress",
                      "--max-lr", "3e-4", "--warmup-steps", "2"]
            flops = flops_per_token(model_dir, size.seq_len)
            variant = VARIANTS.get(sizes.index(size))
            for path in ("in-process", "stream", *([variant[0]] if variant else [])):
                run = work / f"run-{size.name}-{path}"
                if path != "stream":
                    flags = [variant[1]] if path != "in-process" else []
                    run_trainer([*common, *flags, "--dataset", f"data={data}", "--seq-len", str(size.seq_len),
                                 "--global-batch", str(size.global_batch), "--out", str(run)], work / f"{run.name}.log")
                else:
                    token = work / "read-token"
                    token.write_text("gpu-check-read-token\n")
                    service_args = [f"--dataset=data={data}", f"--seq-len={size.seq_len}",
                                    f"--global-batch={size.global_batch}", f"--state-dir={work / f'state-{size.name}'}",
                                    f"--read-token-file={token}", "--weights=data=1"]
                    with ServiceProcess(service_args, free_port()) as service:
                        run_trainer([*common, "--stream", service.url, "--stream-token-file", str(token),
                                     "--out", str(run)], work / f"{run.name}.log")
                tokens_s, wait, memory = steady(train_records(run), skip=min(5, size.steps // 3))
                mfu = f"{tokens_s * flops / (peak * 1e12):.1%}" if peak else "n/a"
                rows.append((size.name, path, f"{tokens_s:,.0f}", mfu, f"{wait:.2%}", f"{memory:.1f}"))
        small = sizes[0]
        data = work / f"data-{small.name}"
        # Eager: the check is about the checkpoint's exactness, and three compilations would cost minutes.
        eager = [a for a in device if a != "--compile"]
        base = ["--init-from", f"hf:{work / f'model-{small.name}'}", "--dtype", "bfloat16", *eager,
                "--micro-batch", str(small.micro_batch), "--eval-every", "1000", "--eval-batches", "1",
                "--no-progress", "--dataset", f"data={data}", "--seq-len", str(small.seq_len),
                "--global-batch", str(small.global_batch)]
        resume = resume_reproduces(base, work)

    where = "CPU dry run (tiny models, no compile: numbers mean nothing)" if args.dry_run else \
        f"{torch.cuda.get_device_name()}, peak {peak} TFLOP/s bf16"
    header = ("model", "data path", "tokens/s", "MFU", "data wait", "peak GiB")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    print(f"\ngpu_check on {where}; targets: MFU >= 45% at 1.1B, data wait < 1%")
    for row in [header, *rows]:
        print("  ".join(str(v).ljust(w) for v, w in zip(row, widths)))
    print(f"resume after SIGKILL reproduces steps 11-20 of {sizes[0].name}: {resume}")
    return 0 if resume.startswith("yes") else 1


if __name__ == "__main__":
    sys.exit(main())
