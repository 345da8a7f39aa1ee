"""Vocabulary growth: resize a model's embeddings to a tokenizer extended by `pipeline.tokenizer extend`.

Each new piece's input (and untied output) row starts as the mean of the rows of its segmentation under
the base tokenizer, read from the extension report (`pipeline.tokenizer.report.ExtensionReport.load`,
which refuses a piece without one). Old rows are copied unchanged and tied weights stay one tensor.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from pipeline.tokenizer.report import ExtensionReport


def grown_rows(old: torch.Tensor, report: ExtensionReport) -> torch.Tensor:
    """The grown matrix: old rows as they are, each new id's row the mean the report prescribes.

    It has max(old rows, extended vocabulary) rows: a Hugging Face model may hold more rows than its
    tokenizer has pieces (Qwen2 pads 151665 pieces to 151936 rows), and then new ids take over padding rows
    instead of adding any. A fresh model's rows are exactly its data's vocabulary."""
    new = old.new_empty(max(old.shape[0], report.extended_vocab_size), old.shape[1])
    new[: old.shape[0]] = old
    for piece in report.new_pieces:
        new[piece.id] = old[list(piece.base_ids)].mean(dim=0)
    return new


@torch.no_grad()
def grow_vocab(model: nn.Module, report: ExtensionReport) -> nn.Module:
    """Give each new id of `report` the mean of its base segmentation's rows, in the input embedding and the
    LM head (one tensor when tied), growing both to max(rows, extended vocabulary) rows; old rows are
    untouched, and `config.vocab_size` follows. `model` is a `trainer.hf_model.HFCausalLM` (which uses
    this module, so it is not named here); returns it for chaining."""
    hf = model.hf
    embedding, head = hf.get_input_embeddings(), hf.get_output_embeddings()
    tied = head.weight is embedding.weight
    embedding.weight = nn.Parameter(grown_rows(embedding.weight, report))
    embedding.num_embeddings = embedding.weight.shape[0]
    head.weight = embedding.weight if tied else nn.Parameter(grown_rows(head.weight, report))
    head.out_features = head.weight.shape[0]
    hf.config.vocab_size = embedding.weight.shape[0]
    return model


def pad_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """After growth, give Adam moments of grown parameters zero rows for the new ids, so a continued run
    may keep its optimizer state (zero moments are what a fresh optimizer starts from)."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            for key, value in optimizer.state.get(param, {}).items():
                if torch.is_tensor(value) and value.dim() == param.dim() and value.shape != param.shape:
                    padded = value.new_zeros(param.shape)
                    padded[: value.shape[0]] = value
                    optimizer.state[param][key] = padded
