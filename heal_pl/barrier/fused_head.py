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
terms masked to zero, as :func:`heal_pl.barrier.kl.per_token_kl` does.

**The head's own transform.** Some families transform the head's output (:class:`HeadTransform`):
``z = cap(s · (h Wᵀ + b))`` with ``s`` a multiplier (Cohere ``logit_scale``, Falcon-H1 ``lm_head_multiplier``)
or a divisor (Granite ``logits_scaling``) and ``cap(u) = c · tanh(u / c)`` (Gemma 2/3
``final_logit_softcapping``). It is applied in place after step 1, exactly as the model's forward writes it;
the chain rule gives ``∂/∂(hWᵀ) = s · (1 − (z/c)²) ⊙ ∂/∂z``: the scalar ``s`` is applied to the ``[c, H]`` row
gradients, and with a soft-cap the factor ``1 − (z/c)²`` of the student rows is kept in one more ``[c, V]``
block of the workspace (``capped=True``).

**Precision.** The head product is float32 whatever the weight's dtype and any autocast: a float32 weight
runs one float32 ``mm`` (autocast off); a bf16/fp16 weight is upcast ``_BLOCK_BYTES`` of the vocabulary at a
time (exact products, float32 accumulation and output), so no float32 copy of the whole weight exists. The
row gradients ``dz W`` are accumulated over the same vocabulary blocks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

_BLOCK_BYTES = 2**23  # a bf16/fp16 head is upcast at most this many float32 bytes of its vocabulary at a time


@dataclass(frozen=True)
class HeadTransform:
    """What a model's forward does to ``lm_head(h)``: ``z = cap(u · multiplier / divisor)``, ``cap(u) = c·tanh(u/c)``.

    Each step is skipped when its field is ``None``; the order and the operations are those of the model's own
    forward (``logits * logit_scale``, ``logits / logits_scaling``, ``tanh(logits / c) * c``), so float32
    results agree bit for bit. :func:`heal_pl.models.lm.head_transform` reads it from a model's config.
    """

    multiplier: float | None = None
    divisor: float | None = None
    softcap: float | None = None

    @property
    def scale(self) -> float:
        """``s = multiplier / divisor``: ``∂z/∂u = s`` without a soft-cap."""
        return (1.0 if self.multiplier is None else self.multiplier) / (1.0 if self.divisor is None else self.divisor)

    def __call__(self, u: Tensor) -> Tensor:
        """``z`` from the raw product ``u`` (out of place, differentiable)."""
        if self.multiplier is not None:
            u = u * self.multiplier
        if self.divisor is not None:
            u = u / self.divisor
        if self.softcap:
            u = torch.tanh(u / self.softcap) * self.softcap
        return u

    def apply_(self, u: Tensor) -> Tensor:
        """``z`` from ``u``, in place (the same operations as :meth:`__call__`)."""
        if self.multiplier is not None:
            u.mul_(self.multiplier)
        if self.divisor is not None:
            u.div_(self.divisor)
        if self.softcap:
            u.div_(self.softcap).tanh_().mul_(self.softcap)
        return u


IDENTITY = HeadTransform()


def workspace(rows: int, vocab: int, device: torch.device, with_ref: bool = True, capped: bool = False) -> Tensor:
    """Flat float32 storage for chunks of up to ``rows`` rows: ``(3 or 2 without a ref, + 1 with a soft-cap)
    · rows · vocab`` values."""
    blocks = (3 if with_ref else 2) + (1 if capped and with_ref else 0)
    return torch.empty(blocks * rows * vocab, dtype=torch.float32, device=device)


CPU_BUDGET = 4 * 256 * 49_152 * 4  # bytes of workspace without CUDA: 256 rows of 4 blocks at SmolLM2's vocabulary
CUDA_BUDGET_CAP = 4 * 2**30


