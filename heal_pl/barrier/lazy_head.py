"""The barrier's gradient paid for only on the steps where the hinge opens (docs/maths.md §1.12).

``barrier = lam · relu(D − tau)`` with ``D = agg_t KL_t``: whenever ``D ≤ tau`` the barrier and its gradient are
exactly 0, and the step needs only the per-token KL *values* (for ``D`` and the logged statistics), never their
gradient. Per chunk of ``c`` counted rows (``h`` the student's rows, ``r`` the ref's, one *unit* = a ``c × H × V``
matrix product; SFT alone pays 2: ``h Wᵀ`` and ``(p − e_y) W``)::

                              eager (FusedHeadStats)         lazy (LazyHeadStats)       lazy, ref LSE cached
    forward                   [r; h] Wᵀ              2       [r; h] Wᵀ            2     h Wᵀ                 1
                              [∂KL; ∂NLL] W          2       ∂NLL W               1     ∂NLL W               1
    backward, hinge closed    —                  (4)         —                  (3)     —                  (2)
    backward, hinge open      —                  (4)         [r; h] Wᵀ again, then (g_kl ∂KL + g_nll ∂NLL) W:
                                                             + 3                (6)     + 3                (5)

With the ref's rows and the LSE of its logits cached (``HealModule(ref_cache=True)``, every epoch after the first),
a ``kl_rev`` barrier without soft-cap reads the KL values from the student's logits alone
(:func:`cached_ref_chunk`). The lazy backward tells the two cases apart by the gradient it receives: the barrier's
``relu`` sends an exactly zero ``∂L/∂KL`` when closed, and any nonzero entry (the hinge open, or any other use of the
KL in the loss) takes the exact path, so the gradient is right whatever the plan guessed. Where it opens, the SFT's
and the KL's logit gradients are summed before the one product with ``W`` (their weights are known by then).
:class:`KLGradPlan` picks the path of each step as the cheaper bet on the run's record: eager after a firing until
the run shows its openings to be isolated (a run firing on every step pays the eager 4), lazy otherwise. Under DDP
each rank reads its own gradient (for ``p95`` / ``max`` only the rank holding the tail token recomputes).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from heal_pl.barrier.fused_head import (
    HeadTransform,
    first_finite,
    head_stats,
    logits_into,
    rows_times_weight,
    workspace,
)


class PathCosts(NamedTuple):
    """A head's cost per step on each path (module docstring's units): lazy and closed, lazy and opening, eager."""

    closed: int
    opened: int
    eager: int

    @property
    def break_even(self) -> float:
        """``(E − L) / (O − L)``: above this chance of firing, the eager path is the cheaper bet."""
        return (self.eager - self.closed) / (self.opened - self.closed)


FUSED = PathCosts(closed=3, opened=6, eager=4)  # the ref's rows recomputed
FUSED_CACHED = PathCosts(closed=2, opened=5, eager=4)  # a closed step reads the KL from cached LSEs
CHECKPOINTED = PathCosts(closed=1, opened=3, eager=2)  # KLBarrierCallback: the ref's head product per chunk, once on
# a closed step (values only), twice on an eager one (recomputed under checkpointing), three times on an opening


class KLGradPlan:
    """Which path the next training step's head takes, eager or lazy: the cheaper bet on the run's own record.

    The lazy path pays ``L`` units on a closed step and ``O`` on one that opens, the eager path ``E`` either way
    (:class:`PathCosts`: ``FUSED`` 3, 6, 4; ``FUSED_CACHED`` 2, 5, 4 from cached LSEs). Eager is cheaper in
    expectation when the chance ``p`` that this step fires is above ``break_even = (E − L) / (O − L)``. ``p`` is
    read from the steps seen so far, given whether the last one fired: ``(those that fired + prior) / (their
    number + 1)`` over the steps that followed one in the same state, with prior 1 after a firing and 0 after a
    closed step. So a fresh plan goes eager after a firing and lazy after a closed step, a run firing on every step
    stays eager, and one whose openings are isolated learns to stay lazy after them (after one closing at
    ``break_even = 2/3``, two at ``1/3``). The choice moves only cost: every path gives the same numbers (float32
    summation order aside). ``lazy=False`` always takes the eager path (the benchmarks' "today" arm). :meth:`saw`
    records a backward pass's ``∂L/∂KL`` as a device tensor (no host sync); :meth:`eager` reads it once per step.
    """

    def __init__(self, lazy: bool = True) -> None:
        self.lazy = lazy
        self._fired: Tensor | bool | None = None  # this step's record, written by the backward pass (None: no step yet)
        self._last: bool | None = None  # whether the step before it fired (None: not known)
        self.seen = [[0, 0], [0, 0]]  # seen[a] = [steps after one with fired = a, how many of them fired]

    def saw(self, g_kl: Tensor) -> None:
        """A backward pass's ``∂L/∂KL``: the step fired if any entry is nonzero."""
        self.note(g_kl.ne(0).any())

    def note(self, fired: Tensor | bool) -> None:
        """This step's barrier fired (a tensor is kept as a device tensor: no host sync)."""
        so_far = False if self._fired is None else self._fired
        self._fired = fired.bool() | so_far if isinstance(fired, Tensor) else bool(fired) or so_far

    def state_dict(self) -> dict[str, object]:
        """What a checkpoint keeps: a resumed run takes the path the uninterrupted one would (bit for bit)."""
        fired = None if self._fired is None else bool(self._fired)
        return {"lazy": self.lazy, "fired": fired, "last": self._last, "seen": [list(r) for r in self.seen]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.lazy, self._fired = state.get("lazy", self.lazy), state.get("fired")
        self._last, self.seen = state.get("last"), [list(r) for r in state.get("seen", [[0, 0], [0, 0]])]

    def chance(self, fired: bool) -> float:
        """The estimated chance that a step fires after one that did (``fired``) or did not."""
        after, opened = self.seen[fired]
        return (opened + fired) / (after + 1)

    def eager(self, costs: PathCosts = FUSED) -> bool:
        """The path of this step (read at the head's forward): eager if not lazy, or if the chance that it fires,
        given the last step, is above ``costs.break_even``. Files the last step in the record and resets it for
        this step's backward."""
        if self._fired is None:  # the first step: nothing to go on
            self._fired = False
            return not self.lazy
        fired, self._fired = bool(self._fired), False
        if self._last is not None:
            self.seen[self._last][0] += 1
            self.seen[self._last][1] += fired
        self._last = fired
        return not self.lazy or self.chance(fired) > costs.break_even


def reads_cached_lse(ref_lse: Tensor | None, reverse: bool, transform: HeadTransform) -> bool:
    """Whether a lazy step takes its KL values from the ref's cached LSEs (:func:`cached_ref_chunk`): a ``kl_rev``
    head without soft-cap, with the LSEs at hand."""
    return ref_lse is not None and reverse and not transform.softcap


def row_lse(z: Tensor, nll: Tensor, idx: Tensor) -> Tensor:
    """``LSE(z)`` per row read off the log-softmax at the target column, ``z_y − log p_y = z_y + NLL``: no pass over
    ``V`` (the ref's, cached, and the student's are read the same way, so ``h = r`` gives equal numbers)."""
    return z.gather(-1, idx).squeeze(-1) + nll


def cached_ref_chunk(h: Tensor, weight: Tensor, bias: Tensor | None, ref: Tensor, ref_lse: Tensor, targets: Tensor,
                     ws: Tensor, transform: HeadTransform) -> tuple[Tensor, Tensor, Tensor]:
    """``(kl_rev [c], nll [c], G [c, H])`` of one chunk from the student's logits alone, the ref's rows ``r`` and
    their cached ``LSE(z_q)``. Without a soft-cap the two logit vectors differ by a linear map of the rows,
    ``z_q − z = s (r − h) Wᵀ`` (the bias cancels), so with ``log p = z − LSE(z)``::

        KL_t = Σ_v p (log p − log q) = LSE(z_q) − LSE(z) − s · (r − h) · Wᵀp,     Wᵀp = G + W_y
        G = (p − e_y) W   (the NLL's row gradient ÷ s, which SFT computes anyway)

    One ``[c, H] × [H, V]`` and one ``[c, V] × [V, H]`` product, SFT's two. The float32 error of ``Wᵀp`` is
    multiplied by ``r − h``, not by ``r``: it vanishes with the drift (``h = r`` gives 0 exactly, the two LSEs
    being the same computation), unlike ``r · Wᵀp − Σ p z``, which cancels two ~``|z|``-sized numbers."""
    c, vocab = h.shape[0], weight.shape[0]
    z, logp = ws[: 2 * c * vocab].view(2, c, vocab)
    logits_into(z, h, weight, bias, transform)
    torch.log_softmax(z, dim=-1, out=logp)
    idx = targets.unsqueeze(-1)
    nll = -logp.gather(-1, idx).squeeze(-1)
    lse = row_lse(z, nll, idx)  # as the ref's cached LSE was read
    dz = torch.exp(logp, out=z).scatter_add_(-1, idx, torch.full_like(idx, -1, dtype=torch.float32))  # p − e_y
    G = rows_times_weight(dz, weight)
    with torch.autocast(h.device.type, enabled=False):
        wtp = (G + weight[targets].float()).double()
        drift = ((ref.double() - h.double()) * wtp).sum(-1)
    kl = ref_lse.double() - lse.double() - transform.scale * drift
    return kl.float(), nll, G


class LazyHeadStats(torch.autograd.Function):
    """``(kl [N], nll [N], lse) = LazyHeadStats.apply(h, weight, bias, ref, targets, reverse, chunk_size,
    transform, plan, ref_lse, want_lse)`` over all ``N`` counted rows, ``chunk_size`` at a time (module docstring).

    The forward pass keeps ``∂NLL/∂h`` (``[N, H]`` float32), ``h`` and ``ref``; the backward pass scales the first
    by ``∂L/∂NLL`` when ``∂L/∂KL`` is zero, else recomputes each chunk's logits and runs one product. ``weight`` and
    ``bias`` must not need gradients. With ``ref_lse`` (``[N]``, a ref cache's) a ``kl_rev`` head without soft-cap
    takes the KL values from :func:`cached_ref_chunk`; ``want_lse`` returns the ref rows' ``LSE`` as ``lse``
    (computed on the way; empty otherwise), for the cache.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        h: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        ref: Tensor,
        targets: Tensor,
        reverse: bool,
        chunk_size: int,
        transform: HeadTransform,
        plan: KLGradPlan | None = None,
        ref_lse: Tensor | None = None,
        want_lse: bool = False,
    ) -> tuple[Tensor, Tensor, Tensor]:
        n = h.shape[0]
        capped = bool(transform.softcap)
        identity = reads_cached_lse(ref_lse, reverse, transform)
        ws = workspace(min(chunk_size, n), weight.shape[0], h.device, with_ref=not identity, capped=capped)
        nll_grads = torch.empty(n, weight.shape[1], dtype=torch.float32, device=h.device)

        def chunks(safe: bool) -> tuple[Tensor, Tensor, Tensor]:
            kls, nlls, lses = [], [], []
            for i in range(0, n, chunk_size):
                sl = slice(i, i + chunk_size)
                if identity:
                    kl, nll, nll_grads[sl] = cached_ref_chunk(h[sl], weight, bias, ref[sl], ref_lse[sl], targets[sl],
                                                              ws, transform)  # fmt: skip
                else:
                    kl, nll, dz = head_stats(h[sl], weight, bias, ref[sl], targets[sl], reverse, ws, grads="nll",
                                             transform=transform, safe=safe, ref_lse=lses if want_lse else None)
                    nll_grads[sl] = rows_times_weight(dz, weight)
                kls.append(kl)
                nlls.append(nll)
            return torch.cat(kls), torch.cat(nlls), torch.cat(lses) if lses else h.new_empty(0, dtype=torch.float32)

        (kl, nll, lse), safe = first_finite(chunks)
        if transform.scale != 1.0:
            nll_grads.mul_(transform.scale)
        ctx.args = (weight, bias, reverse, chunk_size, transform, safe or identity, plan)  # identity: p = 0 unseen
        ctx.save_for_backward(h, ref, targets, nll_grads)
        ctx.mark_non_differentiable(lse)
        return kl, nll, lse

    @staticmethod
    def backward(ctx: Any, g_kl: Tensor, g_nll: Tensor, _: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        h, ref, targets, nll_grads = ctx.saved_tensors
        weight, bias, reverse, chunk_size, transform, safe, plan = ctx.args
        if plan is not None:
            plan.saw(g_kl)
        if not bool(g_kl.ne(0).any()):  # the hinge is closed: SFT's gradient alone (one host sync per step)
            return (g_nll.unsqueeze(-1) * nll_grads).to(h.dtype), *([None] * 10)
        n, c = h.shape[0], min(chunk_size, h.shape[0])
        ws = workspace(c, weight.shape[0], h.device, with_ref=True, capped=bool(transform.softcap))
        grad_h = torch.empty(n, weight.shape[1], dtype=torch.float32, device=h.device)
        for i in range(0, n, chunk_size):
            sl = slice(i, i + chunk_size)
            _, _, dz = head_stats(h[sl], weight, bias, ref[sl], targets[sl], reverse, ws, grads="both",
                                  transform=transform, safe=safe)  # fmt: skip
            k = dz.shape[0] // 2
            combined = dz[:k].mul_(g_kl[sl].unsqueeze(-1)).addcmul_(dz[k:], g_nll[sl].unsqueeze(-1))
            grad_h[sl] = rows_times_weight(combined, weight)
        if transform.scale != 1.0:
            grad_h.mul_(transform.scale)
        return grad_h.to(h.dtype), *([None] * 10)
