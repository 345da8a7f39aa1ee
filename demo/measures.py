"""The figures the report compares runs by, beyond a run's own metrics: bits per byte and compute.

Bits per byte. A loss per token depends on the tokenizer: German tokenized with the English base tokenizer
needs more tokens per page than with the German extension, so each token is easier to predict and the
per-token losses of the two runs are not comparable. Per byte of the held-out text they are:
    bits/byte = loss (nats per token) / ln 2 x tokens / bytes
with tokens and UTF-8 bytes of the whole validation split. The demo renders the corpora itself and the
split is a hash of each document's text (`pipeline.tokenize.is_validation`, its seed and fraction in the
dataset's manifest), so the bytes are counted here exactly, without help from the trainer. The trainer
evaluates windows of that split; the ratio of the whole split stands for theirs.

Compute. FLOPs = training FLOPs per token of the model (`flops_per_token`, 6N plus attention) x tokens,
tokens = steps x global batch x sequence length; for a grown model, of the grown model, its experts counted
as a token uses them and its frozen weights' gradients left out (`grown_compute`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from pipeline.tokenize import is_validation


@dataclass(frozen=True)
class ValSplit:
    documents: int
    tokens: int
    bytes: int

    @property
    def tokens_per_byte(self) -> float:
        return self.tokens / self.bytes


@lru_cache(maxsize=None)
def val_split(dataset: Path, corpus: Path) -> ValSplit:
    """Documents, tokens and UTF-8 bytes of the validation split of `dataset`, tokenized from `corpus`."""
    manifest = json.loads((dataset / "manifest.json").read_text())
    seed, fraction = manifest["seed"], manifest["val_fraction"]
    documents = size = 0
    with open(corpus, "rb") as lines:
        for line in lines:
            if not line.strip():
                continue
            text = json.loads(line)[manifest.get("text_field", "text")].encode("utf-8")
            if is_validation(text, seed, fraction):
                documents, size = documents + 1, size + len(text)
    val = manifest["splits"]["val"]
    if documents != val["documents"]:  # the hash or the text differ from what the tokenizer saw: no ratio
        raise ValueError(f"{corpus}: {documents} validation documents by the hash, but {dataset} holds "
                         f"{val['documents']}; was the corpus rendered again after tokenizing?")
    return ValSplit(documents, int(val["tokens"]), size)


def bits_per_byte(loss: float, split: ValSplit) -> float:
    return loss / math.log(2) * split.tokens_per_byte


@lru_cache(maxsize=None)
def flops_per_token(model: str, vocab_size: int, seq_len: int) -> float:
    """The trainer's own count for its fresh model of this size and vocabulary, built on the meta device (no
    memory)."""
    import torch

    from trainer.model import fresh_model

    with torch.device("meta"):
        return fresh_model(model, vocab_size, seq_len).flops_per_token(seq_len)


@lru_cache(maxsize=None)
def model_parameters(model: str, vocab_size: int, seq_len: int) -> int:
    import torch

    from trainer.model import fresh_model

    with torch.device("meta"):
        return fresh_model(model, vocab_size, seq_len).num_params()


@lru_cache(maxsize=None)
def grown_compute(model: str, vocab_size: int, seq_len: int, grow: str, train: str,
                  new_token_rows_from: int) -> tuple[float, int, int]:
    """(training FLOPs per token, parameters, active parameters) of the model a `--grow` run trains, built and
    grown on the meta device. A mixture of experts counts the experts a token passes through (top_k); with
    `--train new-blocks` the frozen matrices' weight gradients (2 FLOPs a weight of the 6) are not computed,
    while the backward pass still runs through every layer to the new tokens' embedding rows."""
    import torch

    from trainer.growth import GrowSpec, active_parameters, grow as grow_model, select_trainable
    from trainer.model import fresh_model

    with torch.device("meta"):
        grown = grow_model(fresh_model(model, vocab_size, seq_len), GrowSpec.parse(grow),
                           new_token_rows_from=new_token_rows_from, available=1 << 62)
        select_trainable(grown, train)
        embedding = grown.hf.get_input_embeddings().weight
        frozen = sum(p.numel() for p in grown.parameters()
                     if p.dim() == 2 and not p.requires_grad and (p is not embedding or grown.tied))
        return grown.flops_per_token(seq_len) - 2.0 * frozen, grown.num_params(), active_parameters(grown)


def vocab_size(dataset: Path) -> int:
    return int(json.loads((dataset / "manifest.json").read_text())["tokenizer"]["vocab_size"])
