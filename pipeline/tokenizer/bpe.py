"""Extending a BPE `tokenizer.json` (byte-level for Llama 3, Qwen, GPT-2/NeoX) without moving an old id.

1. Train a donor BPE on the new text with the base's own normalizer and pre-tokenizer (so donor tokens
   fit text as the base cuts it) and, for a byte-level base, the same 256-symbol byte alphabet.
2. Walk the donor's merges in order. A merge whose result the base lacks adds that token, with the next
   free id (after every old id, special tokens included), and appends the merge after every old merge.
   A merge whose result the base already has is passed over: the base makes that token its own way.
   Both halves of every appended merge exist by then, because the donor made them by earlier merges.
3. For a base that is not byte-level, characters of the new text the base lacks are added first: they
   would otherwise be unknown wherever they appear (the same rule as SentencePiece extension).

Why old text may still change: BPE applies merges by rank, and every old merge ranks first, so a word is
first merged exactly as before; a new merge can then join two of its final tokens where the base had no
merge for them (English "ung" after "ung" became a German suffix). `ignore_merges` (Llama 3) also takes a
whole word straight from the vocabulary when it is a new token. The report counts the old held-out lines
whose ids changed, so the effect is measured, not assumed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from pipeline.tokenizer.model_proto import TokenizerError

# The donor proposes more merges than needed: many of its tokens are ones the base already has.
DONOR_OVERSHOOT = 3


@dataclass(frozen=True)
class BpeExtension:
    tokenizer_json: dict  # the extended tokenizer.json, ready to write
    added: list[tuple[int, str]]  # (id, token) of every new token, ids ascending
    donor_vocab_size: int
    skipped: int  # donor tokens passed over: the base has them, or (at the cap) no room was left


def bpe_model(tokenizer_json: dict, where: Path) -> dict:
    """The `model` of a tokenizer.json, refusing what this extension cannot extend."""
    model = tokenizer_json.get("model", {})
    if model.get("type") != "BPE":
        raise TokenizerError(
            f"{where}: a {model.get('type')} model; extension supports BPE tokenizer.json files (Llama 3, Qwen, "
            "GPT-2/NeoX) and SentencePiece models (a folder with tokenizer.model); WordPiece and Unigram "
            "tokenizer.json files are not supported"
        )
    if model.get("dropout"):
        raise TokenizerError(f"{where}: BPE dropout is set ({model['dropout']}); extension needs a deterministic model")
    return model


def covers_every_byte(tokenizer_json: dict) -> bool:
    """Whether no character can be unknown: a byte-level alphabet, or byte fallback in the model."""
    return is_byte_level(tokenizer_json) or bool(tokenizer_json["model"].get("byte_fallback"))


def is_byte_level(tokenizer_json: dict) -> bool:
    def has_byte_level(component: dict | None) -> bool:
        if not component:
            return False
        if component.get("type") == "ByteLevel":
            return True
        return any(has_byte_level(c) for c in component.get("pretokenizers", []))

    return has_byte_level(tokenizer_json.get("pre_tokenizer"))


def _merge_pair(merge: str | list) -> tuple[str, str]:
    # tokenizers writes merges as [a, b] since 0.20 and as "a b" before; both are read.
    if isinstance(merge, str):
        a, b = merge.split(" ", 1)
        return a, b
    return merge[0], merge[1]


def hold_added_token_ids(tokenizer_json: dict, where: Path) -> None:
    """Put the added (special) tokens into the BPE vocabulary at their own ids.

    `tokenizers` numbers added tokens on load: one found in the model's vocabulary keeps that id, any
    other gets the next id after the model's vocabulary *size*. Llama 3 keeps its 256 special tokens
    after the BPE vocabulary and outside it, so appending BPE tokens would push every special token up
    by the number added (BOS and EOS would change meaning). Listed in the vocabulary, they keep their
    ids; no merge produces them, and the added vocabulary cuts them out before BPE ever runs.
    """
    vocab = tokenizer_json["model"]["vocab"]
    for added in tokenizer_json.get("added_tokens", []):
        vocab.setdefault(added["content"], added["id"])
    ids = sorted(vocab.values())
    if ids != list(range(len(ids))):
        gaps = sorted(set(range(ids[-1] + 1)) - set(ids))[:5]
        repeated = sorted({i for i in ids if ids.count(i) > 1})[:5] if len(set(ids)) != len(ids) else []
        raise TokenizerError(
            f"{where}: the vocabulary and added tokens do not number ids 0..{ids[-1]} once each (unused "
            f"{gaps}, repeated {repeated}); tokenizers renumbers such a file on load, so appending tokens "
            "would move old ids; fix the base's tokenizer.json first"
        )


def first_free_id(tokenizer_json: dict) -> int:
    used = list(tokenizer_json["model"]["vocab"].values()) + [t["id"] for t in tokenizer_json.get("added_tokens", [])]
    return max(used) + 1


def train_donor(tokenizer_json: dict, new_text: Path, vocab_size: int):
    """A BPE trained on `new_text` (lines) with the base's normalizer, pre-tokenizer and BPE options."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    base_model = tokenizer_json["model"]
    donor = Tokenizer.from_str(json.dumps(tokenizer_json))
    options = {k: base_model.get(k) for k in ("unk_token", "continuing_subword_prefix", "end_of_word_suffix")}
    donor.model = models.BPE(**{k: v for k, v in options.items() if v is not None},
                             byte_fallback=bool(base_model.get("byte_fallback")))
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet() if is_byte_level(tokenizer_json) else [],
        special_tokens=[],
        show_progress=False,
        **{k: v for k, v in options.items() if k != "unk_token" and v is not None},
    )
    donor.train([str(new_text)], trainer)
    return json.loads(donor.to_str())["model"]