def auto_chunk_size(vocab: int, device: torch.device, blocks: int = 4) -> int:
    """Rows per chunk (``chunk_size: auto``) whose ``[blocks · rows, V]`` float32 workspace fits the budget: on a
    CUDA device an eighth of its free memory at the time of the call, at most 4 GiB (Llama-3's 128k vocabulary with
    a few GiB free: ~1,000-2,000 rows, so the head runs few, large products); elsewhere 192 MiB (256 rows at SmolLM2's
    49,152 vocabulary, 48 at Gemma's 262k). A multiple of 64 when over 64, at least 8."""
    budget = CPU_BUDGET
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = min(free // 8, CUDA_BUDGET_CAP)
    rows = max(8, budget // (blocks * vocab * 4))
    return rows - rows % 64 if rows > 64 else rows


def check_chunk_size(chunk_size: Any, where: str) -> None:
    """Raise ``ValueError`` naming ``where`` unless ``chunk_size`` is an integer >= 1 or ``"auto"``."""
    if chunk_size != "auto" and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"{where}chunk_size={chunk_size!r} must be an integer >= 1 or 'auto'")


def chunk_rows(chunk_size: int | Literal["auto"], vocab: int, device: torch.device) -> int:
    """``chunk_size``, with ``auto`` resolved by :func:`auto_chunk_size` for ``vocab`` on ``device`` now."""
    return auto_chunk_size(vocab, device) if chunk_size == "auto" else chunk_size


def _vocab_blocks(weight: Tensor) -> range:
    """Vocabulary row starts of the upcast blocks of a non-float32 ``[V, H]`` weight."""
    return range(0, weight.shape[0], max(1, _BLOCK_BYTES // (4 * weight.shape[1])))


def linear_f32(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``x Wᵀ + b`` as float32 (differentiable), autocast off; a bf16/fp16 ``W`` is upcast block by block."""
    with torch.autocast(x.device.type, enabled=False):
        x = x.float()
        if weight.dtype == torch.float32:  # nn.Linear's own call: bit-identical to the model's float32 head
            return F.linear(x, weight, None if bias is None else bias.float())
        step = _vocab_blocks(weight).step
        out = torch.cat([x @ weight[v : v + step].float().t() for v in _vocab_blocks(weight)], dim=-1)
        return out if bias is None else out + bias.float()


def rows_times_weight(dz: Tensor, weight: Tensor) -> Tensor:
    """``dz W`` in float32 (``[n, V] @ [V, H]``), autocast off, a non-float32 ``W`` upcast block by block."""
    with torch.autocast(dz.device.type, enabled=False):
        if weight.dtype == torch.float32:
            return dz @ weight
        out = dz.new_zeros(dz.shape[0], weight.shape[1])
        step = _vocab_blocks(weight).step
        for v in _vocab_blocks(weight):
            out.addmm_(dz[:, v : v + step], weight[v : v + step].float())
        return out


def _rowdot(a: Tensor, b: Tensor) -> Tensor:
    """``Σ_v a[t, v] · b[t, v]`` per row in float32, without a ``[c, V]`` temporary (batched dot products)."""
    with torch.autocast(a.device.type, enabled=False):
        return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


def _kl_rows(w: Tensor, diff: Tensor, keep_diff: bool, safe: bool = False) -> Tensor:
    """``KL_t = Σ_v w[t, v] · diff[t, v]``. With ``safe`` the ``w = 0`` terms are set to 0 first (``0 · log 0 =
    0``; the caller reruns a chunk with ``safe`` when a KL came out non-finite, so the check costs no host sync per
    chunk); when the sum is finite both give the same numbers. With ``keep_diff`` (the gradient passes read ``diff``
    after) batched dot products, no ``[c, V]`` temporary; without, ``diff`` is overwritten by the products and summed
    by torch's pairwise reduction, as accurate as :func:`heal_pl.barrier.kl.per_token_kl` (the dot products
    accumulate in float32 along ``V``: largest relative error against float64 2.2e-4 instead of 2.9e-5 on 256 rows
    at V = 131,072)."""
    if safe:
        diff.masked_fill_(w == 0, 0.0)
    if keep_diff:
        return _rowdot(w, diff)
    return diff.mul_(w).sum(-1)


def first_finite(run: Callable[[bool], tuple[Tensor, ...]]) -> tuple[tuple[Tensor, ...], bool]:
    """``(run(False), False)``, or ``(run(True), True)`` when the first output of ``run(False)`` (the per-token KL of
    every chunk) is not finite: the ``0 · log 0`` check of :func:`_kl_rows` made once per call, after the chunk loop
    (one host sync), not once per chunk."""
    out = run(False)
    if bool(torch.isfinite(out[0]).all()):
        return out, False
    return run(True), True


def logits_into(out: Tensor, x: Tensor, weight: Tensor, bias: Tensor | None, transform: HeadTransform) -> None:
    """``out ← transform(x Wᵀ + b)`` in float32, autocast off; a non-float32 ``W`` is upcast block by block."""
    with torch.autocast(x.device.type, enabled=False):
        x = x.float()
        if weight.dtype == torch.float32:
            torch.mm(x, weight.t(), out=out)
        else:
            step = _vocab_blocks(weight).step
            for v in _vocab_blocks(weight):
                out[:, v : v + step] = x @ weight[v : v + step].float().t()
        if bias is not None:
            out.add_(bias)
    transform.apply_(out)


Grads = Literal["none", "nll", "both"]


def head_stats(
    h: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    ref: Tensor | None,
    targets: Tensor,
    reverse: bool,
    ws: Tensor,
    grads: Grads = "both",
    transform: HeadTransform = IDENTITY,
    safe: bool = False,
    ref_lse: list[Tensor] | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """``(kl [c], nll [c], dz)`` for one chunk, in the workspace ``ws`` (see the module docstring).

    ``dz`` is the workspace view of the logit gradients with respect to the raw product ``u = h Wᵀ + b``
    *divided by* ``transform.scale`` (the caller multiplies the row gradients by it), valid until ``ws`` is reused:
    ``[∂KL/∂u; ∂NLL/∂u]`` (``[2c, V]``) with ``grads="both"``, ``∂NLL/∂u`` (``[c, V]``) with ``grads="nll"`` or
    without a ref, ``None`` with ``grads="none"``. ``safe``: see :func:`_kl_rows`. ``ref_lse``: a list the ref
    rows' ``LSE(z_q)`` (``[c]`` float32) is appended to (what :mod:`heal_pl.barrier.lazy_head` caches).
    """
    c, vocab = h.shape[0], weight.shape[0]
    capped = bool(transform.softcap) and grads != "none"
    blocks = 2 if ref is None else 3 + capped
    if ws.numel() < blocks * c * vocab or ws.dtype != torch.float32:
        raise ValueError(f"workspace holds {ws.numel()} {ws.dtype} values; need {blocks * c * vocab} float32")
    g = ws[: blocks * c * vocab].view(blocks * c, vocab)
    idx = targets.unsqueeze(-1)
    minus_one = torch.full_like(idx, -1, dtype=torch.float32)
    if ref is None:  # rows [0, c): z, then the soft-cap factor; [c, 2c): log p → ∂NLL
        z, logp = g[:c], g[c:]
        logits_into(z, h, weight, bias, transform)
        torch.log_softmax(z, dim=-1, out=logp)
        nll = -logp.gather(-1, idx).squeeze(-1)
        kl = torch.zeros_like(nll)
        if grads == "none":
            return kl, nll, None
        dz = logp.exp_().scatter_add_(-1, idx, minus_one)  # p − e_y
        if capped:
            dz.mul_(_cap_factor_(z, transform.softcap))
        return kl, nll, dz
    zq, mid, logp = g[:c], g[c : 2 * c], g[2 * c : 3 * c]
    logits_into(g[: 2 * c], torch.cat([ref, h]), weight, bias, transform)  # [z_q; z]: one matmul
    if capped:  # rows [3c, 4c): 1 − (z/c)² of the student rows
        _cap_factor_(g[3 * c :].copy_(mid), transform.softcap)
    torch.log_softmax(mid, dim=-1, out=logp)
    torch.log_softmax(zq, dim=-1, out=mid)  # mid = log q
    if ref_lse is not None:  # LSE(z_q) = z_q,y − log q_y (heal_pl.barrier.lazy_head.row_lse reads the student's so)
        ref_lse.append(zq.gather(-1, idx).squeeze(-1) - mid.gather(-1, idx).squeeze(-1))
    nll = -logp.gather(-1, idx).squeeze(-1)
    both = grads == "both"
    if reverse:
        diff = torch.sub(logp, mid, out=mid)  # log p − log q
        p = logp.exp_()
        kl = _kl_rows(p, diff, keep_diff=both, safe=safe)
        if both:
            diff.sub_(kl.unsqueeze(-1)).mul_(p)  # ∂KL/∂z = p ⊙ (log p − log q − KL), in place
    else:
        q = torch.exp(mid, out=zq)
        diff = mid.sub_(logp)  # log q − log p
        kl = _kl_rows(q, diff, keep_diff=both, safe=safe)
        if grads != "none":
            p = logp.exp_()
        if both:
            torch.sub(p, q, out=mid)  # ∂KL/∂z = p − q
    if grads == "none":
        return kl, nll, None
    p.scatter_add_(-1, idx, minus_one)  # ∂NLL/∂z = p − e_y (p no longer needed)
    dz = g[c : 3 * c] if both else g[2 * c : 3 * c]  # [∂KL/∂z; ∂NLL/∂z] are contiguous rows [c, 3c)
    if capped:
        dz.view(-1, c, vocab).mul_(g[3 * c :])
    return kl, nll, dz


def _cap_factor_(z: Tensor, cap: float) -> Tensor:
    """``∂z/∂(u·s) = 1 − (z/c)²`` of soft-capped logits ``z = c·tanh(u·s/c)``, in place."""
    return z.div_(cap).square_().neg_().add_(1.0)


class FusedHeadStats(torch.autograd.Function):
    """``(kl [c], nll [c]) = FusedHeadStats.apply(h, weight, bias, ref, targets, reverse, ws, transform, safe, seen)``.

    ``ref`` is the ``[c, H]`` ref hidden rows, or ``None`` for plain SFT (``kl`` is then zeros).
    ``weight``/``bias`` must not need gradients. ``ws`` is a :func:`workspace` with room for ``c`` rows.
    The forward pass is :func:`head_stats` plus one matrix product ``s · dz W`` (the row gradients).
    ``seen`` (optional): a :class:`heal_pl.barrier.lazy_head.KLGradPlan`, told in the backward pass whether the KL
    received a gradient (as a device tensor: no host sync).
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
        transform: HeadTransform = IDENTITY,
        safe: bool = False,
        seen: Any = None,
    ) -> tuple[Tensor, Tensor]:
        kl, nll, dz = head_stats(h, weight, bias, ref, targets, reverse, ws, transform=transform, safe=safe)
        row_grads = rows_times_weight(dz, weight)  # [c or 2c, H] float32
        if transform.scale != 1.0:
            row_grads.mul_(transform.scale)
        ctx.has_kl, ctx.h_dtype, ctx.seen = ref is not None, h.dtype, seen
        ctx.save_for_backward(row_grads)
        return kl, nll

    @staticmethod
    def backward(ctx: Any, g_kl: Tensor, g_nll: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        (row_grads,) = ctx.saved_tensors
        if ctx.has_kl:
            c = g_nll.shape[0]
            grad_h = g_kl.unsqueeze(-1) * row_grads[:c] + g_nll.unsqueeze(-1) * row_grads[c:]
            if ctx.seen is not None:
                ctx.seen.saw(g_kl)
        else:
            grad_h = g_nll.unsqueeze(-1) * row_grads
        return grad_h.to(ctx.h_dtype), None, None, None, None, None, None, None, None, None
