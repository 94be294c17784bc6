"""Per-token KL and NLL through a *frozen* linear LM head, with the row gradients taken in the forward pass.

For one chunk of ``c`` student hidden rows ``h`` and ref hidden rows ``r`` (``z = h Wᵀ + b``,
``z_q = r Wᵀ + b``, ``p = softmax(z)``, ``q = softmax(z_q)``, next tokens ``y``)::

    NLL_t = −log p[t, y_t]                      ∂NLL_t/∂z_t = p_t − e_{y_t}
    kl_rev: KL_t = Σ_v p (log p − log q)        ∂KL_t/∂z_t = p_t ⊙ (log p_t − log q_t − KL_t)
    kl_fwd: KL_t = Σ_v q (log q − log p)        ∂KL_t/∂z_t = p_t − q_t

and ``∂/∂h_t = (∂/∂z_t) W``. With the head frozen, nothing else needs a gradient, so the forward pass
keeps only the two ``[c, H]`` row gradients and the backward pass scales them by the incoming
``∂L/∂KL_t`` and ``∂L/∂NLL_t``. Compared with activation checkpointing of the chunk this skips the
recomputation of both heads and both log-softmaxes in the backward pass.

The work per chunk is two matrix-product calls — ``[r; h] Wᵀ`` and ``[∂KL/∂z; ∂NLL/∂z] W`` — and a
handful of passes over ``[c, V]`` float32 values, all written into one ``[3c, V]`` workspace that the
caller allocates once and reuses for every chunk, instead of a dozen fresh ``[c, V]`` temporaries per
chunk (on 1,536 SmolLM2 rows, one thread: 8.9 s → 5.4 s forward + backward, of which ≈ 4.6 s are the
matrix products)::

    workspace rows   [0, c)        [c, 2c)              [2c, 3c)
    (no ref: rows [0, c) hold z, rows [c, 2c) log p → ∂NLL)
    1. matmul        z_q           z
    2. log-softmax   z_q           log q                log p         (nll read from log p)
    3. kl_rev        —             log p − log q → ∂KL  p → ∂NLL
       kl_fwd        q             log q − log p → ∂KL  p → ∂NLL

``0 · log 0 = 0``: the fast path multiplies ``p · (log p − log q)`` directly, which is exact whenever
both log-softmaxes are finite; only when a KL comes out non-finite are the ``p = 0`` (``q = 0``)
terms masked to zero, as :func:`heal_pl.kl.per_token_kl` does.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor


def workspace(rows: int, vocab: int, device: torch.device, with_ref: bool = True) -> Tensor:
    """Flat float32 storage for chunks of up to ``rows`` rows: ``3 · rows · vocab`` values (2 without a ref)."""
    return torch.empty((3 if with_ref else 2) * rows * vocab, dtype=torch.float32, device=device)


def _rowdot(a: Tensor, b: Tensor) -> Tensor:
    """``Σ_v a[t, v] · b[t, v]`` per row in float32, without a ``[c, V]`` temporary (batched dot products)."""
    with torch.autocast(a.device.type, enabled=False):
        return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


def _logits_into(out: Tensor, x: Tensor, weight: Tensor, bias: Tensor | None) -> None:
    """``out ← x Wᵀ + b`` in float32, straight into ``out`` when no dtype conversion is needed."""
    if x.dtype == weight.dtype == torch.float32 and not torch.is_autocast_enabled(x.device.type):
        torch.mm(x, weight.t(), out=out)
        if bias is not None:
            out.add_(bias)
    else:  # bf16/fp16 weights or autocast: the model's own precision, then float32 (as nn.Linear would)
        out.copy_(F.linear(x, weight, bias))


def head_stats(
    h: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    ref: Tensor | None,
    targets: Tensor,
    reverse: bool,
    ws: Tensor,
    grads: bool = True,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """``(kl [c], nll [c], dz)`` for one chunk, in the workspace ``ws`` (see the module docstring).

    ``dz`` is the workspace view ``[∂KL/∂z; ∂NLL/∂z]`` (``[2c, V]``; ``[c, V]`` of ``∂NLL/∂z`` without a
    ref), valid until ``ws`` is reused; ``None`` when ``grads=False`` (evaluation: no gradient passes).
    """
    c, vocab = h.shape[0], weight.shape[0]
    blocks = 2 if ref is None else 3
    if ws.numel() < blocks * c * vocab or ws.dtype != torch.float32:
        raise ValueError(f"workspace holds {ws.numel()} {ws.dtype} values; need {blocks * c * vocab} float32")
    g = ws[: blocks * c * vocab].view(blocks * c, vocab)
    idx = targets.unsqueeze(-1)
    minus_one = torch.full_like(idx, -1, dtype=torch.float32)
    if ref is None:  # rows [0, c): z; [c, 2c): log p → ∂NLL
        z, logp = g[:c], g[c:]
        _logits_into(z, h, weight, bias)
        torch.log_softmax(z, dim=-1, out=logp)
        nll = -logp.gather(-1, idx).squeeze(-1)
        kl = torch.zeros_like(nll)
        if not grads:
            return kl, nll, None
        return kl, nll, logp.exp_().scatter_add_(-1, idx, minus_one)  # p − e_y
    zq, mid, logp = g[:c], g[c : 2 * c], g[2 * c :]
    _logits_into(g[: 2 * c], torch.cat([ref, h]), weight, bias)  # [z_q; z]: one matmul
    torch.log_softmax(mid, dim=-1, out=logp)
    torch.log_softmax(zq, dim=-1, out=mid)  # mid = log q
    nll = -logp.gather(-1, idx).squeeze(-1)
    if reverse:
        diff = torch.sub(logp, mid, out=mid)  # log p − log q
        p = logp.exp_()
        kl = _rowdot(p, diff)
        if not torch.isfinite(kl).all():
            diff.masked_fill_(p == 0, 0.0)  # 0 · log 0 = 0
            kl = _rowdot(p, diff)
        if grads:
            diff.sub_(kl.unsqueeze(-1)).mul_(p)  # ∂KL/∂z = p ⊙ (log p − log q − KL), in place
    else:
        q = torch.exp(mid, out=zq)
        diff = mid.sub_(logp)  # log q − log p
        kl = _rowdot(q, diff)
        if not torch.isfinite(kl).all():
            diff.masked_fill_(q == 0, 0.0)
            kl = _rowdot(q, diff)
        if grads:
            p = logp.exp_()
            torch.sub(p, q, out=mid)  # ∂KL/∂z = p − q
    if not grads:
        return kl, nll, None
    p.scatter_add_(-1, idx, minus_one)  # ∂NLL/∂z = p − e_y (p no longer needed)
    return kl, nll, g[c:]  # [∂KL/∂z; ∂NLL/∂z], contiguous rows [c, 3c)


class FusedHeadStats(torch.autograd.Function):
    """``(kl [c], nll [c]) = FusedHeadStats.apply(h, weight, bias, ref, targets, reverse, ws)``.

    ``ref`` is the ``[c, H]`` ref hidden rows, or ``None`` for plain SFT (``kl`` is then zeros).
    ``weight``/``bias`` must not need gradients. ``ws`` is a :func:`workspace` with room for ``c`` rows.
    The forward pass is :func:`head_stats` plus one matrix product ``dz W`` (the row gradients).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        h: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        ref: Tensor | None,
        targets: Tensor,
        reverse: bool,
        ws: Tensor,
    ) -> tuple[Tensor, Tensor]:
        kl, nll, dz = head_stats(h, weight, bias, ref, targets, reverse, ws)
        row_grads = dz @ weight.to(dz.dtype)  # [c or 2c, H]
        ctx.has_kl = ref is not None
        ctx.h_dtype = h.dtype
        ctx.save_for_backward(row_grads)
        return kl, nll

    @staticmethod
    def backward(ctx: Any, g_kl: Tensor, g_nll: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        (row_grads,) = ctx.saved_tensors
        if ctx.has_kl:
            c = g_nll.shape[0]
            grad_h = g_kl.unsqueeze(-1) * row_grads[:c] + g_nll.unsqueeze(-1) * row_grads[c:]
        else:
            grad_h = g_nll.unsqueeze(-1) * row_grads
        return grad_h.to(ctx.h_dtype), None, None, None, None, None, None
