"""Throughput of the tokenize job on the German man pages, against baselines measured in the same run.

    python benchmarks/tokenize.py [--cores 2]

Rows (MB of UTF-8 text per second):
  raw encode, 1 thread     SentencePieceProcessor.encode(texts, num_threads=1), in this process
  cores x raw              the ceiling for perfect scaling
  datasets.map(num_proc)   Hugging Face `datasets` map with the same encode, 1 and `cores` processes
                           (skipped with a message when `datasets` is not installed)
  pipeline.tokenize        the whole job on a local Ray with `cores` CPUs; Ray start-up excluded,
                           reading, encoding, writing shards and the manifest included

The corpus is rendered once into data/manpages-de.jsonl and a unigram tokenizer trained once on it
(data/bench-de-unigram.model); both are cached, data/ is gitignored.
"""

from __future__ import annotations

import os
import sys

# Run as a script, this file's folder leads sys.path and this file would shadow the standard library's
# `tokenize` (imported by linecache, inspect, ...): put the repository there instead.
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[0] = REPO

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import sentencepiece as spm  # noqa: E402

from pipeline.corpora.manpages import ManpagesConfig, build_corpus  # noqa: E402
from pipeline.ray_runtime import init_ray  # noqa: E402
from pipeline.tokenize import TokenizeConfig, tokenize  # noqa: E402


def prepare(data: Path, cores: int) -> tuple[Path, Path, list[str]]:
    corpus = data / "manpages-de.jsonl"
    if not corpus.exists():
        init_ray(num_cpus=cores)
        build_corpus(ManpagesConfig(lang="de", out=corpus))
    texts = [json.loads(line)["text"] for line in corpus.open(encoding="utf-8")]
    model = data / "bench-de-unigram.model"
    if not model.exists():
        sample = data / "bench-de-sample.txt"
        sample.write_text("\n".join(texts), encoding="utf-8")
        spm.SentencePieceTrainer.train(
            input=str(sample), model_prefix=str(model.with_suffix("")), vocab_size=8000, model_type="unigram",
            input_sentence_size=200_000, shuffle_input_sentence=True, num_threads=cores, minloglevel=2,
        )
        sample.unlink()
    return corpus, model, texts


def raw_encode(model: Path, texts: list[str]) -> float:
    processor = spm.SentencePieceProcessor(model_file=str(model))
    started = time.perf_counter()
    processor.encode(texts, num_threads=1)
    return time.perf_counter() - started


def datasets_map(model: Path, texts: list[str], num_proc: int) -> float | None:
    try:
        import datasets
    except ImportError:
        return None
    datasets.disable_progress_bars()
    table = datasets.Dataset.from_dict({"text": texts})

    def encode(batch, processor=[]):  # one processor per process, loaded on first use
        if not processor:
            processor.append(spm.SentencePieceProcessor(model_file=str(model)))
        return {"ids": processor[0].encode(batch["text"], num_threads=1)}

    started = time.perf_counter()
    table.map(encode, batched=True, num_proc=num_proc if num_proc > 1 else None, keep_in_memory=True)
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--data", type=Path, default=Path(REPO) / "data")
    args = parser.parse_args()
    args.data.mkdir(parents=True, exist_ok=True)
    corpus, model, texts = prepare(args.data, args.cores)
    megabytes = sum(len(t.encode("utf-8")) for t in texts) / 1e6
    print(f"corpus: {len(texts)} German man pages, {megabytes:.1f} MB; tokenizer: {model.name}; cores: {args.cores}")

    raw = megabytes / raw_encode(model, texts)
    rows = [("raw encode, 1 thread", raw), (f"{args.cores} x raw (ideal)", args.cores * raw)]
    maps = {}
    for num_proc in sorted({1, args.cores}):
        seconds = datasets_map(model, texts, num_proc)
        if seconds is None:
            print("datasets is not installed: skipping the datasets.map rows (pip install datasets)")
            break
        maps[num_proc] = megabytes / seconds
        rows.append((f"datasets.map(num_proc={num_proc})", maps[num_proc]))

    init_ray(num_cpus=args.cores)  # start-up is not part of the job's time
    _, stats = tokenize(
        TokenizeConfig(inputs=[str(corpus)], tokenizer=model, out=args.data / "bench-de-tokens", overwrite=True,
                       workers=args.cores)
    )
    job = stats.text_bytes / 1e6 / stats.seconds
    rows.append(("pipeline.tokenize (Ray Data)", job))

    print(f"{'method':34s} {'MB/s':>7s} {'/ cores x raw':>14s} {'/ datasets.map':>15s}")
    best_map = maps.get(args.cores)
    for name, rate in rows:
        vs_map = f"{rate / best_map:15.2f}" if best_map else f"{'-':>15s}"
        print(f"{name:34s} {rate:7.2f} {rate / (args.cores * raw):14.2f} {vs_map}")
    print(stats.summary(args.data / "bench-de-tokens"))
    verdict = [f"job / (cores x raw) = {job / (args.cores * raw):.2f} (target >= 0.8)"]
    if best_map:
        verdict.append(f"job / datasets.map({args.cores}) = {job / best_map:.2f} (target >= 2)")
    print("; ".join(verdict))
    return 0


if __name__ == "__main__":
    sys.exit(main())
