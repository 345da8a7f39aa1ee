"""Hugging Face tokenizer folders built in the test, as open models ship them; nothing is downloaded.

- `sentencepiece_folder`: a SentencePiece BPE model with byte fallback saved as Llama 2 / Mistral ship it
  (`tokenizer.model` beside the `tokenizer.json` transformers converts it to, BOS added).
- `gpt2_folder`: byte-level BPE, `<|endoftext|>` as BOS and EOS, nothing added to a text (GPT-2, NeoX).
- `llama3_folder`: byte-level BPE with its special tokens after the BPE vocabulary and a post-processor
  that adds `<|begin_of_text|>`, `ignore_merges` set (Llama 3).
- `wordlevel_folder`: a word-level vocabulary of any size (ids past 65,535 for the uint32 path).
- `train_tokenizer`: byte-level BPE with `<s>` and `</s>`, the tokenizer of the tiny transformers models the
  trainer's tests build (conftest's `base_tokenizer`).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Sequence

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from conftest import train_spm


def sentencepiece_folder(lines: Sequence[str], folder: Path, vocab_size: int = 400) -> Path:
    # Llama 2's settings (spaces kept, no NFKC): the ones transformers' converter reproduces.
    model = train_spm(lines, folder.parent / f"{folder.name}-spm" / "sp", vocab_size=vocab_size, byte_fallback=True,
                      bos_id=1, eos_id=2, unk_id=0, pad_id=-1, normalization_rule_name="identity",
                      remove_extra_whitespaces=False, split_digits=True, allow_whitespace_only_pieces=True)
    folder.mkdir(parents=True)
    shutil.copyfile(model, folder / "tokenizer.model")
    (folder / "tokenizer_config.json").write_text(
        '{"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", '
        '"add_bos_token": true, "add_eos_token": false}'
    )
    # transformers converts the model to a tokenizer.json; Llama 2 repositories ship both files.
    AutoTokenizer.from_pretrained(str(folder)).save_pretrained(str(folder))
    return folder


def _byte_level_bpe(lines: Sequence[str], vocab_size: int, specials: list[str], ignore_merges: bool) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE(ignore_merges=ignore_merges))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=specials, show_progress=False)
    tokenizer.train_from_iterator(lines, trainer)
    return tokenizer


def gpt2_folder(lines: Sequence[str], folder: Path, vocab_size: int = 600) -> Path:
    tokenizer = _byte_level_bpe(lines, vocab_size, ["<|endoftext|>"], ignore_merges=False)
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                            unk_token="<|endoftext|>").save_pretrained(str(folder))
    return folder


def llama3_folder(lines: Sequence[str], folder: Path, vocab_size: int = 600) -> Path:
    tokenizer = _byte_level_bpe(lines, vocab_size, [], ignore_merges=True)
    # As in Llama 3: the special tokens come after the whole BPE vocabulary.
    tokenizer.add_special_tokens(["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>"])
    bos = "<|begin_of_text|>"
    tokenizer.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                      special_tokens=[(bos, tokenizer.token_to_id(bos))]),
    ])
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=bos,
                            eos_token="<|end_of_text|>").save_pretrained(str(folder))
    return folder


def wordlevel_folder(words: Sequence[str], folder: Path) -> Path:
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {word: 3 + i for i, word in enumerate(words)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(str(folder))
    return folder


def train_tokenizer(lines: list[str], vocab: int, folder: Path) -> Path:
    """A byte-level BPE tokenizer trained here on `lines`, saved as a Hugging Face folder."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(lines, trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>").save_pretrained(folder)
    assert len(AutoTokenizer.from_pretrained(folder)) == vocab
    return folder