def donor_size(tokenizer_json: dict, new_pieces: int) -> int:
    return len(tokenizer_json["model"]["vocab"]) // 8 + DONOR_OVERSHOOT * new_pieces + 256


def extend_bpe(
    tokenizer_json: dict, donor: dict, new_pieces: int, where: Path, blocked: frozenset[str] = frozenset()
) -> BpeExtension:
    """Append up to `new_pieces` tokens (and their merges) of the `donor` model (`train_donor`) to a BPE
    tokenizer.json. `blocked` tokens are passed over (`--keep-old-encoding`: they change old text), and so
    is every token built from one."""
    bpe_model(tokenizer_json, where)
    extended = json.loads(json.dumps(tokenizer_json))  # a deep copy; the base stays as it was
    vocab, merges = extended["model"]["vocab"], extended["model"]["merges"]
    hold_added_token_ids(extended, where)
    next_id = first_free_id(tokenizer_json)
    added: list[tuple[int, str]] = []
    skipped = 0

    def add(token: str) -> None:
        nonlocal next_id
        vocab[token] = next_id
        added.append((next_id, token))
        next_id += 1

    if not is_byte_level(tokenizer_json):
        single = sorted((i, t) for t, i in donor["vocab"].items() if t not in vocab and len(t) == 1 and t not in blocked)
        if len(single) > new_pieces:
            raise TokenizerError(
                f"--new-pieces {new_pieces}: the new text has {len(single)} characters the base lacks, and "
                "each must become a token; pass --new-pieces of at least that"
            )
        for _, token in single:
            add(token)
    for merge in donor["merges"]:
        a, b = _merge_pair(merge)
        token = a + b
        if token in vocab or token in blocked:
            skipped += 1
            continue
        if len(added) == new_pieces:
            break
        if a not in vocab or b not in vocab:  # a half the donor made from a token passed over at the cap
            skipped += 1
            continue
        add(token)
        merges.append(merge)
    return BpeExtension(extended, added, len(donor["vocab"]), skipped)


def tokenizer_encoder(tokenizer_json: dict):
    """A batch encoder (texts -> ids, no special tokens) of a tokenizer.json held as a dict."""
    from pipeline.tokenizer.load import HUGGINGFACE, make_encoder

    return make_encoder(HUGGINGFACE, json.dumps(tokenizer_json).encode("utf-8"))


def vocabulary_by_id(tokenizer_json: dict) -> list[str]:
    """Every token of a tokenizer.json (after `hold_added_token_ids`) at its id."""
    vocab = tokenizer_json["model"]["vocab"]
    pieces = [""] * (max(vocab.values()) + 1)
    for token, token_id in vocab.items():
        pieces[token_id] = token
    return pieces


def base_segmentation(tokenizer_json: dict, tokens: list[str]) -> list[list[int]]:
    """How the base BPE model alone cuts each token's string (no normalizer or pre-tokenizer: the string
    is already in the model's alphabet): the rows a new embedding starts as the mean of."""
    from tokenizers import Tokenizer

    model = Tokenizer.from_str(json.dumps(tokenizer_json)).model
    return [[t.id for t in model.tokenize(token)] for token in tokens]
