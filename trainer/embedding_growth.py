"""Vocabulary growth: resize a model's embeddings to a tokenizer extended by `pipeline.tokenizer extend`.

Each new piece's input (and untied output) row starts as the mean of the rows of its segmentation under
the base tokenizer, read from the extension report (`pipeline.tokenizer.report.ExtensionReport.load`,
which refuses a piece without one). Old rows are copied unchanged and tied weights stay one tensor.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn as nn

from pipeline.tokenizer.report import ExtensionReport, ExtensionReportError
from trainer.model import GPT


def grown_rows(old: torch.Tensor, report: ExtensionReport) -> torch.Tensor:
    """The grown matrix: old rows as they are, each new id's row the mean the report prescribes.

    It has max(old rows, extended vocabulary) rows: a Hugging Face model may hold more rows than its
    tokenizer has pieces (Qwen2 pads 151665 pieces to 151936 rows), and then new ids take over padding rows
    instead of adding any. The own GPT's rows are exactly the base vocabulary."""
    new = old.new_empty(max(old.shape[0], report.extended_vocab_size), old.shape[1])
    new[: old.shape[0]] = old
    for piece in report.new_pieces:
        new[piece.id] = old[list(piece.base_ids)].mean(dim=0)
    return new


@torch.no_grad()
def grow_vocab(model: GPT, report: ExtensionReport) -> GPT:
    """Resize `model` in place to the extended vocabulary; returns it for chaining."""
    config = model.config
    if config.vocab_size != report.base_vocab_size:
        raise ExtensionReportError(
            f"extension report: base.vocab_size is {report.base_vocab_size} but the checkpoint's model has "
            f"{config.vocab_size}; pass the report of the tokenizer extension made from this model's tokenizer"
        )
    embed = nn.Embedding(report.extended_vocab_size, config.d_model).to(model.embed.weight.device)
    embed.weight.copy_(grown_rows(model.embed.weight, report))
    head = nn.Linear(config.d_model, report.extended_vocab_size, bias=False).to(embed.weight.device)
    if config.tie_embeddings:
        head.weight = embed.weight
    else:
        head.weight.copy_(grown_rows(model.lm_head.weight, report))
    model.embed, model.lm_head = embed, head
    model.config = replace(config, vocab_size=report.extended_vocab_size)
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
