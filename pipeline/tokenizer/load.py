"""A tokenizer as the pipeline uses it: a bare SentencePiece `.model`, or a Hugging Face tokenizer folder.

Open models ship their tokenizer as a folder written by `save_pretrained`: a `tokenizer.json` of the
`tokenizers` library (byte-level BPE for Llama 3, Qwen, GPT-2/NeoX), a SentencePiece `tokenizer.model`
(Llama 2, Mistral, Gemma), or both, beside a `tokenizer_config.json` that says which special tokens the
model was trained with. `load_tokenizer` reads either form into a `TokenizerSpec`: the ids the pipeline
needs (vocabulary size, BOS, EOS), the files a dataset keeps a copy of, and what an encoder process needs
to rebuild the encoder (`encoder()`).

A folder is resolved once, in the driver, by `transformers.AutoTokenizer`, exactly as the model's users
load it (v5 converts a lone `tokenizer.model` and applies `add_bos_token`/`add_eos_token` from the
config); the resulting `tokenizer.json` is what the Rust `tokenizers` library encodes with in the
workers, in batches and without the GIL. Every document becomes the ids `AutoTokenizer(text)` gives
(with the folder's own BOS rule) followed by EOS; `pipeline/FORMAT.md` documents it.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from pipeline.dataset import TokenizerInfo, sha256_file
from pipeline.storage import is_uri
from pipeline.tokenizer.model_proto import TokenizerError, load_model_proto, processor_from_proto

SENTENCEPIECE, HUGGINGFACE = "sentencepiece", "huggingface"
# The files of a Hugging Face tokenizer folder that a dataset keeps a copy of (those present).
HF_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
)
SP_MODEL_NAME = "tokenizer.model"
# Where a dataset keeps its tokenizer copy (format 2).
DATASET_TOKENIZER_FOLDER = "tokenizer"


@dataclass(frozen=True)
class TokenizerSpec:
    """An opened tokenizer: its ids, its files, and how to rebuild its encoder in another process."""

    kind: str  # SENTENCEPIECE or HUGGINGFACE
    path: Path  # as given: the .model file or the folder
    files: tuple[str, ...]  # names of the files to copy (for SENTENCEPIECE: the one .model)
    vocab_size: int  # every id the tokenizer can produce is below this (added tokens included)
    bos_id: int  # -1 when the tokenizer has none
    eos_id: int
    add_bos: bool  # documents start with BOS (SentencePiece: the model has one; folders: their own rule)
    adds_eos: bool  # the tokenizer itself ends a text with EOS (folders with add_eos_token); EOS ends every document anyway
    model_type: str  # "bpe", "unigram", "wordpiece", "wordlevel", ...
    unk_id: int  # -1 when the tokenizer has none (byte-level BPE needs none)
    # What an encoder process rebuilds the encoder from: the model proto, or the tokenizer.json text.
    encoder_data: bytes = field(repr=False, compare=False)

    def encoder(self) -> Callable[[Sequence[str]], list[list[int]]]:
        """`encode(texts)` -> the ids of each text, without BOS/EOS (callers add them as `add_bos` says)."""
        return make_encoder(self.kind, self.encoder_data)

    def decoder(self) -> Callable[[Sequence[list[int]]], list[str]]:
        """`decode(ids_of_texts)` -> each text (special tokens kept), for checking what encoding lost."""
        if self.kind == SENTENCEPIECE:
            import sentencepiece as spm

            processor = spm.SentencePieceProcessor(model_proto=self.encoder_data)
            return lambda ids: processor.decode([list(i) for i in ids])
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_str(self.encoder_data.decode("utf-8"))
        return lambda ids: tokenizer.decode_batch([list(i) for i in ids], skip_special_tokens=False)

    def stage_copy(self, dataset_folder: Path, source: str | None = None) -> TokenizerInfo:
        """Copy the tokenizer's files into a dataset being written; return what its manifest records.
        `source`: where the user's tokenizer is (a store URI when it was fetched), default its path here."""
        target = Path(dataset_folder) / DATASET_TOKENIZER_FOLDER
        target.mkdir(parents=True, exist_ok=True)
        copied = [self.path] if self.kind == SENTENCEPIECE else [self.path / name for name in self.files]
        for name, original in zip(self.files, copied):
            shutil.copyfile(original, target / name)
        return TokenizerInfo(
            kind=self.kind,
            folder=DATASET_TOKENIZER_FOLDER,
            files={name: sha256_file(target / name) for name in self.files},
            source_path=source if source is not None and is_uri(source) else str(self.path.resolve()),
            vocab_size=self.vocab_size,
            eos_id=self.eos_id,
            bos_id=self.bos_id,
            add_bos=self.add_bos,
        )


