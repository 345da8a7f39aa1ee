"""Throughput of the mixer against MosaicML Streaming and litdata, on English and German man pages.

    .venv/bin/python benchmarks/stream.py [--work data/stream-bench] [--baseline-python /tmp/benchvenv/bin/python]
        [--only local|store] [--mosaic-python /tmp/benchvenv/bin/python]

Measures, all on the same tokens (seq_len 2048, global batch 8, mix old=0.25/new=0.75), single core:
  1. tokens/s of the in-process Mixer, one step per call (`batch`) and 64 steps per call (`batches`,
     what the service does for a range request), and of one StreamClient over HTTP on loopback;
  2. tokens/s of MosaicML Streaming (StreamingDataset, two Streams at the same proportions) and of
     litdata (CombinedStreamingDataset with weights), run with --baseline-python, a separate virtual
     environment that has them installed (their pins are not ours); the tokens are converted into
     their formats as windows of seq_len + 1 tokens, like ours;
  3. the service's resident memory serving the same steps from a 10x larger dataset, and the time of
     the batch at step 10**7 against step 10 (with a 100-stage schedule);
  4. object storage (issue 14, `--only store` alone): both datasets tiled --store-repeat times (one
     shard per copy, each copy's documents rotated so no two shards are equal) and put in a moto S3 server the benchmark starts on 127.0.0.1 as its own process;
     the mixer on `TokenDataset("s3://...", cache=...)` with a warm cache against the mixer on the
     same tokens on local disk, and cold (empty cache, timed from opening the datasets to the last of
     --store-steps batches) against MosaicML Streaming reading the same windows from the same server
     into an empty local folder (`benchmarks/mosaic_s3.py`, run with --mosaic-python, a separate
     virtual environment with mosaicml-streaming and boto3; skipped, saying why, without one).
Each figure is printed as a ratio to a baseline measured in the same run. On a shared machine the
rates swing with other load, so each reader is timed --rounds times, our three readers interleaved
round by round (and each baseline's rounds in its own process), and the best round of each counts.

The datasets are built with the real pipeline when it is in the tree (`pipeline.corpora.manpages`
renders English and German man pages to JSONL, `pipeline.tokenizer train` fits a BPE model on both,
`pipeline.tokenize` writes the token datasets); otherwise in-process, as tests/conftest.py does (man
pages rendered with man(1), a SentencePiece model, documents written with pipeline.dataset). Either
way they are built once per --work (default data/stream-bench, which git ignores) and reused.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Run as a script, this file's folder comes first on sys.path, and it holds benchmarks/tokenize.py,
# which would shadow the standard library's tokenize (linecache imports it): import from the root.
if sys.path and Path(sys.path[0]).resolve() == REPO / "benchmarks":
    sys.path[0] = str(REPO)

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

from pipeline.dataset import TokenDataset, build_manifest, commit_dataset, token_dtype, write_shard  # noqa: E402
from pipeline.tokenizer.load import load_tokenizer  # noqa: E402
from service.launcher import ServiceProcess  # noqa: E402
from benchmarks.stream_common import (  # noqa: E402
    GLOBAL_BATCH, ROW, SEQ_LEN, WEIGHTS, BenchConfig, in_process_batches, rate, windows_of,
)

CHUNK_STEPS = 64  # steps per Mixer.batches call in the chunked in-process figure
PIPELINE_MODULES = ("pipeline.corpora.manpages", "pipeline.tokenizer", "pipeline.tokenize")


def parse_args() -> BenchConfig:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=REPO / "data" / "stream-bench",
                        help="datasets, their MosaicML/litdata copies and state dirs (reused across runs)")
    parser.add_argument("--pages", type=int, default=300, help="man pages per language")
    parser.add_argument("--steps", type=int, default=300, help="steps timed per reader and round")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per reader; the best counts")
    parser.add_argument("--baseline-python", type=Path, default=Path("/tmp/benchvenv/bin/python"))
    parser.add_argument("--baseline", choices=("mosaic", "litdata"), help=argparse.SUPPRESS)
    parser.add_argument("--only", choices=("all", "local", "store"), default="all",
                        help="local: the mixer, HTTP and baselines on disk; store: the object-storage rows")
    parser.add_argument("--mosaic-python", type=Path, default=Path("/tmp/benchvenv/bin/python"),
                        help="an interpreter with mosaicml-streaming and boto3, for the cold S3 comparison")
    parser.add_argument("--store-repeat", type=int, default=8, help="copies (shards) of each dataset in S3")
    parser.add_argument("--store-steps", type=int, default=150, help="steps read per cold S3 round")
    parser.add_argument("--store-rounds", type=int, default=3, help="cold S3 rounds per reader; the best counts")
    a = parser.parse_args()
    return BenchConfig(a.work, a.pages, a.steps, a.rounds, a.baseline_python, a.baseline, a.only, a.mosaic_python,
                       a.store_repeat, a.store_steps, a.store_rounds)


# --- datasets -------------------------------------------------------------------------------------


def render_pages(folder: Path, count: int) -> list[str]:
    files = sorted(p for p in folder.iterdir() if p.name.endswith(".gz"))[:count]
    texts = []
    for path in tqdm(files, desc=f"render {folder}", unit="page"):
        man = subprocess.run(["man", "--nh", "--nj", "-l", "-Tutf8", str(path)], capture_output=True,
                             env={**os.environ, "MANWIDTH": "1000"})
        text = subprocess.run(["col", "-bx"], input=man.stdout, capture_output=True).stdout.decode("utf-8", "replace")
        if text.strip():
            texts.append(text)
    return texts


def write_dataset(out: Path, documents: list[str], model: Path, repeat: int = 1) -> None:
    import sentencepiece as spm

    spec = load_tokenizer(model)
    processor = spm.SentencePieceProcessor(model_file=str(model))
    dtype = token_dtype(spec.vocab_size)
    encoded = [np.asarray(sum(processor.encode(doc.split("\n")), []) + [spec.eos_id], dtype=dtype) for doc in documents]
    staging = out.with_name(out.name + ".staging")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    info = spec.stage_copy(staging)
    shards = [write_shard(staging, f"train-{i:05d}", encoded, dtype) for i in range(repeat)]
    val = [write_shard(staging, "val-00000", encoded[:2], dtype)]
    commit_dataset(staging, out, build_manifest(info, {"train": shards, "val": val}, inputs=["man pages"]), overwrite=True)


def build_in_process(config: BenchConfig, paths: dict[str, Path]) -> None:
    import sentencepiece as spm

    english = render_pages(Path("/usr/share/man/man1"), config.pages)
    german = render_pages(Path("/usr/share/man/de/man1"), config.pages)
    corpus = config.work / "corpus.txt"
    corpus.write_text("\n".join(english + german))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(config.work / "spm"), vocab_size=8000,
                                   model_type="bpe", num_threads=2, minloglevel=2, input_sentence_size=200_000,
                                   shuffle_input_sentence=True)
    model = config.work / "spm.model"
    write_dataset(paths["old"], english, model)
    write_dataset(paths["new"], german, model)
    write_dataset(paths["old10x"], english, model, repeat=10)


def run_module(*args: object) -> None:
    command = [sys.executable, "-m", *map(str, args)]
    print("$ " + " ".join(command[1:]), flush=True)
    if subprocess.run(command, cwd=REPO).returncode != 0:
        raise SystemExit(f"benchmarks/stream.py: `{' '.join(command[1:])}` failed; see its output above")


def build_with_pipeline(config: BenchConfig, paths: dict[str, Path]) -> None:
    corpora = config.work / "corpora"
    corpora.mkdir(parents=True, exist_ok=True)
    english, german = corpora / "manpages-en.jsonl", corpora / "manpages-de.jsonl"
    for lang, out in (("en", english), ("de", german)):
        if not out.exists():
            run_module("pipeline.corpora.manpages", "--lang", lang, "--out", out, "--limit", config.pages, "--num-cpus", 2)
    english_10x = corpora / "manpages-en-10x.jsonl"  # every English page ten times: 10x the tokens
    english_10x.write_text(english.read_text() * 10)
    model = config.work / "spm.model"
    run_module("pipeline.tokenizer", "train", "--input", english, german, "--out", model, "--vocab-size", 8000,
               "--num-cpus", 2, "--overwrite")
    for name, corpus in (("old", english), ("new", german), ("old10x", english_10x)):
        run_module("pipeline.tokenize", "--input", corpus, "--tokenizer", model, "--out", paths[name], "--num-cpus", 2,
                   "--overwrite")


def build_datasets(config: BenchConfig) -> tuple[dict[str, Path], str]:
    """The three datasets, and how they were made."""
    paths = {name: config.work / name for name in ("old", "new", "old10x")}
    use_pipeline = all(importlib.util.find_spec(module) is not None for module in PIPELINE_MODULES)
    how = "the pipeline" if use_pipeline else "in-process"
    if all((p / "manifest.json").exists() for p in paths.values()):
        return paths, f"cached in {config.work}"
    config.work.mkdir(parents=True, exist_ok=True)
    for stale in ("mosaic", "litdata"):  # copies of datasets that are about to be replaced
        shutil.rmtree(config.work / stale, ignore_errors=True)
    (build_with_pipeline if use_pipeline else build_in_process)(config, paths)
    return paths, f"built by {how} in {config.work}"


# --- readers ----------------------------------------------------------------------------------------


def mosaic_batches(paths: dict[str, Path], work: Path):
    import torch
    from streaming import MDSWriter, Stream, StreamingDataset

    streams = []
    for name, weight in WEIGHTS.items():
        out = work / "mosaic" / name
        if not (out / "index.json").exists():
            windows = windows_of(paths[name])
            with MDSWriter(out=str(out), columns={"tokens": f"ndarray:{windows.dtype.name}:{ROW}"}) as writer:
                for row in windows:
                    writer.write({"tokens": row})
        streams.append(Stream(local=str(out), proportion=weight))
    dataset = StreamingDataset(streams=streams, batch_size=GLOBAL_BATCH, shuffle=True, shuffle_seed=0,
                               epoch_size=10**6)
    while True:
        rows = []
        for sample in dataset:
            rows.append(sample["tokens"])
            if len(rows) == GLOBAL_BATCH:
                yield torch.from_numpy(np.stack(rows).astype(np.int64))
                rows = []


def litdata_batches(paths: dict[str, Path], work: Path):
    import torch
    from litdata import CombinedStreamingDataset, StreamingDataset, TokensLoader, optimize

    datasets = []
    for name in WEIGHTS:
        out = work / "litdata" / name
        if not (out / "index.json").exists():
            split = TokenDataset(paths[name]).train
            tokens = torch.from_numpy(split.read(0, split.num_tokens).astype(np.int32))
            optimize(fn=_identity, inputs=[tokens], output_dir=str(out), chunk_size=ROW * 64,
                     item_loader=TokensLoader(), num_workers=1)
        datasets.append(StreamingDataset(str(out), item_loader=TokensLoader(block_size=ROW), shuffle=True, seed=0))
    combined = CombinedStreamingDataset(datasets, weights=tuple(WEIGHTS.values()), seed=0, iterate_over_all=False)
    while True:
        rows = []
        for sample in combined:
            rows.append(sample)
            if len(rows) == GLOBAL_BATCH:
                yield torch.stack(rows).long()
                rows = []


def _identity(tokens):
    return tokens


class ServiceRun:
    """`python -m service` on the bench datasets (old = the 1x or the 10x dataset), on a fresh state dir."""

    def __init__(self, paths: dict[str, Path], work: Path, label: str):
        state = work / f"state-{label}"
        shutil.rmtree(state, ignore_errors=True)
        old = paths["old10x" if label == "10x" else "old"]
        self.service = ServiceProcess(
            [f"--dataset=old={old}", f"--dataset=new={paths['new']}", "--weights=old=0.25,new=0.75",
             f"--seq-len={SEQ_LEN}", f"--global-batch={GLOBAL_BATCH}", f"--state-dir={state}",
             "--allow-anonymous-reads"], log=work / f"service-{label}.log").start()
        self.url = self.service.url

    def batches(self):
        import torch

        from service.client import StreamClient

        client = StreamClient(self.url, retry_for=60)
        try:
            for batch in client:
                yield torch.from_numpy(batch.tokens)
        finally:
            client.close()

    def memory(self) -> tuple[int, int]:
        """(VmRSS, RssAnon) in bytes."""
        status = Path(f"/proc/{self.service.proc.pid}/status").read_text()
        fields = dict(line.split(":", 1) for line in status.splitlines())
        return int(fields["VmRSS"].split()[0]) * 1024, int(fields["RssAnon"].split()[0]) * 1024

    def stop(self) -> None:
        self.service.stop()


def random_access_ratio(paths: dict[str, Path], repeats: int = 50) -> float:
    from service.mixer import Mixer, MixerConfig
    from service.mix_schedule import MixSchedule, Stage

    schedule = MixSchedule.constant(WEIGHTS)
    for i in range(1, 100):
        schedule = schedule.appended(Stage(i * 100_000, {"old": i % 10 + 1, "new": 10}))
    mixer = Mixer({n: TokenDataset(paths[n]) for n in WEIGHTS}, MixerConfig(SEQ_LEN, GLOBAL_BATCH), schedule)

    def median_seconds(step: int) -> float:
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            mixer.batch(step)
            times.append(time.perf_counter() - started)
        return float(np.median(times))

    median_seconds(10), median_seconds(10**7)  # warm the page cache for both
    return median_seconds(10**7) / median_seconds(10)


def run_baseline(config: BenchConfig) -> None:
    paths = {name: config.work / name for name in WEIGHTS}
    make = {"mosaic": mosaic_batches, "litdata": litdata_batches}[config.baseline]
    best = max(rate(lambda: make(paths, config.work), config.steps) for _ in range(config.rounds))
    print(json.dumps({"tokens_per_s": best}))


def baseline_rate(config: BenchConfig, name: str) -> float | None:
    if config.baseline_python is None or not config.baseline_python.exists():
        print(f"{name}: skipped, no --baseline-python at {config.baseline_python}")
        return None
    result = subprocess.run(
        [str(config.baseline_python), __file__, "--baseline", name, "--work", str(config.work), "--steps", str(config.steps),
         "--rounds", str(config.rounds)],
        capture_output=True, text=True, cwd=REPO,
    )
    if result.returncode != 0:
        print(f"{name}: failed ({result.stderr.strip().splitlines()[-1] if result.stderr.strip() else result.returncode})")
        return None
    return json.loads(result.stdout.strip().splitlines()[-1])["tokens_per_s"]


def main() -> None:
    config = parse_args()
    if config.baseline:
        return run_baseline(config)
    paths, made = build_datasets(config)
    sizes = {name: TokenDataset(p).train.num_tokens for name, p in paths.items()}
    print(f"datasets ({made}): {sizes} tokens; seq_len {SEQ_LEN}, global batch {GLOBAL_BATCH}, mix {WEIGHTS}; "
          f"best of {config.rounds} rounds of {config.steps} steps")
    if config.only in ("all", "local"):
        local_rows(config, paths)
    if config.only in ("all", "store"):
        from benchmarks.stream_store import store_rows  # its S3 libraries only when asked for

        store_rows(config, paths)


def local_rows(config: BenchConfig, paths: dict[str, Path]) -> None:
    """Sections 1-3: the mixer in process and over HTTP, the baselines on local disk, memory, far steps."""
    memory: dict[str, int] = {}
    service = ServiceRun(paths, config.work, "1x")
    try:
        readers = {"batch": lambda: in_process_batches(paths), "batches": lambda: in_process_batches(paths, CHUNK_STEPS),
                   "http": service.batches}
        rates: dict[str, list[float]] = {name: [] for name in readers}
        for _ in tqdm(range(config.rounds), desc="rounds", unit="round"):
            for name, make in readers.items():
                rates[name].append(rate(make, config.steps))
        memory["1x"], memory["1x anon"] = service.memory()
    finally:
        service.stop()
    service = ServiceRun(paths, config.work, "10x")
    try:
        rate(service.batches, config.steps)
        memory["10x"], memory["10x anon"] = service.memory()
    finally:
        service.stop()
    per_step, chunked, client_rate = (max(rates[name]) for name in ("batch", "batches", "http"))
    mosaic, litdata = baseline_rate(config, "mosaic"), baseline_rate(config, "litdata")
    ratio = random_access_ratio(paths)
    best = max(r for r in (mosaic, litdata, 0.0) if r is not None)
    print(f"in-process mixer, batch()          {per_step / 1e6:8.2f} M tokens/s")
    print(f"in-process mixer, batches({CHUNK_STEPS} steps) {chunked / 1e6:8.2f} M tokens/s")
    print(f"StreamClient/HTTP                  {client_rate / 1e6:8.2f} M tokens/s  ({client_rate / per_step:.2f}x batch(), "
          f"{client_rate / chunked:.2f}x batches(); target >= 0.5)")
    for name, value in (("MosaicML Streaming", mosaic), ("litdata", litdata)):
        if value is not None:
            print(f"{name:34} {value / 1e6:8.2f} M tokens/s  (in-process mixer is {per_step / value:.2f}x per step, "
                  f"{chunked / value:.2f}x chunked; HTTP is {client_rate / value:.2f}x)")
    # VmRSS also counts the memory-mapped dataset pages a run happens to touch (page cache, shared,
    # reclaimable); RssAnon is the service's own memory, which must not grow with the dataset.
    print(f"service RSS        {memory['1x'] / 2**20:.1f} MiB (1x) vs {memory['10x'] / 2**20:.1f} MiB (10x old dataset): "
          f"{memory['10x'] / memory['1x']:.3f}x; anonymous {memory['1x anon'] / 2**20:.1f} vs "
          f"{memory['10x anon'] / 2**20:.1f} MiB: {memory['10x anon'] / memory['1x anon']:.3f}x (target <= 1.10)")
    print(f"batch at step 1e7 vs step 10 (100 stages): {ratio:.2f}x")
    vs_best = (f"{per_step / best:.2f}x/{chunked / best:.2f}x/{client_rate / best:.2f}x" if best else "n/a")
    print(
        f"summary: mixer {per_step / 1e6:.2f} M tok/s per step, {chunked / 1e6:.2f} chunked; http {client_rate / 1e6:.2f} "
        f"M tok/s = {client_rate / per_step:.2f}x per step, {client_rate / chunked:.2f}x chunked; "
        f"vs best baseline (step/chunk/http) {vs_best}, rss 10x/1x {memory['10x'] / memory['1x']:.3f} "
        f"(anon {memory['10x anon'] / memory['1x anon']:.3f}), step 1e7/10 {ratio:.2f}x"
    )


if __name__ == "__main__":
    main()
