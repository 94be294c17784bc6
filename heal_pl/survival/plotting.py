"""Figure builders for survival runs (docs/maths.md §4.7).

Every builder returns a :class:`matplotlib.figure.Figure` built without pyplot, so no global state (backend,
current figure) is touched; the caller saves it with :func:`save_figure` or hands it to TensorBoard's
``add_figure``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

ALIVE_COLOUR = "tab:blue"
DEAD_COLOUR = "tab:red"
MEDIAN_COLOUR = "black"
NORM_HEAD = 20


def moving_average(x: np.ndarray | Sequence[float], width: int) -> np.ndarray:
    """Centered moving average of ``x`` with window ``width``; output has the same length as ``x``.

    The window at position ``i`` covers ``x[i - (width - 1) // 2 - ((width - 1) % 2) : ...]`` exactly as
    ``np.convolve(x, ones(width), mode="same")`` aligns it. Edge handling: near the ends the window is
    truncated to the values that exist and the mean is taken over those only (no zero padding), i.e.
    ``convolve(x, ones, "same") / convolve(ones_like(x), ones, "same")``. ``width == 1`` returns a copy.
    """
    if not isinstance(width, (int, np.integer)) or isinstance(width, bool) or width < 1:
        raise ValueError(f"width must be an integer >= 1, got {width!r}")
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"x must be 1-D, got shape {arr.shape}")
    if arr.size == 0 or width == 1:
        return arr.copy()
    kernel = np.ones(int(width))
    num = np.convolve(arr, kernel, mode="same")
    den = np.convolve(np.ones_like(arr), kernel, mode="same")
    if arr.size < width:  # np.convolve "same" returns max(M, N) samples; keep the centred part
        start = (width - arr.size) // 2
        num, den = num[start:start + arr.size], den[start:start + arr.size]
    return num / den


def _normalise(y: np.ndarray) -> np.ndarray:
    """Divide by the p95 of the first ``NORM_HEAD`` raw values; unchanged when that p95 is 0 or not finite."""
    head = y[:NORM_HEAD]
    p95 = float(np.percentile(head, 95)) if head.size else 0.0
    if not np.isfinite(p95) or p95 == 0.0:
        return y
    return y / p95


def spaghetti_figure(
    kl_per_traj: Sequence[np.ndarray | Sequence[float]],
    alive_until: Sequence[int | None],
    eos_at: Sequence[int | None],
    target: float = 1.0,
    smooth: int = 5,
    normalise: bool = False,
    title: str = "",
    log_y: bool = False,
) -> Figure:
    """Per-token KL per trajectory, smoothed, coloured alive / dead.

    ``kl_per_traj[i]`` is the per-token KL of trajectory ``i``; ``alive_until[i]`` the token position of its
    death fork (``None``: never died) and ``eos_at[i]`` its EOS position (``None``: no EOS). Each curve is
    smoothed with :func:`moving_average` (width ``smooth``). Positions ``[0, death]`` are drawn in
    ``ALIVE_COLOUR`` and ``[death, end)`` in ``DEAD_COLOUR`` (the two share the death point so the line is
    continuous). The median across trajectories (over positions where at least one exists) is drawn in black,
    EOS positions as one scatter of ``x`` markers, and ``target`` as a dotted horizontal line.

    With ``normalise`` each trajectory is divided, before smoothing, by the p95 of its first 20 raw tokens;
    a trajectory whose p95 is zero (or not finite) is left unnormalised.

    Artists: per trajectory one alive line plus one dead line if it dies, then the median line, then the
    target line (``ax.lines`` in that order); the EOS markers are one collection when any EOS exists.
    """
    n = len(kl_per_traj)
    if len(alive_until) != n:
        raise ValueError(f"alive_until has length {len(alive_until)}, expected {n} (len(kl_per_traj))")
    if len(eos_at) != n:
        raise ValueError(f"eos_at has length {len(eos_at)}, expected {n} (len(kl_per_traj))")
    if not isinstance(smooth, (int, np.integer)) or isinstance(smooth, bool) or smooth < 1:
        raise ValueError(f"smooth must be an integer >= 1, got {smooth!r}")

    fig = Figure(figsize=(8, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    curves: list[np.ndarray] = []
    eos_x: list[int] = []
    eos_y: list[float] = []
    for i, raw in enumerate(kl_per_traj):
        y = np.asarray(raw, dtype=np.float64)
        if y.ndim != 1:
            raise ValueError(f"kl_per_traj[{i}] must be 1-D, got shape {y.shape}")
        if normalise:
            y = _normalise(y)
        y = moving_average(y, int(smooth))
        curves.append(y)
        if y.size == 0:
            continue
        x = np.arange(y.size)
        death = alive_until[i]
        if death is None or death >= y.size:
            ax.plot(x, y, color=ALIVE_COLOUR, lw=0.8, alpha=0.6)
        else:
            d = max(int(death), 0)
            ax.plot(x[: d + 1], y[: d + 1], color=ALIVE_COLOUR, lw=0.8, alpha=0.6)
            ax.plot(x[d:], y[d:], color=DEAD_COLOUR, lw=0.8, alpha=0.6)
        eos = eos_at[i]
        if eos is not None:
            pos = min(max(int(eos), 0), y.size - 1)
            eos_x.append(pos)
            eos_y.append(float(y[pos]))

    longest = max((c.size for c in curves), default=0)
    if longest:
        pad = np.full((len(curves), longest), np.nan)
        for i, c in enumerate(curves):
            pad[i, : c.size] = c
        ax.plot(np.arange(longest), np.nanmedian(pad, axis=0), color=MEDIAN_COLOUR, lw=1.8, label="median")
    else:
        ax.plot([], [], color=MEDIAN_COLOUR, lw=1.8, label="median")
    ax.axhline(target, color="gray", ls=":", lw=1.2, label=f"target {target:g}")
    if eos_x:
        ax.scatter(eos_x, eos_y, marker="x", color="black", s=25, zorder=3, label="EOS")
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel("token position")
    ax.set_ylabel("KL / p95(first 20)" if normalise else "per-token KL")
    if title:
        ax.set_title(title)
    ax.legend(loc="upper left", fontsize="small")
    fig.tight_layout()
    return fig


def survival_figure(tables: Mapping[str, Mapping], title: str = "", horizon: float | None = None) -> Figure:
    """Kaplan–Meier step curves, one per α label, on one axis with shaded confidence bands.

    ``tables`` maps an α label to a :func:`heal_pl.survival.table.survival_table` result; its ``"curve"``
    (``timeline``, ``S``, ``lower``, ``upper``) is drawn with ``where="post"``. One line per label, in order,
    with the label as its legend entry. With ``horizon`` (the last fork) every curve is held flat from its
    last time point to the horizon, so a curve whose events all happen at fork 0 is a line, not a dot.
    """
    if not tables:
        raise ValueError("tables must hold at least one α label")
    fig = Figure(figsize=(7, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    draw_km(ax, tables, horizon)
    ax.set_xlabel("tokens generated")
    ax.set_ylabel("S(t)")
    ax.set_ylim(0.0, 1.02)
    if title:
        ax.set_title(title)
    ax.legend(title="α", fontsize="small")
    fig.tight_layout()
    return fig


def draw_km(ax: Any, tables: Mapping[str, Mapping], horizon: float | None = None) -> None:
    """Draw :func:`survival_figure`'s step curves and bands on the matplotlib axis ``ax``."""
    for label, table in tables.items():
        if "curve" not in table:
            raise ValueError(f"tables[{label!r}] has no 'curve' key")
        curve = table["curve"]
        t = np.asarray(curve["timeline"], dtype=np.float64)
        s = np.asarray(curve["S"], dtype=np.float64)
        lower = np.asarray(curve["lower"], dtype=np.float64)
        upper = np.asarray(curve["upper"], dtype=np.float64)
        if t.shape != s.shape:
            raise ValueError(f"tables[{label!r}]['curve']: timeline and S lengths differ")
        if horizon is not None and t.size and t[-1] < horizon:
            t, s, lower, upper = (np.append(x, v) for x, v in ((t, horizon), (s, s[-1]), (lower, lower[-1]),
                                                               (upper, upper[-1])))  # fmt: skip
        (line,) = ax.step(t, s, where="post", label=str(label))
        ax.fill_between(t, lower, upper, step="post", alpha=0.2, color=line.get_color())


def save_figure(fig: Figure, path: str | Path, dpi: int = 120) -> Path:
    """Write ``fig`` as a PNG at ``path`` (parent directories created) and return the path."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png", dpi=dpi)
    return out