def make_encoder(kind: str, data: bytes) -> Callable[[Sequence[str]], list[list[int]]]:
    """The batch encoder of a `TokenizerSpec` (module level, so a Ray worker can build it from bytes)."""
    if kind == SENTENCEPIECE:
        import sentencepiece as spm

        processor = spm.SentencePieceProcessor(model_proto=data)
        return lambda texts: processor.encode(list(texts))
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_str(data.decode("utf-8"))
    return lambda texts: [e.ids for e in tokenizer.encode_batch_fast(list(texts), add_special_tokens=False)]


def load_tokenizer(path: str | Path, add_bos: bool | None = None) -> TokenizerSpec:
    """Open a SentencePiece `.model` or a Hugging Face tokenizer folder; raise TokenizerError naming the
    file and what to do when it is neither, or unusable (no EOS, files that disagree, ...)."""
    path = Path(path)
    if path.is_dir():
        return _load_folder(path)
    if not path.is_file():
        raise TokenizerError(
            f"{path}: no such file or folder; pass a SentencePiece .model or a Hugging Face tokenizer folder"
        )
    if path.name == "tokenizer.json" or path.suffix == ".json":
        raise TokenizerError(
            f"{path}: pass the folder that holds it (with its tokenizer_config.json), not the file: the "
            "special tokens the model was trained with are in the folder's config"
        )
    return _load_sentencepiece(path, add_bos)


def _load_sentencepiece(path: Path, add_bos: bool | None) -> TokenizerSpec:
    proto = load_model_proto(path)
    processor = processor_from_proto(proto, str(path))
    eos_id, bos_id = processor.eos_id(), processor.bos_id()
    if eos_id < 0:
        raise TokenizerError(
            f"{path}: the tokenizer has no EOS piece (eos_id=-1); documents must end in EOS, "
            "so train it with eos_id >= 0"
        )
    from pipeline.tokenizer.model_proto import model_type_name

    return TokenizerSpec(
        kind=SENTENCEPIECE,
        path=path,
        files=(SP_MODEL_NAME,),
        vocab_size=processor.vocab_size(),
        bos_id=bos_id,
        eos_id=eos_id,
        add_bos=bos_id >= 0 if add_bos is None else add_bos,
        adds_eos=False,
        model_type=model_type_name(proto),
        unk_id=processor.unk_id(),
        encoder_data=proto.SerializeToString(),
    )


