"""Per-token KL and NLL through a *frozen* linear LM head, with the row gradients taken in the forward pass.

For one chunk of ``c`` student hidden rows ``h`` (``z = h Wᵀ + b``, ``p = softmax(z)``, ref log-probs
``log q``, next tokens ``y``)::

    NLL_t = −log p[t, y_t]                      ∂NLL_t/∂z_t = p_t − e_{y_t}
    kl_rev: KL_t = Σ_v p (log p − log q)        ∂KL_t/∂z_t = p_t ⊙ (log p_t − log q_t − KL_t)
    kl_fwd: KL_t = Σ_v q (log q − log p)        ∂KL_t/∂z_t = p_t − q_t

and ``∂/∂h_t = (∂/∂z_t) W``. With the head frozen, nothing else needs a gradient, so the forward pass
keeps only the two ``[c, H]`` row gradients and the backward pass scales them by the incoming
``∂L/∂KL_t`` and ``∂L/∂NLL_t``. Compared with activation checkpointing of the chunk this skips the
recomputation of both heads and both log-softmaxes in the backward pass, and still never holds more
than one chunk of ``[c, V]`` float32 values.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


class FusedHeadStats(torch.autograd.Function):
    """``(kl [c], nll [c]) = FusedHeadStats.apply(h, weight, bias, logq, targets, reverse)``.

    ``logq`` is ``None`` for plain SFT (``kl`` is then zeros). ``weight``/``bias`` must not need gradients.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, h: Tensor, weight: Tensor, bias: Tensor | None, logq: Tensor | None, targets: Tensor, reverse: bool
    ) -> tuple[Tensor, Tensor]:
        z = torch.nn.functional.linear(h, weight, bias).float()
        logp = torch.log_softmax(z, dim=-1)
        del z
        p = logp.exp()
        idx = targets.unsqueeze(-1)
        nll = -logp.gather(-1, idx).squeeze(-1)
        d_nll = p.scatter_add(-1, idx, torch.full_like(idx, -1, dtype=p.dtype))  # p − e_y
        if logq is None:
            kl = torch.zeros_like(nll)
            grads = d_nll
        else:
            if reverse:
                diff = torch.where(p == 0, torch.zeros_like(logp), logp - logq)
                kl = (p * diff).sum(-1)
                d_kl = p * (diff - kl.unsqueeze(-1))
            else:
                q = logq.exp()
                kl = (q * torch.where(q == 0, torch.zeros_like(logq), logq - logp)).sum(-1)
                d_kl = p - q
            grads = torch.cat([d_kl, d_nll])
        row_grads = grads @ weight.to(grads.dtype)  # [c or 2c, H]
        ctx.has_kl = logq is not None
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
        return grad_h.to(ctx.h_dtype), None, None, None, None, None
