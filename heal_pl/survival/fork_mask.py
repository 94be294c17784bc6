"""Fork reads on one shared cache: the attention masks and the forwards (docs/maths.md §4.3, step 2 of
:mod:`heal_pl.survival.forks`).

The cache holds ``C`` positions. Fork ``j`` keeps the first ``k_j ≤ C`` of them and feeds ``f_j`` at positions
``k_j, k_j + 1, …``; the ``i``-th token of ``f_j`` (position ``p = k_j + i``) sees

    cache positions q < k_j   and   the tokens 0 … i of f_j            (nothing of the other forks)

and, in a sliding-window layer of window ``W``, only those of them at positions ``q > p − W``: exactly "crop
the cache to ``k_j`` positions, then feed ``f_j``" without copying the cache.

* ``packed`` (attention-only caches): all forks of a batch go in ONE row of ``Q = Σ_j |f_j|`` tokens under the
  additive mask ``[1, 1, Q, C + Q]``; the packed key/values are cropped off again afterwards (the cache leaves as
  it came).
* ``batched`` (caches with recurrent layers, :mod:`heal_pl.survival.fork_cache`): one row per fork, right-padded
  to ``L = max_j |f_j|``, on a fresh cache whose recurrent layers start from each fork's snapshot; the attention
  mask is ``[m, 1, L, k_max + L]``. Padding sits after each row's last real token, so it changes nothing read.

The logits are the model's own (``model(..., logits_to_keep=rows)``), whatever its head does to them.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from heal_pl.models.lm import base_lm, cache_kwargs
from heal_pl.survival.fork_cache import ForkCache, cached_positions, read_cache
from heal_pl.survival.probes import probe_from_logits


def _additive(allowed: Tensor, dtype: torch.dtype) -> Tensor:
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)


def packed_fork_mask(keeps: Sequence[int], lens: Sequence[int], cached: int, dtype: torch.dtype,
                     window: int | None = None, offset: int = 0, width: int | None = None) -> Tensor:  # fmt: skip
    """Additive mask ``[1, 1, Q, cached + Q]`` (0 = attend, ``finfo(dtype).min`` = blocked), ``Q = Σ lens``.

    Query ``i`` of segment ``j`` (position ``p = keeps[j] + i``) sees cache columns ``q < keeps[j]`` and the
    columns ``cached + r`` of the queries ``r ≤ i`` of its own segment (causal within the segment, blind to the
    other segments); with a ``window`` ``W``, only the keys at positions ``> p − W``. A row whose cache is
    left-padded holds position ``q`` in column ``offset + q`` (the columns before ``offset`` are never seen);
    ``width ≥ Σ lens`` pads the queries to ``Q = width``, each padding query seeing only itself.
    """
    lens_t = torch.as_tensor(list(lens), dtype=torch.long)
    seg = torch.repeat_interleave(torch.arange(len(lens_t)), lens_t)  # [Q] segment of each query
    keep = torch.as_tensor(list(keeps), dtype=torch.long)[seg]
    q = torch.arange(seg.numel())
    i = q - (torch.cumsum(lens_t, 0) - lens_t)[seg]  # index within the segment
    col = torch.arange(cached)[None, :] - offset  # the position each cache column holds
    see_cache = (col >= 0) & (col < keep[:, None])
    see_new = (seg[:, None] == seg[None, :]) & (q[None, :] <= q[:, None])
    if window is not None:
        see_cache &= col > (keep + i)[:, None] - window
        see_new &= (i[:, None] - i[None, :]) < window
    allowed = torch.cat([see_cache, see_new], dim=1)
    pad = (width or seg.numel()) - seg.numel()
    if pad > 0:
        allowed = torch.nn.functional.pad(allowed, (0, pad, 0, pad))
        allowed[seg.numel():, cached + seg.numel():] = torch.eye(pad, dtype=torch.bool)
    return _additive(allowed, dtype)[None, None]


def batched_fork_mask(keeps: Sequence[int], width: int, cached: int, dtype: torch.dtype,
                      window: int | None = None) -> Tensor:  # fmt: skip
    """Additive mask ``[m, 1, width, cached + width]``: row ``j``, query ``i`` (position ``p = keeps[j] + i``) sees
    cache columns ``q < keeps[j]`` and its own row's queries ``r ≤ i``; with a ``window`` ``W``, only the keys at
    positions ``> p − W``."""
    keep = torch.as_tensor(list(keeps), dtype=torch.long)[:, None, None]  # [m, 1, 1]
    i = torch.arange(width)[None, :, None]
    col = torch.arange(cached)[None, None, :]
    see_cache = col < keep
    r = torch.arange(width)[None, None, :]
    see_new = (r <= i).expand(len(keeps), -1, -1)
    if window is not None:
        see_cache = see_cache & (col > keep + i - window)
        see_new = see_new & (i - r < window)
    return _additive(torch.cat([see_cache.expand(-1, width, -1), see_new], dim=2), dtype)[:, None]


def _probe(logits: Tensor, answer_ids: Mapping[str, Sequence[int]], true_name: str) -> tuple[list, list]:
    pm, pt = probe_from_logits(logits, answer_ids, true_name)
    return pm.tolist(), pt.tolist()


def _forward(model: nn.Module, ids: Tensor, pos: Tensor, mask: object, cache: ForkCache, rows: Tensor) -> Tensor:
    out = model(input_ids=ids, position_ids=pos, attention_mask=mask, use_cache=True, logits_to_keep=rows,
                **cache_kwargs(model, cache))  # fmt: skip
    return out.logits


def read_forks(
    model: nn.Module, cache: ForkCache, keeps: Sequence[int], feeds: Sequence[Sequence[int]],
    answer_ids: Mapping[str, Sequence[int]], true_name: str, fork_batch: int,
) -> tuple[np.ndarray, np.ndarray]:
    """``(pmass, p_true)`` float64 ``[m]`` at the end of each feed ``f_j`` read on the cache cropped to ``keeps[j]``.

    At most ``fork_batch`` feeds per forward, in the current (steering) context; ``cache`` leaves as it came.
    """
    device = next(model.parameters()).device
    dtype = base_lm(model).get_input_embeddings().weight.dtype
    plan, cached = cache.plan, cached_positions(cache)
    pmass, p_true = np.full(len(feeds), np.nan), np.full(len(feeds), np.nan)
    for start in range(0, len(feeds), fork_batch):
        ks, fs = [operator.index(k) for k in keeps[start : start + fork_batch]], feeds[start : start + fork_batch]
        lens = [len(f) for f in fs]
        if plan.mode == "packed":
            ids = torch.tensor([[i for f in fs for i in f]], dtype=torch.long, device=device)
            pos = torch.tensor([[k + i for k, n in zip(ks, lens, strict=True) for i in range(n)]], device=device)
            mask = plan.masks(lambda w: packed_fork_mask(ks, lens, cached, dtype, w).to(device))  # noqa: B023
            ends = (torch.tensor(lens).cumsum(0) - 1).to(device)
            try:
                logits = _forward(model, ids, pos, mask, cache, ends)[0]
            finally:
                cache.crop(cached - cached_positions(cache))  # crop(−k) drops the k packed positions
        else:
            width, kmax = max(lens), max(ks)
            ids = torch.tensor([list(f) + [f[-1]] * (width - len(f)) for f in fs], dtype=torch.long, device=device)
            pos = (torch.tensor(ks)[:, None] + torch.arange(width)[None]).to(device)
            mask = plan.masks(lambda w: batched_fork_mask(ks, width, kmax, dtype, w).to(device))  # noqa: B023
            rows = sorted(set(n - 1 for n in lens))
            logits = _forward(model, ids, pos, mask, read_cache(model, cache, ks), torch.tensor(rows, device=device))
            logits = logits[torch.arange(len(fs), device=device),
                            torch.tensor([rows.index(n - 1) for n in lens], device=device)]
        pmass[start : start + len(fs)], p_true[start : start + len(fs)] = _probe(logits, answer_ids, true_name)
    return pmass, p_true
