"""Pool per-token values across DDP ranks, with gradient, so the barrier sees the global batch.

``D = agg_t KL_t`` is not linear in the tokens: the p95 (or max, or rmse) of a global batch is not the
mean of per-rank p95s. ``gather_tokens`` concatenates every rank's 1-D per-token tensor (ranks may
hold different numbers of tokens) with ``torch.distributed.nn.functional.all_gather``, whose backward
sums the gradient each rank's copy of the loss sends to a rank's tokens. Every rank computes the same
global loss, so that sum is ``world_size ×`` the gradient, and DDP's gradient averaging divides it back:
the update is exactly that of one process holding the global batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def gather_tokens(x: Tensor) -> Tensor:
    """All ranks' 1-D ``x`` concatenated in rank order (differentiable); ``x`` itself on one process."""
    if world_size() == 1:
        return x
    n = torch.tensor([x.numel()], device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(world_size())]
    dist.all_gather(sizes, n)
    longest = int(max(sizes))
    parts = torch.distributed.nn.functional.all_gather(F.pad(x, (0, longest - x.numel())))
    return torch.cat([part[: int(size)] for part, size in zip(parts, sizes, strict=True)])
