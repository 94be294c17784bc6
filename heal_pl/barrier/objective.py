"""The training objective on one micro-batch, from its per-token statistics (docs/maths.md §1):

    loss = mean_t NLL_t  +  lam_eff · relu(agg_t KL_t − tau)        t over the counted tokens of every rank

Shared by :class:`heal_pl.module.HealModule` and the Trainer integration (:mod:`heal_pl.integrations`), so the two
train on the same number from the same :class:`~heal_pl.barrier.kl.TokenStats`.
"""

from __future__ import annotations

from typing import NamedTuple

from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from heal_pl.barrier.distributed import gather_tokens
from heal_pl.barrier.kl import BarrierOutput, KLBarrier, TokenStats, check_finite


class Objective(NamedTuple):
    sft: Tensor  # mean NLL over the pooled counted tokens (a zero with gradient when there are none)
    barrier: BarrierOutput  # the barrier on the pooled per-token KL
    pooled: TokenStats  # every rank's per-token KL and NLL, in rank order (the global batch under DDP)


def pooled_objective(stats: TokenStats, barrier: KLBarrier, round: int, where: str, anchor: Tensor) -> Objective:
    """SFT mean and barrier over the tokens of every rank (``gather_tokens``: equal on every rank under DDP).

    ``stats`` are this rank's per-token statistics, checked finite (``where`` names the step in the error);
    ``anchor`` is a tensor every trainable parameter reaches (the student's hidden states): a batch without
    completion tokens adds ``0 · anchor.sum()``, which keeps the parameters in the graph (DDP needs that).
    """
    check_finite(stats, where)
    pooled = TokenStats(gather_tokens(stats.kl), gather_tokens(stats.nll))
    if pooled.nll.numel() == 0:
        rank_zero_warn(f"{where}: the batch has no completion tokens (padding only); it adds a zero loss")
        sft = anchor.sum() * 0.0
    else:
        sft = pooled.nll.mean()
    return Objective(sft, barrier(pooled.kl, round), pooled)
