"""`python -m pipeline.tokenizer train`: a tokenizer from a hash-chosen sample of a corpus.

Reading and sampling run on Ray Data (see `sample.py`), so the corpus can be far larger than the
driver's memory; the tokenizer then trains on the sample, which is all it needs. Two kinds, each the
artefact an open model ships:
- `sentencepiece`: a SentencePiece model (BPE or unigram) with byte fallback unless `--no-byte-fallback`
  (a character outside the pieces is spelled as its UTF-8 byte pieces, as Llama 2's and Mistral's
  tokenizers do, so no text is ever lost to `<unk>`, and an extension keeps the byte pieces at their ids),
  written as a bare `.model` when `--out` ends in `.model`, else as a Hugging Face folder in the Llama 2 layout (`tokenizer.model` trained with
  Llama 2's settings, the `tokenizer.json` transformers converts it to, `tokenizer_config.json`; `<s>`
  added before a text);
- `bpe`: a byte-level BPE `tokenizer.json` in the Llama 3 layout (GPT-2's byte alphabet and
  pre-tokenizer, `<|begin_of_text|>` added before a text, `<|end_of_text|>` ending a document, both
  after the BPE vocabulary), always a folder.
"""

from __future__ import annotations

import io
import json
import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import sentencepiece as spm

from pipeline.ray_runtime import init_ray
from pipeline.input_selection import InputSelection, check_split_used, select_inputs
from pipeline.readers import read_documents
from pipeline.tokenizer.files import refuse_existing
from pipeline.tokenizer.files import write as write_output
from pipeline.tokenizer.load import load_tokenizer
from pipeline.tokenizer.model_proto import TokenizerError
from pipeline.tokenizer.sample import HOLDOUT_FRACTION, TextSample, sample_text

_VOCAB_TOO_HIGH = re.compile(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)")
_VOCAB_TOO_LOW = re.compile(r"Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)")
# SentencePiece keeps every training sentence in memory; a few million lines is plenty for 32k pieces.
MAX_SENTENCES = 3_000_000


KINDS = ("sentencepiece", "bpe")
BPE_BOS, BPE_EOS = "<|begin_of_text|>", "<|end_of_text|>"
# A SentencePiece model for a Hugging Face folder is trained with Llama 2's settings: transformers' converter
# writes tokenizer.json for exactly these (no NFKC, spaces kept, digits split, unknown characters as
# bytes), so the folder's two files encode alike; with SentencePiece's defaults (NFKC, runs of spaces
# collapsed) the converted tokenizer.json would cut text differently from the model.
SP_FOLDER_OPTIONS = {
    "normalization_rule_name": "identity", "remove_extra_whitespaces": False, "add_dummy_prefix": True,
    "split_digits": True, "byte_fallback": True, "allow_whitespace_only_pieces": True,
}
SP_FOLDER_CONFIG = {
    "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
    "add_bos_token": True, "add_eos_token": False,
}


@dataclass(frozen=True)
class TokenizerTrainConfig:
    inputs: tuple[str, ...]
    out: str | Path  # a .model file or a folder, local or in a store (s3://, gs://)
    vocab_size: int
    kind: str = "sentencepiece"
    model_type: str = "bpe"  # of a SentencePiece model
    # Characters outside the pieces are spelled as UTF-8 byte pieces, never <unk> (as Llama 2's and Mistral's
    # tokenizers are); it costs 256 ids.
    byte_fallback: bool = True
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
        too_low = _VOCAB_TOO_LOW.search(str(e))
        if too_low:
            needed = int(too_low.group(2))
            why = "256 byte pieces (byte fallback), " if options.get("byte_fallback") else ""
            hint = ", or --no-byte-fallback" if options.get("byte_fallback") else ""
            raise TokenizerError(
                f"--vocab-size {vocab_size}: the model needs {why}every character of the sample and the special "
                f"pieces, {needed} ids in all; pass --vocab-size {needed} or more{hint}"
            ) from e
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


def writes_folder(config: TokenizerTrainConfig) -> bool:
    return config.kind == "bpe" or Path(config.out).suffix != ".model"


def stage_sentencepiece_folder(model: bytes, folder: Path) -> None:
    """A Llama-2-layout folder around a SentencePiece model, its tokenizer.json converted by transformers."""
    from pipeline.tokenizer.load import hf_auto_tokenizer

    folder.mkdir(parents=True)
    (folder / "tokenizer.model").write_bytes(model)
    (folder / "tokenizer_config.json").write_text(json.dumps(SP_FOLDER_CONFIG, indent=2) + "\n")
    hf_auto_tokenizer(folder).save_pretrained(str(folder))


