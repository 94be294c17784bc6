"""The fan figure of a survival run (docs/maths.md §4.7): per-token KL quantiles over t, one colour per α.

For the trajectories of one α with per-token KL ``kl_i[p]`` (``p < g_i``), at each position ``t`` the quantiles
are taken over the trajectories that **still exist** there (``g_i > t``; one that ended at EOS drops out, it is
neither zero nor carried forward):

    Q_q(t) = nanquantile({kl_i[t] : g_i > t}, q),   q ∈ {0.05, 0.25, 0.5, 0.75, 0.95}   (linear interpolation)

drawn for the positions with at least one trajectory. A fan thins, and at the end may rest on a few rollouts,
where many ended early: ``n(t)`` is returned next to the quantiles.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

QUANTILES: tuple[float, ...] = (0.05, 0.25, 0.5, 0.75, 0.95)


def kl_quantiles(
    kl_per_traj: Sequence[np.ndarray | Sequence[float]], qs: Sequence[float] = QUANTILES
) -> tuple[np.ndarray, np.ndarray]:
    """``(n [T] int64, Q [len(qs), T] float64)``: at each position ``t < T = max g_i`` the number of trajectories
    that reach it and the ``qs``-quantiles of their ``kl_i[t]`` (module docstring).

    Example:
        >>> n, q = kl_quantiles([[0.0, 2.0, 4.0], [1.0]], qs=(0.5,))
        >>> n.tolist(), q.tolist()
        ([2, 1, 1], [[0.5, 2.0, 4.0]])
    """
    if not all(0.0 <= q <= 1.0 for q in qs) or len(qs) == 0:
        raise ValueError(f"qs={list(qs)!r} must be a non-empty list of quantile levels in [0, 1]")
    rows = [np.asarray(k, dtype=np.float64) for k in kl_per_traj]
    if any(r.ndim != 1 for r in rows):
        raise ValueError("every trajectory's KL must be 1-D")
    longest = max((r.size for r in rows), default=0)
    if longest == 0:
        return np.zeros(0, np.int64), np.zeros((len(qs), 0))
    pad = np.full((len(rows), longest), np.nan)
    for i, r in enumerate(rows):
        pad[i, : r.size] = r
    return np.sum(~np.isnan(pad), axis=0).astype(np.int64), np.nanquantile(pad, list(qs), axis=0)


def fan_figure(kl_by_label: Mapping[str, Sequence[np.ndarray | Sequence[float]]], target: float = 1.0,
               title: str = "", log_y: bool = True) -> Figure:
    """Median per-token KL over t with 25–75 % and 5–95 % bands, one colour per label (in order).

    Artists, per label: one median line (``ax.lines``, labelled with the α label) and two ``fill_between``
    bands (5–95 % then 25–75 %, ``ax.collections``); then the dashed horizontal target line. ``log_y``: a symlog
    axis (linear below 1e-3, so α = 0's KL ≡ 0 is drawn) over the orders of magnitude the doses span.
    """
    if not kl_by_label:
        raise ValueError("fan_figure needs at least one α label")
    fig = Figure(figsize=(8, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    colours = [f"C{i % 10}" for i in range(len(kl_by_label))]
    for colour, (label, kls) in zip(colours, kl_by_label.items(), strict=True):
        _, q = kl_quantiles(kls, QUANTILES)
        t = np.arange(q.shape[1])
        ax.fill_between(t, q[0], q[4], color=colour, alpha=0.12, lw=0)
        ax.fill_between(t, q[1], q[3], color=colour, alpha=0.3, lw=0)
        ax.plot(t, q[2], color=colour, lw=1.6, label=str(label))
    ax.axhline(target, color="gray", ls="--", lw=1.2, label=f"target {target:g}")
    if log_y:
        ax.set_yscale("symlog", linthresh=1e-3)
    ax.set_ylim(bottom=0.0)
    ax.set_xlabel("token position (trajectories that still exist)")
    ax.set_ylabel("per-token KL: median, 25–75 %, 5–95 %")
    if title:
        ax.set_title(title)
    ax.legend(title="α", fontsize="small", loc="upper left")
    fig.tight_layout()
    return fig
