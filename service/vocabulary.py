"""Check that token datasets can be mixed: one vocabulary, or vocabularies that extend one another.

A token id must mean the same piece in every dataset of a mix. That holds when the datasets share a
tokenizer, and also when one tokenizer extends another by appending pieces (`pipeline.tokenizer
extend`): the base's ids keep their meaning and the extension only adds ids above them. The check
reads the tokenizer copy inside each dataset (a SentencePiece model or a Hugging Face folder).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from pipeline.dataset import TokenDataset
from service.errors import ServiceError


class VocabularyError(ServiceError, ValueError):
    """Datasets whose token ids do not mean the same pieces; the message names both and the first id."""


@dataclass(frozen=True)
class SharedVocabulary:
    vocab_size: int  # the largest vocabulary; every dataset's ids are a prefix of it
    eos_id: int
    largest: str  # the dataset whose tokenizer defines the full vocabulary


def _pieces(dataset: TokenDataset) -> list[str | None]:
    from pipeline.errors import PipelineError
    from pipeline.tokenizer.load import load_tokenizer, vocabulary_pieces

    try:
        return vocabulary_pieces(load_tokenizer(dataset.tokenizer_path))
    except PipelineError as e:
        raise VocabularyError(f"{dataset.tokenizer_path}: the dataset's tokenizer copy is unusable: {e}") from e


def check_vocabularies(datasets: Mapping[str, TokenDataset]) -> SharedVocabulary:
    """Return the shared vocabulary, or raise VocabularyError saying which datasets disagree and where."""
    if not datasets:
        raise VocabularyError("no datasets given; pass at least one --dataset NAME=PATH")
    pieces = {name: _pieces(ds) for name, ds in datasets.items()}
    largest = max(pieces, key=lambda name: len(pieces[name]))
    full = pieces[largest]
    for name, own in pieces.items():
        if name == largest:
            continue
        for token_id, (piece, full_piece) in enumerate(zip(own, full)):
            if piece != full_piece:
                raise VocabularyError(
                    f"datasets {name!r} ({datasets[name].tokenizer_path}) and {largest!r} "
                    f"({datasets[largest].tokenizer_path}) do not share a vocabulary: id {token_id} is "
                    f"{piece!r} in one and {full_piece!r} in the other. Mixing needs one tokenizer, "
                    "or a base tokenizer and its extension made by `pipeline.tokenizer extend`; "
                    "re-tokenize one dataset with the other's tokenizer"
                )
    eos = {name: ds.tokenizer.eos_id for name, ds in datasets.items()}
    if len(set(eos.values())) != 1:
        raise VocabularyError(f"datasets end documents with different EOS ids {eos}; they cannot be mixed")
    declared = {name: ds.vocab_size for name, ds in datasets.items()}
    for name, size in declared.items():
        if size != len(pieces[name]):
            raise VocabularyError(
                f"{datasets[name].root}/manifest.json: tokenizer.vocab_size = {size} but its tokenizer "
                f"has {len(pieces[name])} ids; the dataset is inconsistent, re-run the tokenize job"
            )
    return SharedVocabulary(vocab_size=len(full), eos_id=next(iter(eos.values())), largest=largest)