def stage_byte_level_bpe_folder(sentences_file: Path, vocab_size: int, folder: Path) -> None:
    """A Llama-3-layout byte-level BPE folder trained on a file of lines."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if sentences_file.stat().st_size == 0:
        raise TokenizerError(f"{sentences_file}: no text to train on; check --input and --text-field")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    specials = [BPE_BOS, BPE_EOS]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(specials), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train([str(sentences_file)], trainer)
    tokenizer.add_special_tokens(specials)
    tokenizer.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{BPE_BOS} $A", pair=f"{BPE_BOS} $A {BPE_BOS} $B",
                                      special_tokens=[(BPE_BOS, tokenizer.token_to_id(BPE_BOS))]),
    ])
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=BPE_BOS, eos_token=BPE_EOS).save_pretrained(str(folder))


def load_sample(
    selection: InputSelection,
    text_field: str,
    folder: Path,
    max_train_bytes: int,
    max_heldout_bytes: int,
    holdout_fraction: float,
    address: str | None,
    num_cpus: int | None,
) -> TextSample:
    """Read the inputs (see `select_inputs`: files, objects in a store, Hub datasets) with the pipeline's
    readers on Ray and write the sample under `folder`."""
    init_ray(address, num_cpus)
    documents = read_documents([str(path) for path in selection.files], text_field=text_field)
    # Sizes (known without reading) set the sampling rate; compressed inputs just sample more, and a Hub
    # dataset (size unknown) is read whole.
    estimated_bytes = sum(selection.sizes.values())
    return sample_text(documents, folder, max_train_bytes, max_heldout_bytes, estimated_bytes, holdout_fraction)


def train_tokenizer(config: TokenizerTrainConfig) -> dict:
    """Run the train command; returns the summary it prints."""
    if config.vocab_size <= 0:
        raise TokenizerError(f"--vocab-size {config.vocab_size}: must be positive")
    if config.kind not in KINDS:
        raise TokenizerError(f"--kind {config.kind}: choose one of {', '.join(KINDS)}")
    if config.kind == "bpe" and Path(config.out).suffix == ".model":
        raise TokenizerError(f"--out {config.out}: a byte-level BPE tokenizer is a folder; give a folder path")
    if config.kind == "bpe" and not config.byte_fallback:
        raise TokenizerError("--no-byte-fallback: a byte-level BPE tokenizer spells every byte by construction; the "
                             "flag is for --kind sentencepiece")
    if config.kind == "sentencepiece" and writes_folder(config) and not config.byte_fallback:
        raise TokenizerError(
            f"--out {config.out}: --no-byte-fallback for a Hugging Face folder: transformers converts the model to a "
            "tokenizer.json with byte fallback but no byte pieces, which drops every character outside the pieces "
            "without a trace (not even <unk>); keep byte fallback, or write a bare .model"
        )
    refuse_existing(config.out, config.overwrite)
    started = time.perf_counter()
    selection = select_inputs(config.inputs, config.split)
    check_split_used(config.split, selection)
    print(selection.describe(), flush=True)
    with tempfile.TemporaryDirectory(prefix="replaymix-tokenizer-") as scratch:
        sample = load_sample(
            selection, config.text_field, Path(scratch), config.max_sample_bytes, 0,
            config.holdout_fraction, config.address, config.num_cpus,
        )
        scratch = Path(scratch)
        if config.kind == "bpe":
            staged = scratch / "tokenizer"
            stage_byte_level_bpe_folder(sample.train_file, config.vocab_size, staged)
        else:
            options = SP_FOLDER_OPTIONS if writes_folder(config) else {}
            options = options | {"byte_fallback": config.byte_fallback}
            model = train_sentencepiece(sample.train_file, config.vocab_size, config.model_type,
                                        character_coverage=config.character_coverage, **options)
            staged = scratch / "tokenizer.model"
            if writes_folder(config):
                staged = scratch / "tokenizer"
                stage_sentencepiece_folder(model, staged)
            else:
                staged.write_bytes(model)
        vocab = load_tokenizer(staged).vocab_size
        refuse_existing(config.out, config.overwrite)
        write_output(staged, config.out)
    summary = {
        "out": str(config.out),
        "vocab_size": vocab,
        "kind": config.kind,
        "model_type": config.model_type if config.kind == "sentencepiece" else "bpe",
        # Byte-level BPE covers every byte by construction.
        "byte_fallback": config.byte_fallback if config.kind == "sentencepiece" else True,
        "sample_documents": sample.train_documents,
        "sample_lines": sample.train_lines,
        "sample_bytes": sample.train_bytes,
        "corpus_documents": sample.corpus_documents,
        "corpus_bytes": sample.corpus_bytes,
        "seconds": round(time.perf_counter() - started, 1),
    }
    print(
        f"trained {summary['kind']} {summary['model_type']} tokenizer {config.out}: {vocab} pieces"
        f"{'' if summary['byte_fallback'] else ' (no byte fallback: unseen characters become <unk>)'} from a sample of "
        f"{sample.train_documents}/{sample.corpus_documents} documents ({sample.train_bytes / 1e6:.1f} MB, "
        f"{sample.train_lines} lines) in {summary['seconds']} s"
    )
    return summary
