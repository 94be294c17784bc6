"""Which positions of a batch count (docs/maths.md §1.2): the rows the barrier and the SFT loss read.

A position ``t`` *counts* when the token it predicts (``t + 1``) is a completion token, i.e.
``labels[t + 1] != -100`` in Hugging Face's label convention.
"""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor

IGNORE_INDEX = -100


class Counted(NamedTuple):
    """The counted positions of a batch: ``rows`` index ``[B, T-1]`` hidden/logit rows."""

    batch_idx: Tensor  # [N]
    pos_idx: Tensor  # [N] position t whose logits predict token t + 1
    targets: Tensor  # [N] the token at t + 1


def counted_positions(labels: Tensor, attention_mask: Tensor | None = None) -> Counted:
    """Positions ``t`` whose next token ``t + 1`` is a completion token (``labels[t+1] != -100``).

    ``labels`` is ``[B, T]`` in Hugging Face's convention (aligned with ``input_ids``; the model
    shifts). Where ``attention_mask`` is given, a label under a 0 mask is an error, never ignored
    silently: the mask and the labels disagree about what is real text.
    """
    if labels.dim() != 2:
        raise ValueError(f"labels must be [batch, seq], got shape {tuple(labels.shape)}")
    nxt = labels[:, 1:]
    mask = nxt != IGNORE_INDEX
    if attention_mask is not None:
        if attention_mask.shape != labels.shape:
            raise ValueError(
                f"attention_mask shape {tuple(attention_mask.shape)} != labels shape {tuple(labels.shape)}"
            )
        if (mask & (attention_mask[:, 1:] == 0)).any():
            raise ValueError("labels count a position whose attention_mask is 0 (padding labelled as completion)")
    b, t = mask.nonzero(as_tuple=True)
    return Counted(b, t, nxt[b, t])


def gather_rows(x: Tensor, counted: Counted) -> Tensor:
    """Rows ``x[b, t]`` at the counted positions: ``[B, T, D] -> [N, D]``."""
    return x[counted.batch_idx, counted.pos_idx]
