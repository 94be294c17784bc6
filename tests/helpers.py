"""Hand-built batches shared by tests."""

from __future__ import annotations

import torch


def make_batch(seed: int = 0, B: int = 3, T: int = 14, vocab: int = 300) -> dict[str, torch.Tensor]:
    """Prompt tokens (-100), completion tokens, and right padding (-100, attention 0)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (B, T), generator=g)
    labels, mask = ids.clone(), torch.ones_like(ids)
    labels[:, :4] = -100
    labels[1, 10:] = -100
    mask[1, 10:] = 0
    ids[1, 10:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