def _load_folder(folder: Path) -> TokenizerSpec:
    present = tuple(name for name in HF_TOKENIZER_FILES if (folder / name).is_file())
    if "tokenizer.json" not in present and "tokenizer.model" not in present:
        raise TokenizerError(
            f"{folder}: neither tokenizer.json nor tokenizer.model is in this folder, so it is not a Hugging "
            "Face tokenizer folder; pass the folder `save_pretrained` wrote (or a SentencePiece .model file)"
        )
    auto = hf_auto_tokenizer(folder)
    backend = auto.backend_tokenizer
    where = folder / ("tokenizer.json" if "tokenizer.json" in present else "tokenizer.model")
    if auto.eos_token_id is None:
        raise TokenizerError(
            f"{folder / 'tokenizer_config.json'}: no eos_token; documents must end in EOS, so set the "
            "model's eos_token in the folder's config"
        )
    vocab_size = len(auto)
    if "tokenizer.json" in present and "tokenizer.model" in present:
        check_files_agree(folder, backend, vocab_size)
    prefix, suffix = special_tokens_added(backend)
    bos_id = -1 if auto.bos_token_id is None else auto.bos_token_id
    if prefix not in ([], [bos_id]) or suffix not in ([], [auto.eos_token_id]):
        raise TokenizerError(
            f"{where}: its post-processor adds {prefix} before and {suffix} after every text; replaymix "
            f"stores documents as [BOS] + text + EOS (BOS id {bos_id}, EOS id {auto.eos_token_id}), so it "
            "takes tokenizers that add at most a BOS before and an EOS after; fix the folder's "
            "post_processor or add_bos_token/add_eos_token"
        )
    unk = backend.model.unk_token if hasattr(backend.model, "unk_token") else None
    unk_id = backend.token_to_id(unk) if unk else None
    return TokenizerSpec(
        kind=HUGGINGFACE,
        path=folder,
        files=present,
        vocab_size=vocab_size,
        bos_id=bos_id,
        eos_id=auto.eos_token_id,
        add_bos=prefix == [bos_id],
        adds_eos=suffix == [auto.eos_token_id],
        model_type=type(backend.model).__name__.lower(),
        unk_id=-1 if unk_id is None else unk_id,
        encoder_data=backend.to_str().encode("utf-8"),
    )


def hf_auto_tokenizer(folder: Path):
    """The folder loaded as its users load it: `AutoTokenizer.from_pretrained`, local files only."""
    from transformers import AutoTokenizer

    try:
        auto = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:  # transformers raises many types (OSError, ValueError, json errors, ...)
        raise TokenizerError(
            f"{folder}: transformers' AutoTokenizer cannot load this folder ({type(e).__name__}: {e}); "
            "check that it is a complete `save_pretrained` tokenizer folder"
        ) from e
    if getattr(auto, "backend_tokenizer", None) is None:
        raise TokenizerError(
            f"{folder}: loads as {type(auto).__name__}, which has no `tokenizers` backend; replaymix encodes "
            "with the Rust tokenizers library, so the folder needs a tokenizer.json (or a tokenizer.model "
            "transformers can convert)"
        )
    return auto


def special_tokens_added(backend) -> tuple[list[int], list[int]]:
    """The ids a `tokenizers.Tokenizer`'s post-processor puts before and after a text."""
    probe = "a"
    bare = backend.encode(probe, add_special_tokens=False).ids
    full = backend.encode(probe, add_special_tokens=True).ids
    for start in range(len(full) - len(bare) + 1):
        if full[start : start + len(bare)] == bare:
            return full[:start], full[start + len(bare) :]
    raise TokenizerError(f"the post-processor changes the text's own ids ({bare} -> {full}); not supported")


def check_files_agree(folder: Path, backend, vocab_size: int) -> None:
    """A folder with both files must mean the same pieces by the same ids in each."""
    proto = load_model_proto(folder / "tokenizer.model")
    for token_id, piece in enumerate(proto.pieces):
        in_json = backend.id_to_token(token_id)
        if in_json != piece.piece:
            raise TokenizerError(
                f"{folder}: tokenizer.model and tokenizer.json disagree: id {token_id} is {piece.piece!r} in "
                f"tokenizer.model and {in_json!r} in tokenizer.json; one of them belongs to another "
                "tokenizer: delete tokenizer.json to rebuild it from tokenizer.model (or the other way round)"
            )


def vocabulary_pieces(spec: TokenizerSpec) -> list[str | None]:
    """The string of every id below the vocabulary size (None where an id is unused): for checking that
    two tokenizers give ids the same meaning."""
    if spec.kind == SENTENCEPIECE:
        return [p.piece for p in load_model_proto(spec.path).pieces]
    from tokenizers import Tokenizer

    pieces: list[str | None] = [None] * spec.vocab_size
    for token, token_id in Tokenizer.from_str(spec.encoder_data.decode("utf-8")).get_vocab(True).items():
        if token_id < spec.vocab_size:
            pieces[token_id] = token
    return pieces
