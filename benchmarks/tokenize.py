"""Throughput of the tokenize job on the German man pages, against baselines measured in the same run.

    python benchmarks/tokenize.py [--cores 2] [--rounds 3] [--repeat 4]

Rows (MB of UTF-8 text per second; the best of `--rounds` where marked, as the machine is shared):
  raw encode, whole documents    SentencePieceProcessor.encode(texts, num_threads=1), in this process (best)
  cores x raw (ideal)            perfect scaling of the first row: the baseline of the target
  raw encode, numpy out          the same call with out_type="numpy", as the job calls it (best)
  cores processes, no Ray        `cores` processes each encoding an even share of the bytes with the first
                                 row's call, timed from the first start to the last end (process start and
                                 model load untimed): what this machine gives to plain parallel encoding,
                                 with no scheduler at all (best)
  datasets.map(num_proc)         Hugging Face `datasets` map with the same encode, 1 and `cores` processes (best)
                                 (skipped with a message when `datasets` is not installed)
  job, first after ray.init      the whole `pipeline.tokenize` job (`tokenize()` wall time: plan, read,
                                 encode, write shards, commit) on a local Ray with `cores` CPUs, started
                                 just before and untimed; includes Ray Data's one-time start in the workers
                                 (importing ray.data, its stats actor), which every new job pays
  job, again (warm)              the same job once those workers are up (best)
  job, corpus x K (warm)         the same on the corpus concatenated `--repeat` times into one JSONL file

A second table runs the same job with a byte-level BPE Hugging Face folder (Llama 3 layout, 8k tokens,
trained once on the German pages: data/bench-de-bpe/), against `tokenizers`' own `encode_batch` on all
cores (the Rust library's thread pool: the target's baseline) and `datasets.map(num_proc=cores)` with the
same tokenizer (targets: the job >= 0.7 of the former, >= 2x the latter). A third measures extension of
English man pages' tokenizers to German and to Russian man pages (`--new-langs`), for a byte-level BPE
folder and a SentencePiece folder (English bases of 8k trained once on `--english-pages` pages:
data/bench-manpages-en-N-{bpe,sentencepiece}/; `--new-pieces` pieces added), a row per setting: the default and
`--keep-old-encoding`. Each row: the new language's bytes per token (target: at least 25% better),
English's (at most 1% worse), the English held-out lines whose ids changed (with --keep-old-encoding: 0 up
to what its sample missed), the pieces it blocked, and the seconds the extension took. `--skip` leaves
sections out.

After the first table: Ray Data's fixed cost on this machine, the time of an empty job of the job's shape
(`cores` blocks, one fused map stage, order preserved, blocks pulled by the driver), and the best
job / (cores x raw) that any job paying it could reach: ideal time / (ideal time + that cost), and
ideal time / (no-Ray time + that cost) when the encoding runs only as fast as it does in plain processes.

The job's tokens are checked against the first row's ids (per document, per split) before any figure is
printed. The corpus is rendered once into data/manpages-de.jsonl and a unigram tokenizer trained once on
it (data/bench-de-unigram.model); both are cached, data/ is gitignored.
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
import multiprocessing  # noqa: E402
import shutil  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import ray  # noqa: E402
import sentencepiece as spm  # noqa: E402

from pipeline.corpora.manpages import ManpagesConfig, build_corpus  # noqa: E402
from pipeline.dataset import TokenDataset  # noqa: E402
from pipeline.ray_runtime import init_ray  # noqa: E402
from pipeline.tokenize import TokenizeConfig, is_validation, tokenize  # noqa: E402
from pipeline.tokenizer.extend import ExtendConfig, extend_tokenizer  # noqa: E402
from pipeline.tokenizer.load import load_tokenizer  # noqa: E402
from pipeline.tokenizer.train import TokenizerTrainConfig, train_tokenizer  # noqa: E402

SECTIONS = ("sentencepiece", "bpe", "extend")


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


def timed(fn) -> tuple[float, object]:
    started = time.perf_counter()
    result = fn()
    return time.perf_counter() - started, result


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

    seconds, _ = timed(lambda: table.map(encode, batched=True, num_proc=num_proc if num_proc > 1 else None,
                                         keep_in_memory=True))
    return seconds


def _encode_share_at_barrier(model: str, texts: list[str], barrier, results) -> None:
    processor = spm.SentencePieceProcessor(model_file=model)
    barrier.wait()  # every process has its model and its share: start together
    started = time.perf_counter()  # CLOCK_MONOTONIC: comparable across processes
    processor.encode(texts, num_threads=1)
    results.put((started, time.perf_counter()))


def even_shares(texts: list[str], parts: int) -> list[list[str]]:
    """Consecutive documents in `parts` shares of about equal bytes, as the job's blocks are cut."""
    sizes = [len(t.encode("utf-8")) for t in texts]
    total, shares, running = sum(sizes), [[] for _ in range(parts)], 0
    for text, size in zip(texts, sizes):
        shares[min(parts - 1, running * parts // max(total, 1))].append(text)
        running += size
    return shares


def processes_no_ray(model: Path, shares: list[list[str]]) -> float:
    """Seconds from the first process starting to encode to the last one finishing."""
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(len(shares)), context.Queue()
    processes = [context.Process(target=_encode_share_at_barrier, args=(str(model), share, barrier, results))
                 for share in shares]
    for process in processes:
        process.start()
    spans = [results.get() for _ in processes]
    for process in processes:
        process.join()
    return max(end for _, end in spans) - min(start for start, _ in spans)


def _passthrough(batch):
    return batch


def ray_data_floor(cores: int) -> float:
    """Seconds of an empty Ray Data job shaped like the tokenize job (see the module docstring)."""
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True
    empty = ray.data.range(cores, override_num_blocks=cores, concurrency=cores).map_batches(
        _passthrough, batch_format="pyarrow", compute=ray.data.TaskPoolStrategy(size=cores))
    seconds, _ = timed(lambda: sum(1 for _ in empty.iter_batches(batch_size=None, batch_format="pyarrow")))
    return seconds


def run_job(corpus: Path, model: Path, out: Path, cores: int) -> float:
    config = TokenizeConfig(inputs=[str(corpus)], tokenizer=model, out=out, overwrite=True, workers=cores)
    seconds, _ = timed(lambda: tokenize(config))
    return seconds


def check_tokens(out: Path, texts: list[str], ids: list[list[int]]) -> str:
    """The job's documents must be the whole-document encodings, split as the job splits them."""
    ds = TokenDataset(out, verify="full")
    prefix, eos = [ds.tokenizer.bos_id] if ds.tokenizer.add_bos else [], ds.tokenizer.eos_id
    expected = {"train": [], "val": []}
    for text, doc in zip(texts, ids):
        if doc:
            held_out = is_validation(text.encode("utf-8"), ds.manifest["seed"], ds.manifest["val_fraction"])
            expected["val" if held_out else "train"].append(prefix + doc + [eos])
    for split, docs in expected.items():
        got = [d.tolist() for d in ds.splits[split].documents()]
        if got != docs:
            first = next((i for i, (a, b) in enumerate(zip(got, docs)) if a != b), min(len(got), len(docs)))
            raise SystemExit(f"{split}: the job's tokens differ from whole-document encoding at document {first}")
    return f"tokens identical to whole-document encode ({sum(map(len, expected.values()))} documents)"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--rounds", type=int, default=3, help="repeat the fast rows, keep the best")
    parser.add_argument("--repeat", type=int, default=4, help="K for the concatenated-corpus row (0: skip)")
    parser.add_argument("--data", type=Path, default=Path(REPO) / "data")
    parser.add_argument("--skip", nargs="*", choices=SECTIONS, default=[], help="sections to leave out")
    parser.add_argument("--new-langs", nargs="+", default=["de", "ru"], help="extension: the new languages' man pages")
    parser.add_argument("--new-pieces", type=int, default=3000, help="extension: pieces added per extension")
    parser.add_argument("--english-pages", type=int, default=1500,
                        help="extension: English man pages rendered for the bases and the old text (0: all)")
    args = parser.parse_args()
    args.data.mkdir(parents=True, exist_ok=True)
    corpus, model, texts = prepare(args.data, args.cores)
    megabytes = sum(len(t.encode("utf-8")) for t in texts) / 1e6
    init_ray(num_cpus=args.cores)  # Ray start-up is not part of any job's time
    if "sentencepiece" not in args.skip:
        sentencepiece_table(args, corpus, model, texts, megabytes)
    if "bpe" not in args.skip:
        bpe_table(args, corpus, texts, megabytes)
    if "extend" not in args.skip:
        extension_table(args, corpus)
    return 0


def sentencepiece_table(args: argparse.Namespace, corpus: Path, model: Path, texts: list[str], megabytes: float) -> None:
    print(f"corpus: {len(texts)} German man pages, {megabytes:.1f} MB; tokenizer: {model.name}; cores: {args.cores}")

    processor = spm.SentencePieceProcessor(model_file=str(model))
    out = args.data / "bench-de-tokens"
    cold = megabytes / run_job(corpus, model, out, args.cores)
    ids = processor.encode(texts, num_threads=1)
    print(check_tokens(out, texts, ids))
    best: dict[str, float] = {}  # MB/s, the best of the rounds

    def measure(name: str, seconds: float | None) -> None:
        if seconds is not None:
            best[name] = max(best.get(name, 0.0), megabytes / seconds)

    map_procs = sorted({1, args.cores})
    no_ray = f"{args.cores} processes, no Ray"
    shares = even_shares(texts, args.cores)
    floor = float("inf")
    for _ in range(args.rounds):
        measure("raw encode, whole documents", timed(lambda: processor.encode(texts, num_threads=1))[0])
        measure("raw encode, numpy out", timed(lambda: processor.encode(texts, num_threads=1, out_type="numpy"))[0])
        measure(no_ray, processes_no_ray(model, shares))
        for num_proc in map_procs:
            measure(f"datasets.map(num_proc={num_proc})", datasets_map(model, texts, num_proc))
        measure("job, again (warm)", run_job(corpus, model, out, args.cores))
        floor = min(floor, ray_data_floor(args.cores))
    raw, warm, best_map = best["raw encode, whole documents"], best["job, again (warm)"], best.get(
        f"datasets.map(num_proc={args.cores})")
    if best_map is None:
        print("datasets is not installed: no datasets.map rows (pip install datasets)")
    rows = [("raw encode, whole documents", raw)]
    rows.append((f"{args.cores} x raw (ideal)", args.cores * raw))
    rows += [("raw encode, numpy out", best["raw encode, numpy out"]), (no_ray, best[no_ray])]
    rows += [(name, rate) for name, rate in best.items() if name.startswith("datasets.map")]
    rows += [("job, first after ray.init", cold), ("job, again (warm)", warm)]
    if args.repeat > 1:
        big = args.data / f"manpages-de-x{args.repeat}.jsonl"
        big.write_bytes(corpus.read_bytes() * args.repeat)
        big_out = args.data / "bench-de-tokens-big"
        rows.append((f"job, corpus x {args.repeat} ({megabytes * args.repeat:.0f} MB, warm)",
                     megabytes * args.repeat / run_job(big, model, big_out, args.cores)))
        big.unlink()
        shutil.rmtree(big_out)

    print(f"{'method':40s} {'MB/s':>7s} {'/ cores x raw':>14s} {'/ datasets.map':>15s}")
    for name, rate in rows:
        vs_map = f"{rate / best_map:15.2f}" if best_map else f"{'-':>15s}"
        print(f"{name:40s} {rate:7.2f} {rate / (args.cores * raw):14.2f} {vs_map}")
    ideal = args.cores * raw
    verdict = [f"job / (cores x raw) = {warm / ideal:.2f} warm, {cold / ideal:.2f} first (target >= 0.8)"]
    if best_map:
        verdict.append(f"job / datasets.map({args.cores}) = {warm / best_map:.2f} warm, {cold / best_map:.2f} first "
                       "(target >= 2)")
    verdict.append(f"job / {no_ray} = {warm / best[no_ray]:.2f}")
    print("; ".join(verdict))
    ideal_seconds, no_ray_seconds = megabytes / ideal, megabytes / best[no_ray]
    print(f"Ray Data's fixed cost: an empty job of the same shape takes {floor:.3f} s (best); the ideal "
          f"takes {ideal_seconds:.3f} s, so no Ray Data job here can pass "
          f"{ideal_seconds / (ideal_seconds + floor):.2f} of cores x raw on this corpus, and on top of the "
          f"no-Ray encoding ({no_ray_seconds:.3f} s) not "
          f"{ideal_seconds / (no_ray_seconds + floor):.2f}")


def cached_tokenizer(folder: Path, corpus: Path, kind: str, vocab_size: int) -> Path:
    if not folder.exists():
        train_tokenizer(TokenizerTrainConfig(inputs=(str(corpus),), out=folder, vocab_size=vocab_size, kind=kind))
    return folder


def datasets_map_tokenizers(tokenizer_json: str, texts: list[str], num_proc: int) -> float:
    import datasets

    datasets.disable_progress_bars()
    table = datasets.Dataset.from_dict({"text": texts})

    def encode(batch, tokenizer=[]):  # one tokenizer per process, one thread each: num_proc is the parallelism
        if not tokenizer:
            from tokenizers import Tokenizer

            os.environ["TOKENIZERS_PARALLELISM"] = "false"
            tokenizer.append(Tokenizer.from_str(tokenizer_json))
        return {"ids": [e.ids for e in tokenizer[0].encode_batch_fast(batch["text"], add_special_tokens=False)]}

    seconds, _ = timed(lambda: table.map(encode, batched=True, num_proc=num_proc, keep_in_memory=True))
    return seconds


def bpe_table(args: argparse.Namespace, corpus: Path, texts: list[str], megabytes: float) -> None:
    from tokenizers import Tokenizer

    folder = cached_tokenizer(args.data / "bench-de-bpe", corpus, "bpe", 8000)
    spec = load_tokenizer(folder)
    tokenizer = Tokenizer.from_str(spec.encoder_data.decode("utf-8"))
    out = args.data / "bench-de-tokens-bpe"
    cold = megabytes / run_job(corpus, folder, out, args.cores)
    ids = [e.ids for e in tokenizer.encode_batch_fast(texts, add_special_tokens=False)]
    print(f"byte-level BPE folder {folder.name} ({spec.vocab_size} ids): {check_tokens(out, texts, ids)}")
    best: dict[str, float] = {}
    names = ("tokenizers encode_batch, all cores", f"datasets.map(num_proc={args.cores})", "job, again (warm)")
    for _ in range(args.rounds):
        for name, seconds in zip(names, (
            timed(lambda: tokenizer.encode_batch_fast(texts, add_special_tokens=False))[0],
            datasets_map_tokenizers(spec.encoder_data.decode("utf-8"), texts, args.cores),
            run_job(corpus, folder, out, args.cores),
        )):
            best[name] = max(best.get(name, 0.0), megabytes / seconds)
    baseline, mapped, warm = (best[name] for name in names)
    print(f"{'method (byte-level BPE tokenizer.json)':40s} {'MB/s':>7s} {'/ encode_batch':>14s} {'/ datasets.map':>15s}")
    for name, rate in [*best.items(), ("job, first after ray.init", cold)]:
        print(f"{name:40s} {rate:7.2f} {rate / baseline:14.2f} {rate / mapped:15.2f}")
    print(f"job / encode_batch = {warm / baseline:.2f} warm (target >= 0.7); job / datasets.map({args.cores}) = "
          f"{warm / mapped:.2f} warm (target >= 2)")


def man_pages(args: argparse.Namespace, lang: str) -> Path | None:
    """data/manpages-<lang>.jsonl, rendered once; None (with a message) when the language has no pages here."""
    from pipeline.corpora.manpages import NoPagesError

    limit = (args.english_pages or None) if lang == "en" else None
    corpus = args.data / (f"manpages-{lang}.jsonl" if limit is None else f"manpages-{lang}-{limit}.jsonl")
    if not corpus.exists():
        try:
            build_corpus(ManpagesConfig(lang=lang, out=corpus, limit=limit))
        except NoPagesError as e:
            print(f"no {lang} rows: {e}")
            return None
    return corpus


def extension_table(args: argparse.Namespace, german: Path) -> None:
    english = man_pages(args, "en")
    pages = {lang: german if lang == "de" else man_pages(args, lang) for lang in args.new_langs}
    for lang, corpus in pages.items():
        if corpus is not None:
            count = sum(1 for _ in corpus.open(encoding="utf-8"))
            print(f"{lang}: {count} man pages, {corpus.stat().st_size / 1e6:.1f} MB ({corpus.name})")
    print(f"en: {sum(1 for _ in english.open(encoding='utf-8'))} man pages, {english.stat().st_size / 1e6:.1f} MB; "
          f"{args.new_pieces} pieces added per extension")
    print(f"{'extension of English':38s} {'base ids':>9s} {'added':>6s} {'new B/tok':>15s} {'change':>7s} "
          f"{'en B/tok':>15s} {'change':>7s} {'en lines changed':>17s} {'blocked':>8s} {'s':>5s}")
    for kind in ("bpe", "sentencepiece"):
        base = cached_tokenizer(args.data / f"bench-{english.stem}-{kind}", english, kind, 8000)
        for lang, corpus in pages.items():
            for keep in (False, True):
                if corpus is None:
                    continue
                setting = "kept" if keep else "default"
                seconds, report = timed(lambda: extend_tokenizer(ExtendConfig(
                    base=base, inputs=(str(corpus),), old_inputs=(str(english),), new_pieces=args.new_pieces,
                    out=args.data / f"bench-en+{lang}-{kind}-{setting}", overwrite=True, keep_old_encoding=keep)))
                new, en = report["bytes_per_token"]["new_text"], report["bytes_per_token"]["old_text"]
                changed = report["old_text_changed_lines"]
                blocked = report["keep_old_encoding"]["pieces_blocked"] if keep else 0
                print(f"{f'{kind} folder -> {lang}, {setting}':38s} {report['base']['vocab_size']:9d} "
                      f"{report['pieces_added']:6d} {new['before']:6.3f} -> {new['after']:6.3f} {new['change']:+7.1%} "
                      f"{en['before']:6.3f} -> {en['after']:6.3f} {en['change']:+7.1%} "
                      f"{changed['changed']:>7d} ({changed['share']:.2%}) {blocked:8d} {seconds:5.0f}")
    print("targets: new-language bytes/token >= +25%, English >= -1%; kept: English lines changed 0 up to what "
          "the old sample missed")


if __name__ == "__main__":
    sys.exit(main())
