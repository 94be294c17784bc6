"""``TokenKLStats``: exact mean / rmse / p95 / max of per-token KL over an epoch, across ranks.

The per-token values are kept (``dist_reduce_fx="cat"``), not per-batch summaries, so the p95 and
max of a validation epoch are those of every counted token pooled, gathered across DDP ranks rather
than averaged. A validation epoch of SmolLM2 holds a few thousand floats: cheap.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from heal_pl.barrier.kl import kl_summary


class TokenKLStats(Metric):
    """Accumulates 1-D per-token KL; ``compute()`` returns ``{kl_mean, kl_rmse, kl_p95, kl_max}``."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("kl", default=[], dist_reduce_fx="cat")

    def update(self, kl: Tensor) -> None:
        self.kl.append(kl.detach().float().reshape(-1))

    def compute(self) -> dict[str, Tensor]:
        # a list of per-batch tensors, or (after a DDP sync) one concatenated tensor
        kl = self.kl if isinstance(self.kl, Tensor) else (dim_zero_cat(self.kl) if self.kl else torch.zeros(0))
        return kl_summary(kl)
