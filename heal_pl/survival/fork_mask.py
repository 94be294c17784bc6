"""Packed fork reads on one shared KV cache: the attention mask and the forwards (SPEC §4, step 2 of
:mod:`heal_pl.survival.forks`).

The cache holds ``C`` positions. Fork ``j`` keeps the first ``k_j ≤ C`` of them and feeds ``f_j`` at positions
``k_j, k_j + 1, …``. All forks of a batch go in ONE row of ``Q = Σ_j |f_j|`` tokens; the additive mask
``[1, 1, Q, C + Q]`` lets the ``i``-th token of ``f_j`` see

    cache positions [0, k_j)   and   the tokens 0 … i of f_j            (nothing of the other forks)

which is exactly "crop the cache to ``k_j`` positions, then feed ``f_j``" without copying the cache. The packed
key/values are cropped off again afterwards (the cache leaves as it came).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from transformers import DynamicCache

from heal_pl.lm import LMHead, base_lm, check_head
from heal_pl.survival.probes import probe_from_logits


def packed_fork_mask(keeps: Sequence[int], lens: Sequence[int], cached: int, dtype: torch.dtype) -> Tensor:
    """Additive mask ``[1, 1, Q, cached + Q]`` (0 = attend, ``finfo(dtype).min`` = blocked), ``Q = Σ lens``.

    Query ``i`` of segment ``j`` sees cache columns ``[0, keeps[j])`` and the columns ``cached + q`` of the
    queries ``q ≤ i`` of its own segment (causal within the segment, blind to the other segments).
    """
    lens_t = torch.as_tensor(list(lens), dtype=torch.long)
    seg = torch.repeat_interleave(torch.arange(len(lens_t)), lens_t)  # [Q] segment of each query
    see_cache = torch.arange(cached)[None, :] < torch.as_tensor(list(keeps), dtype=torch.long)[seg][:, None]
    q = torch.arange(seg.numel())
    see_new = (seg[:, None] == seg[None, :]) & (q[None, :] <= q[:, None])
    allowed = torch.cat([see_cache, see_new], dim=1)
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)[None, None]


def read_packed(
    model: nn.Module, cache: DynamicCache, keeps: Sequence[int], feeds: Sequence[Sequence[int]],
    answer_ids: Mapping[str, Sequence[int]], true_name: str, fork_batch: int,
) -> tuple[np.ndarray, np.ndarray]:
    """``(pmass, p_true)`` float64 ``[m]`` at the end of each feed ``f_j`` read on the cache cropped to ``keeps[j]``.

    At most ``fork_batch`` feeds per forward, in the current (steering) context; ``cache`` leaves as it came.
    """
    check_head(model, "read_packed")
    backbone, head = base_lm(model).get_decoder(), LMHead(base_lm(model))
    device = next(model.parameters()).device
    dtype = base_lm(model).get_input_embeddings().weight.dtype
    cached = cache.get_seq_length()
    pmass, p_true = np.full(len(feeds), np.nan), np.full(len(feeds), np.nan)
    for start in range(0, len(feeds), fork_batch):
        ks, fs = keeps[start : start + fork_batch], feeds[start : start + fork_batch]
        lens = [len(f) for f in fs]
        ids = torch.tensor([[i for f in fs for i in f]], dtype=torch.long, device=device)
        pos = torch.tensor([[k + i for k, n in zip(ks, lens, strict=True) for i in range(n)]], device=device)
        mask = packed_fork_mask(ks, lens, cached, dtype).to(device)
        out = backbone(input_ids=ids, position_ids=pos, attention_mask=mask, past_key_values=cache, use_cache=True)
        cache.crop(cached - cache.get_seq_length())  # crop(−k) drops the k packed positions
        ends = torch.tensor(lens).cumsum(0) - 1
        pm, pt = probe_from_logits(head(out.last_hidden_state[0, ends.to(device)]), answer_ids, true_name)
        pmass[start : start + len(fs)], p_true[start : start + len(fs)] = pm.tolist(), pt.tolist()
    return pmass, p_true
