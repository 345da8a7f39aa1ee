"""`python -m pipeline.tokenizer train`: a SentencePiece model from a hash-chosen sample of a corpus.

Reading and sampling run on Ray Data (see `sample.py`), so the corpus can be far larger than the
driver's memory; SentencePiece then trains on the sample, which is all it needs.
"""

from __future__ import annotations

import io
import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import sentencepiece as spm

from pipeline.atomic_file import write_atomically
from pipeline.ray_runtime import init_ray
from pipeline.readers import check_split_used, read_documents, select_inputs
from pipeline.tokenizer.model_proto import TokenizerError, load_model_proto
from pipeline.tokenizer.sample import HOLDOUT_FRACTION, TextSample, sample_text

_VOCAB_TOO_HIGH = re.compile(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)")
# SentencePiece keeps every training sentence in memory; a few million lines is plenty for 32k pieces.
MAX_SENTENCES = 3_000_000


@dataclass(frozen=True)
class TokenizerTrainConfig:
    inputs: tuple[str, ...]
    out: Path
    vocab_size: int
    model_type: str = "bpe"
    byte_fallback: bool = False
    character_coverage: float = 0.9995
    text_field: str = "text"
    split: str | None = None  # of a `datasets` DatasetDict input
    max_sample_bytes: int = 200_000_000
    holdout_fraction: float = HOLDOUT_FRACTION
    overwrite: bool = False
    address: str | None = None
    num_cpus: int | None = None


def train_sentencepiece(
    sentences_file: Path,
    vocab_size: int,
    model_type: str,
    fit_vocab: bool = False,
    **options: object,
) -> bytes:
    """Train on a file of lines and return the serialized model.

    When the text cannot support `vocab_size` pieces, SentencePiece says how many it can: with
    `fit_vocab` we train again at that size, otherwise the user gets a TokenizerError with the number.
    """
    try:
        return _train(sentences_file, vocab_size, model_type, **options)
    except RuntimeError as e:
        match = _VOCAB_TOO_HIGH.search(str(e))
        if not match:
            raise TokenizerError(f"sentencepiece could not train on {sentences_file}: {e}") from e
        supported = int(match.group(2))
        if not fit_vocab:
            raise TokenizerError(
                f"--vocab-size {vocab_size}: the sampled text supports at most {supported} pieces; "
                f"pass --vocab-size {supported} or less, or give more text"
            ) from e
        return _train(sentences_file, supported, model_type, **options)


def _train(sentences_file: Path, vocab_size: int, model_type: str, **options: object) -> bytes:
    if sentences_file.stat().st_size == 0:
        raise TokenizerError(f"{sentences_file}: no text to train on; check --input and --text-field")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        input=str(sentences_file),
        model_writer=model,
        vocab_size=vocab_size,
        model_type=model_type,
        input_sentence_size=MAX_SENTENCES,
        shuffle_input_sentence=True,
        num_threads=os.cpu_count() or 1,
        minloglevel=2,
        **options,
    )
    return model.getvalue()


def refuse_existing(path: Path, overwrite: bool) -> None:
    """Refuse to replace an output without --overwrite. Checked before the work (so a refusal costs
    nothing) and again just before writing (the file may have appeared while training ran)."""
    if path.exists() and not overwrite:
        raise TokenizerError(f"{path}: already exists; pass --overwrite to replace it or choose another --out")


def load_sample(
    files: Sequence[Path],
    text_field: str,
    folder: Path,
    max_train_bytes: int,
    max_heldout_bytes: int,
    holdout_fraction: float,
    address: str | None,
    num_cpus: int | None,
) -> TextSample:
    """Read the input files (see `select_inputs`) with the pipeline's readers on Ray and write the sample
    under `folder`."""
    init_ray(address, num_cpus)
    documents = read_documents([str(path) for path in files], text_field=text_field)
    # File sizes (known without reading) set the sampling rate; compressed inputs just sample more.
    estimated_bytes = sum(path.stat().st_size for path in files)
    return sample_text(documents, folder, max_train_bytes, max_heldout_bytes, estimated_bytes, holdout_fraction)


def train_tokenizer(config: TokenizerTrainConfig) -> dict:
    """Run the train command; returns the summary it prints."""
    if config.vocab_size <= 0:
        raise TokenizerError(f"--vocab-size {config.vocab_size}: must be positive")
    refuse_existing(config.out, config.overwrite)
    started = time.perf_counter()
    selection = select_inputs(config.inputs, config.split)
    check_split_used(config.split, selection)
    print(selection.describe(), flush=True)
    with tempfile.TemporaryDirectory(prefix="replaymix-tokenizer-") as scratch:
        sample = load_sample(
            selection.files, config.text_field, Path(scratch), config.max_sample_bytes, 0,
            config.holdout_fraction, config.address, config.num_cpus,
        )
        model = train_sentencepiece(
            sample.train_file,
            config.vocab_size,
            config.model_type,
            byte_fallback=config.byte_fallback,
            character_coverage=config.character_coverage,
        )
    refuse_existing(config.out, config.overwrite)
    write_atomically(config.out, model)
    vocab = len(load_model_proto(config.out).pieces)
    summary = {
        "out": str(config.out),
        "vocab_size": vocab,
        "model_type": config.model_type,
        "sample_documents": sample.train_documents,
        "sample_lines": sample.train_lines,
        "sample_bytes": sample.train_bytes,
        "corpus_documents": sample.corpus_documents,
        "corpus_bytes": sample.corpus_bytes,
        "seconds": round(time.perf_counter() - started, 1),
    }
    print(
        f"trained {config.model_type} tokenizer {config.out}: {vocab} pieces from a sample of "
        f"{sample.train_documents}/{sample.corpus_documents} documents ({sample.train_bytes / 1e6:.1f} MB, "
        f"{sample.train_lines} lines) in {summary['seconds']} s"
    )
    return summary
