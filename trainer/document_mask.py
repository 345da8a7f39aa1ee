"""Documents kept apart inside a packed row (`--document-masking`), and the prediction across a document
boundary left untrained (`--eod-mask-loss`).

A row is a window of concatenated documents, each stored as [BOS] text EOS (pipeline/tokenize.py), so a
document starts at the row's first token and after every EOS; the row's own tokens say where, and the
wire, the mixer and the batch contract stay as they are (`--compute local` rows are the same bytes, so the
same masks). Keeping documents apart is two things, both from those starts:

- positions restart at 0 at each document start (Megatron's `reset_position_ids`), and
- attention stays inside the document (`reset_attention_mask`; torchtitan's block-causal mask).

The second is transformers' own packed-sequence path, not a mask of ours: a model called with per-row
`position_ids`, no attention mask and no KV cache finds a new sequence wherever the position does not grow
by one (`masking_utils.find_packed_sequence_indices`) and intersects the causal mask with a same-sequence
mask, for the sdpa, eager and flex_attention implementations, at any batch size. A row of one document
has increasing positions, is found unpacked, and computes exactly what it computes without the flag.
flash_attention_2/3 detect packing only in a batch of one row (`_is_packed_sequence`) and would silently
let rows of several documents attend across them, so they are refused with the flag.

`--eod-mask-loss` (Megatron's name) leaves out of the loss each prediction made at an EOS, i.e. the next
document's first token, which nothing in the EOS's own document can tell.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trainer.errors import TrainerError

# The attention implementations whose masks transformers builds from restarted positions in any batch.
DOCUMENT_MASK_ATTENTION = ("sdpa", "eager", "flex_attention")
# Targets the loss skips (F.cross_entropy's default ignore_index).
IGNORED = -100


def document_positions(tokens: torch.Tensor, eos_id: int) -> torch.Tensor:
    """(rows, length) positions that restart at 0 at each row's start and after every EOS."""
    rows, length = tokens.shape
    index = torch.arange(length, device=tokens.device).expand(rows, length)
    starts = torch.zeros_like(tokens, dtype=torch.bool)
    starts[:, 0] = True
    starts[:, 1:] = tokens[:, :-1] == eos_id
    # Each token's document start: the latest start at or before it.
    start_index = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values
    return index - start_index


def without_boundary_targets(tokens: torch.Tensor, targets: torch.Tensor, eos_id: int) -> torch.Tensor:
    """`targets` with the predictions made at an EOS input (the next document's first token) ignored."""
    return targets.masked_fill(tokens == eos_id, IGNORED)


@dataclass(frozen=True)
class DocumentMasking:
    """What the model's forward does with a row's documents; `eos_id` is the data's (every dataset of a
    mix shares it, service/vocabulary.py)."""

    eos_id: int
    keep_apart: bool = True  # --document-masking
    mask_boundary_loss: bool = False  # --eod-mask-loss

    def position_ids(self, tokens: torch.Tensor) -> torch.Tensor | None:
        return document_positions(tokens, self.eos_id) if self.keep_apart else None

    def loss_targets(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return without_boundary_targets(tokens, targets, self.eos_id) if self.mask_boundary_loss else targets

    def record(self) -> dict[str, bool]:
        """What metrics.jsonl states about the loss and attention of this run."""
        return {"document_masking": self.keep_apart, "eod_mask_loss": self.mask_boundary_loss}


def check_attention(attention: str) -> None:
    """Refuse --document-masking with an attention implementation that would attend across documents."""
    if attention not in DOCUMENT_MASK_ATTENTION:
        raise TrainerError(
            f"--document-masking: attention {attention!r} cannot keep documents apart in a batch of several rows "
            f"(it detects packed documents only in a batch of one row); use --attention "
            f"{' or '.join(DOCUMENT_MASK_ATTENTION)}, or drop --document-masking")
