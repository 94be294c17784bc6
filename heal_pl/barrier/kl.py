"""Per-token KL, its aggregation over a batch, and the KL barrier (docs/maths.md §1).

Everything here is pure torch on tensors; the Lightning glue lives in ``module.py`` and
``callbacks/kl_barrier.py``.

    KL_t(a ‖ b) = Σ_v exp(logp_a[t, v]) · (logp_a[t, v] − logp_b[t, v])        (float32)
    D           = agg_t KL_t           agg ∈ {mean, rmse, p95, max}, t over counted positions
    barrier     = lam · (1 + round)^lam_round_pow · relu(D − tau)

A position ``t`` *counts* when the token it predicts (``t + 1``) is a completion token, i.e.
``labels[t + 1] != -100`` in Hugging Face's label convention (:mod:`heal_pl.barrier.positions`). Log-softmax
is taken only at counted positions and ``chunk_size`` rows at a time, so neither the student nor the ref ever
materialises a ``[B, T, V]`` float32 tensor.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, NamedTuple, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from heal_pl.barrier.fused_head import (
    IDENTITY,
    FusedHeadStats,
    HeadTransform,
    first_finite,
    head_stats,
    linear_f32,
    workspace,
)
from heal_pl.barrier.lazy_head import FUSED, FUSED_CACHED, KLGradPlan, LazyHeadStats, reads_cached_lse
from heal_pl.barrier.positions import IGNORE_INDEX, Counted, counted_positions, gather_rows  # noqa: F401 (public here too)
from heal_pl.checks import check_choice

Agg = Literal["mean", "rmse", "p95", "max"]
Reg = Literal["kl_rev", "kl_fwd", "nll"]


def per_token_kl(logp_p: Tensor, logp_q: Tensor) -> Tensor:
    r"""KL(p ‖ q) at every position, summed over the last (vocabulary) dimension.

    .. math:: \mathrm{KL}_t = \sum_v e^{\log p_{t,v}} (\log p_{t,v} - \log q_{t,v})

    Args:
        logp_p: log-probabilities of ``p``, shape ``[..., V]``, any float dtype.
        logp_q: log-probabilities of ``q``, same shape.

    Returns:
        float32 tensor of shape ``[...]``. Terms with ``p = 0`` contribute 0 (``0 · log 0 = 0``),
        also when ``logp_p`` is ``-inf``.

    Example:
        >>> lp = torch.log(torch.tensor([[0.5, 0.5]]))
        >>> lq = torch.log(torch.tensor([[0.25, 0.75]]))
        >>> round(per_token_kl(lp, lq).item(), 6)
        0.143841
    """
    if logp_p.shape != logp_q.shape:
        raise ValueError(f"per_token_kl: shapes differ, got {tuple(logp_p.shape)=} and {tuple(logp_q.shape)=}")
    lp, lq = logp_p.float(), logp_q.float()
    p = lp.exp()
    zero = p == 0
    diff = torch.where(zero, torch.zeros_like(lp), lp - lq)
    return (p * diff).sum(-1)


def quantile(x: Tensor, q: float) -> Tensor:
    """The ``q``-quantile of a 1-D tensor by linear interpolation (numpy's default method).

    ``pos = q · (n − 1)``; result ``= s[⌊pos⌋] + (pos − ⌊pos⌋) · (s[⌈pos⌉] − s[⌊pos⌋])`` with ``s`` sorted.
    Works for any float dtype and any length (``torch.quantile`` rejects bf16 and > 2^24 elements);
    differentiable: the gradient reaches the two neighbouring order statistics.
    """
    if x.dim() != 1 or x.numel() == 0:
        raise ValueError(f"quantile needs a non-empty 1-D tensor, got shape {tuple(x.shape)}")
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile q={q} must lie in [0, 1]")
    s, _ = torch.sort(x)
    pos = q * (x.numel() - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (pos - lo) * (s[hi] - s[lo])


def aggregate(kl: Tensor, how: Agg, eps: float = 1e-8) -> Tensor:
    r"""Pool the per-token KL of the counted positions into one number ``D``.

    =====  =========================================  ======================================
    how    value                                      note
    =====  =========================================  ======================================
    mean   :math:`\frac1n\sum_t KL_t`                 dilutes a few incoherent positions
    rmse   :math:`\sqrt{\frac1n\sum_t KL_t^2+\epsilon}`  always in float32 (eps survives)
    p95    95th percentile, linear interpolation      numpy's default
    max    :math:`\max_t KL_t`                        gradient reaches one position
    =====  =========================================  ======================================

    Args:
        kl: 1-D tensor of per-token KL at the counted positions (any float dtype).
        how: the aggregator.
        eps: added under the square root of ``rmse`` so its gradient is finite at 0.

    Returns:
        a float32 scalar. With no counted position it is exactly 0 and its gradient is zero.
    """
    check_choice("agg", how, Agg)
    if kl.dim() != 1:
        raise ValueError(f"aggregate expects the 1-D tensor of counted positions, got shape {tuple(kl.shape)}")
    x = kl.float()
    if x.numel() == 0:
        return x.sum()  # exactly 0.0, zero (empty) gradient, no NaN
    if how == "mean":
        return x.mean()
    if how == "rmse":
        return torch.sqrt(x.square().mean() + eps)
    if how == "p95":
        return quantile(x, 0.95)
    return x.max()


def kl_summary(kl: Tensor) -> dict[str, Tensor]:
    """Detached mean / rmse / p95 / max of per-token KL, for logging (zeros when empty; rmse without eps)."""
    kl = kl.detach()
    return {f"kl_{how}": aggregate(kl, how, eps=0.0) for how in get_args(Agg)}


class BarrierOutput(NamedTuple):
    value: Tensor  # lam_eff · relu(D − tau), float32 scalar with gradient
    D: Tensor  # the aggregate, detached
    fired: Tensor  # 1.0 when D > tau else 0.0
    lam_eff: float


@dataclass
class KLBarrier:
    """The KL barrier ``lam · (1 + round)^lam_round_pow · relu(agg_t KL_t − tau)``.

    Args:
        reg: ``kl_rev`` = KL(student ‖ ref) (mode-seeking, default), ``kl_fwd`` = KL(ref ‖ student),
            ``nll`` = no barrier (plain SFT).
        agg: how per-token KL is pooled over the batch: mean | rmse | p95 | max.
        tau: the free budget, on the scale of ``agg`` (rmse/p95/max read far above mean).
        lam: barrier weight.
        lam_round_pow: in round ``r`` of a steer → heal loop the weight is ``lam · (1 + r)^lam_round_pow``.
        eps: the rmse epsilon.
    """

    reg: Reg = "kl_rev"
    agg: Agg = "rmse"
    tau: float = 1.0
    lam: float = 1.0
    lam_round_pow: float = 0.0
    eps: float = 1e-8

    def __post_init__(self) -> None:
        check_choice("reg", self.reg, Reg)
        check_choice("agg", self.agg, Agg)
        if self.tau < 0 or not math.isfinite(self.tau):
            raise ValueError(f"tau={self.tau} must be a finite number >= 0")
        if self.lam < 0 or not math.isfinite(self.lam):
            raise ValueError(f"lam={self.lam} must be a finite number >= 0")
        if self.eps <= 0:
            raise ValueError(f"eps={self.eps} must be > 0")

    @property
    def active(self) -> bool:
        """False for ``reg = nll``: no ref forward is needed at all."""
        return self.reg != "nll"

    def lam_eff(self, round: int = 0) -> float:
        return self.lam * (1 + round) ** self.lam_round_pow

    def __call__(self, kl: Tensor, round: int = 0) -> BarrierOutput:
        """Barrier value for the 1-D per-token KL of one batch's counted positions."""
        lam_eff = self.lam_eff(round)
        if not self.active:
            zero = (kl.float() * 0.0).nan_to_num(0.0, 0.0, 0.0).sum()  # 0 with a zero gradient, even at inf
            return BarrierOutput(zero, zero.detach(), zero.detach(), 0.0)
        D = aggregate(kl, self.agg, self.eps)
        value = lam_eff * F.relu(D - self.tau)
        return BarrierOutput(value, D.detach(), (self.tau < D).float().detach(), lam_eff)


def accumulation_note(accumulate_grad_batches: int, agg: Agg) -> str | None:
    """What gradient accumulation does to the barrier (logged once at fit start), or None without accumulation.

    The barrier is computed per micro-batch: ``agg`` pools the tokens of one micro-batch, and the ``k`` barriers
    of an accumulated step add up (each scaled by ``1/k``, like the SFT loss). For ``mean`` that is the mean of the
    micro-batch means; for ``rmse``, ``p95`` and ``max`` it is not the aggregate of the whole accumulated batch
    (docs/maths.md §1.11)."""
    if accumulate_grad_batches <= 1:
        return None
    return (f"accumulate_grad_batches={accumulate_grad_batches}: the KL barrier ({agg}) is computed per micro-batch "
            f"and averaged over the {accumulate_grad_batches} micro-batches of a step, not over their pooled tokens")


# ----------------------------------------------------------------------------- chunked statistics


class TokenStats(NamedTuple):
    kl: Tensor  # [N] float32 per-token KL (zeros when reg = nll)
    nll: Tensor  # [N] float32 per-token next-token NLL of the student


Head = Callable[[Tensor], Tensor]


def _apply_head(head: Head | None, rows: Tensor) -> Tensor:
    """Float32 logits of ``rows``: a bare ``nn.Linear`` head runs its product in float32 (autocast off)."""
    if head is None:
        return rows.float()
    if isinstance(head, nn.Linear):
        return linear_f32(rows, head.weight, head.bias)
    return head(rows).float()


def _chunk_stats(
    student: Tensor, ref: Tensor | None, targets: Tensor, head: Head | None, ref_head: Head | None, reg: str
) -> tuple[Tensor, Tensor]:
    logp = torch.log_softmax(_apply_head(head, student), dim=-1)
    nll = -logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    if ref is None:
        return torch.zeros_like(nll), nll
    with torch.no_grad():
        logp_ref = torch.log_softmax(_apply_head(ref_head, ref), dim=-1)
    kl = per_token_kl(logp, logp_ref) if reg == "kl_rev" else per_token_kl(logp_ref, logp)
    return kl, nll


def _fusable(head: Head | None, grad_on: bool = True) -> tuple[nn.Linear, HeadTransform] | None:
    """``(projection, transform)`` of a frozen linear head: a bare ``nn.Linear``, or an object with a frozen
    ``proj: nn.Linear`` and a ``transform: HeadTransform`` (``heal_pl.models.lm.LMHead``); else ``None``.
    With ``grad_on=False`` (no gradient is recorded) a trainable ``proj`` is read like a frozen one."""
    proj, transform = (head, IDENTITY) if isinstance(head, nn.Linear) else (
        getattr(head, "proj", None), getattr(head, "transform", None))  # fmt: skip
    if type(proj) is not nn.Linear or not isinstance(transform, HeadTransform):
        return None
    return None if grad_on and any(p.requires_grad for p in proj.parameters()) else (proj, transform)


def token_stats(
    student: Tensor,
    ref: Tensor | None,
    targets: Tensor,
    *,
    head: Head | None = None,
    ref_head: Head | None = None,
    reg: Reg = "kl_rev",
    chunk_size: int = 256,
    plan: KLGradPlan | None = None,
    ref_lse: Tensor | None = None,
    lse_out: list[Tensor] | None = None,
) -> TokenStats:
    """Per-token KL(student, ref) and student NLL at ``N`` counted rows, ``chunk_size`` rows at a time.

    Args:
        student: ``[N, H]`` hidden states (with ``head``) or ``[N, V]`` logits (``head=None``).
        ref: the same for the ref model (computed without gradient), or ``None`` for ``reg = nll``.
        targets: ``[N]`` next-token ids.
        head: maps student hidden rows to logits (the LM head: an ``nn.Linear``, a
            :class:`heal_pl.models.lm.LMHead` with the model's own logit transform, or any callable); ``None`` when
            rows already are logits. Logits are float32 whatever the weight dtype or autocast.
        ref_head: the same for ``ref`` rows; defaults to ``head``. Lets ``ref`` be hidden states while
            ``student`` rows are logits already (the callback's case).
        reg: ``kl_rev`` → KL(student ‖ ref); ``kl_fwd`` → KL(ref ‖ student); ``nll`` → KL is 0.
        chunk_size: rows per chunk. At most one chunk of ``[chunk_size, V]`` float32 values is alive
            at a time, in the forward and in the backward pass. When ``head`` is a frozen linear head
            (the usual LoRA case; ``LMHead`` included, its transform and gradient applied exactly) and
            ``ref_head`` is the same head, each chunk's row gradients are
            taken in the forward pass, in one ``[3 · chunk_size, V]`` float32 workspace reused by
            every chunk (``heal_pl.barrier.fused_head``; without gradients, e.g. in validation or a
            rollout's KL, the same kernel skips the gradient passes, and under ``torch.no_grad`` a
            trainable linear head is fused too); otherwise each chunk runs under activation
            checkpointing.
        plan: with a frozen linear head, rows that need a gradient and a ref, the path of the KL's gradient
            (:mod:`heal_pl.barrier.lazy_head`: paid for only when the barrier's hinge opens); ``None`` = eager.
        ref_lse: ``[N]`` ``LSE`` of the ref's logits at these rows (a ref cache's); on the lazy path of a ``kl_rev``
            barrier without soft-cap the KL values then come without the ref's head product.
        lse_out: on the lazy path, a list the ref rows' ``[N]`` ``LSE`` is appended to (for a ref cache to keep).

    Returns:
        ``TokenStats(kl, nll)``, both float32 ``[N]``.
    """
    check_choice("reg", reg, Reg)
    ref_head = head if ref_head is None else ref_head
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be >= 1")
    if reg == "nll":
        ref = None
    elif ref is None:
        raise ValueError(f"reg={reg!r} needs ref rows")
    n = targets.numel()
    if n == 0:
        empty = student.new_zeros(0, dtype=torch.float32) + student.float().sum() * 0.0
        return TokenStats(empty, empty)
    grad_on = torch.is_grad_enabled()  # the student rows or a trainable head may need gradients
    fusable = _fusable(head, grad_on) if ref is None or ref_head is head else None
    differentiable = grad_on and student.requires_grad
    if fusable is not None and differentiable and ref is not None and plan is not None:
        proj, transform = fusable
        if not plan.eager(FUSED_CACHED if reads_cached_lse(ref_lse, reg == "kl_rev", transform) else FUSED):
            kl, nll, lse = LazyHeadStats.apply(student, proj.weight, proj.bias, ref, targets, reg == "kl_rev",
                                               chunk_size, transform, plan, ref_lse, lse_out is not None)  # fmt: skip
            if lse_out is not None and lse.numel():
                lse_out.append(lse)
            return TokenStats(kl, nll)
    if fusable is not None:
        proj, transform = fusable
        ws = workspace(min(chunk_size, n), proj.weight.shape[0], student.device, with_ref=ref is not None,
                       capped=bool(transform.softcap) and differentiable)  # fmt: skip

    def chunks(safe: bool) -> tuple[Tensor, Tensor]:
        kls, nlls = [], []
        for i in range(0, n, chunk_size):
            sl = slice(i, i + chunk_size)
            args = (student[sl], None if ref is None else ref[sl], targets[sl], head, ref_head, reg)
            if fusable is not None and differentiable:
                kl, nll = FusedHeadStats.apply(student[sl], proj.weight, proj.bias, args[1], targets[sl],
                                               reg == "kl_rev", ws, transform, safe, plan)  # fmt: skip
            elif fusable is not None:  # a frozen head and rows without gradient: nothing to differentiate
                with torch.no_grad():
                    kl, nll, _ = head_stats(student[sl], proj.weight, proj.bias, args[1], targets[sl],
                                            reg == "kl_rev", ws, grads="none", transform=transform, safe=safe)
            elif grad_on:
                kl, nll = checkpoint(_chunk_stats, *args, use_reentrant=False)
            else:
                kl, nll = _chunk_stats(*args)
            kls.append(kl)
            nlls.append(nll)
        return torch.cat(kls), torch.cat(nlls)

    if fusable is None or ref is None:  # the unfused path masks p = 0 itself (per_token_kl)
        return TokenStats(*chunks(False))
    return TokenStats(*first_finite(chunks)[0])


def check_finite(stats: TokenStats, where: str) -> None:
    """Raise ``FloatingPointError`` naming ``where`` (e.g. the step) if any KL or NLL is NaN/inf."""
    for name, x in stats._asdict().items():
        if x.numel() and not torch.isfinite(x).all():
            bad = int((~torch.isfinite(x)).sum())
            raise FloatingPointError(f"non-finite logits at {where}: {bad} of {x.numel()} per-token {name} are NaN/inf")


def barrier_metrics(stats: TokenStats, out: BarrierOutput) -> dict[str, Tensor | float]:
    """The scalars logged per batch: barrier value, firing, D, lam_eff, KL summary, counted tokens."""
    return {
        "barrier": out.value.detach(),
        "barrier_fired": out.fired,
        "D": out.D,
        "lam_eff": out.lam_eff,
        "tokens": float(stats.nll.numel()),
        **kl_summary(stats.kl),
    }


def naive_token_stats(
    student_logits: Tensor, ref_logits: Tensor | None, labels: Tensor, reg: Reg = "kl_rev"
) -> TokenStats:
    """Reference implementation: full ``[B, T, V]`` float32 log-softmax for both models, then mask.

    Used by tests (chunked must equal this) and by the memory benchmark; never in training.
    """
    logp = torch.log_softmax(student_logits[:, :-1].float(), dim=-1)
    nxt = labels[:, 1:]
    mask = nxt != IGNORE_INDEX
    nll = -logp.gather(-1, nxt.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    if reg == "nll" or ref_logits is None:
        kl = torch.zeros_like(nll)
    else:
        logp_ref = torch.log_softmax(ref_logits[:, :-1].float(), dim=-1)
        kl = per_token_kl(logp, logp_ref) if reg == "kl_rev" else per_token_kl(logp_ref, logp)
    return TokenStats(kl[mask], nll[mask])
