"""Vocabulary growth: resize a model's embeddings to a tokenizer extended by `pipeline.tokenizer extend`.

Each new piece's input (and untied output) row starts as the mean of the rows of its segmentation under
the base tokenizer, read from the extension report; a piece without a segmentation gets the mean of all
old rows. Old rows are copied unchanged and tied weights stay one tensor.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn as nn

from trainer.model import GPT


class ExtensionReportError(Exception):
    """The extension report is unreadable or does not match the checkpoint/stream; names the field."""


@dataclass(frozen=True)
class ExtensionReport:
    base_vocab_size: int
    extended_vocab_size: int
    base_ids: dict[int, list[int]]  # new piece id -> its ids under the base tokenizer

    @classmethod
    def load(cls, path: str | Path) -> "ExtensionReport":
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
            base, extended = int(raw["base"]["vocab_size"]), int(raw["extended"]["vocab_size"])
            pieces = {int(p["id"]): [int(i) for i in p.get("base_ids") or []] for p in raw["new_pieces"]}
        except FileNotFoundError as e:
            raise ExtensionReportError(f"{path}: no such file; pass the extended.report.json written by "
                                       "`python -m pipeline.tokenizer extend`") from e
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise ExtensionReportError(
                f"{path}: not an extension report ({type(e).__name__}: {e}); expected base.vocab_size, "
                "extended.vocab_size and new_pieces[{id, piece, base_ids}]"
            ) from e
        report = cls(base, extended, pieces)
        report.check(path)
        return report

    def check(self, where: Path | str) -> None:
        expected = set(range(self.base_vocab_size, self.extended_vocab_size))
        if set(self.base_ids) != expected:
            raise ExtensionReportError(
                f"{where}: new_pieces ids must be exactly {self.base_vocab_size}..{self.extended_vocab_size - 1}; "
                f"missing {sorted(expected - set(self.base_ids))[:5]}, unexpected {sorted(set(self.base_ids) - expected)[:5]}"
            )
        for piece_id, ids in self.base_ids.items():
            bad = [i for i in ids if not 0 <= i < self.base_vocab_size]
            if bad:
                raise ExtensionReportError(
                    f"{where}: new_pieces id {piece_id}: base_ids {bad} are outside the base vocabulary "
                    f"of {self.base_vocab_size}"
                )


def grown_rows(old: torch.Tensor, report: ExtensionReport) -> torch.Tensor:
    """The (extended_vocab, dim) matrix: old rows as they are, new rows the means the report prescribes."""
    new = old.new_empty(report.extended_vocab_size, old.shape[1])
    new[: report.base_vocab_size] = old
    fallback = old.mean(dim=0)
    for piece_id, ids in report.base_ids.items():
        new[piece_id] = old[ids].mean(dim=0) if ids else fallback
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
