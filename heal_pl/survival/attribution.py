"""Death attribution (docs/maths.md §4.7): was a death preceded by a KL spike, and do the survivors spike too?

For one α label with per-token KL ``kl_i[p]`` (the KL of the distribution that produced generated token ``p``,
``p = 0 … g_i − 1``) and fork points ``t_0 = 0 < t_1 < … < t_{m−1} = w``, the probe at fork ``t`` has seen the
generated tokens ``0 … t − 1``. The **window** of fork ``t`` is the last ``k`` of them:

    W_i(t) = kl_i[max(0, t − k) : t]            (empty at t = 0: nothing generated yet)
    max W, p95 W (linear interpolation, numpy's default), mean W;   all NaN for an empty window

Deaths and survivors use :func:`heal_pl.survival.table.death_times` (the definition of the Kaplan–Meier table):
trajectory ``i`` dies at ``t_d = duration_i`` (the first reached fork with ``pmass < threshold``). It is
**alive at fork t** when it reached it and has not died at or before it:

    alive_i(t)  ⇔  t ≤ g_i  and  (died_i ⇒ duration_i > t)  and  (censored_i ⇒ duration_i ≥ t)

Per death ``d`` the comparison set is ``A(t_d) = {i : alive_i(t_d)}`` (same α, same fork). Per label:

    died_at_0    deaths at fork 0 (no window: the probe failed before any steered token)
    spike        deaths with max W(t_d) > kl_target;   no_spike = the other deaths with a window
    dead_max_med median of max W(t_d) over the deaths with a window;  dead_mean_med likewise for mean W
    alive_max_med, alive_mean_med  the same over the pooled comparison windows (one per death and alive i)
    alive_spike  share of the pooled comparison windows with max > kl_target (the survivors' spike rate)
    pct_rank     mean over deaths (with a window and a non-empty A(t_d)) of
                 (#{i ∈ A: max W_i < max W_d} + ½ #{i ∈ A: max W_i = max W_d}) / |A|;   ½ ⇔ no association

A statistic over nothing is ``None``. Transitions (the figure): for every fork ``j ≥ 1`` a trajectory reached
while alive at fork ``j − 1`` (``alive_i(t_{j−1})`` and ``t_j ≤ g_i``), the pmass drop ``pmass[j] − pmass[j−1]``
against max ``W(t_j)``, *dying* when ``t_j`` is its death fork, else *alive*. Forks after a death are not at risk
and are left out.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from heal_pl.survival.plotting import ALIVE_COLOUR, DEAD_COLOUR, save_figure
from heal_pl.survival.stored import SIGN_WORD, LabelGroup, labels_of_sign, markdown_rows, write_csv
from heal_pl.survival.table import death_times

WINDOW = 8
COLUMNS = ("label", "sign", "alpha", "k", "n", "died", "died_at_0", "spike", "no_spike", "dead_max_med",
           "alive_max_med", "dead_mean_med", "alive_mean_med", "alive_spike", "pct_rank")  # fmt: skip
DEATH_COLUMNS = ("label", "prompt_index", "t_death", "win_lo", "win_hi", "win_max", "win_p95", "win_mean", "spike",
                 "n_alive", "alive_max_med", "pct_rank")  # fmt: skip


def check_window_size(k: int) -> None:
    """``ValueError`` unless the window ``k`` is an integer ≥ 1."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"attribution window k={k!r} must be an integer ≥ 1 (generated tokens before a fork)")


def window_stats(kl: np.ndarray | Sequence[float], t: int, k: int = WINDOW) -> tuple[float, float, float]:
    """``(max, p95, mean)`` of ``kl[max(0, t − k) : t]``, the window the probe at fork ``t`` has seen; NaN if empty.

    Example:
        >>> [round(x, 4) for x in window_stats([0.0, 1.0, 5.0, 2.0, 3.0], t=4, k=3)]  # kl[1:4] = 1, 5, 2
        [5.0, 4.7, 2.6667]
    """
    check_window_size(k)
    x = np.asarray(kl, dtype=np.float64)
    if not 0 <= t <= x.size:
        raise ValueError(f"fork t={t} is outside [0, {x.size}] (the trajectory's generated tokens)")
    win = x[max(0, t - k) : t]
    if win.size == 0:
        return float("nan"), float("nan"), float("nan")
    return float(win.max()), float(np.percentile(win, 95)), float(win.mean())


def alive_at(durations: np.ndarray, observed: np.ndarray, gen_lens: np.ndarray, t: int) -> np.ndarray:
    """``alive_i(t)`` of the module docstring, a bool ``[n]``."""
    return (t <= gen_lens) & np.where(observed, durations > t, durations >= t)


def _median(xs: Sequence[float]) -> float | None:
    return float(np.median(xs)) if len(xs) else None


def attribute_deaths(
    group: LabelGroup, fork_points: np.ndarray, threshold: float, kl_target: float, k: int = WINDOW
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """``(row, deaths)`` for one label: the summary row (:data:`COLUMNS`) and one record per death
    (:data:`DEATH_COLUMNS`; ``win_lo``/``win_hi`` the token positions ``[lo, hi)`` of the window)."""
    check_window_size(k)
    durations, observed = death_times(group.pmass, group.gen_lens, fork_points, threshold)
    deaths, pooled_max, pooled_mean, ranks = [], [], [], []
    for i in np.flatnonzero(observed):
        t = int(durations[i])
        mx, p95, mean = window_stats(group.kl[i], t, k)
        others = np.flatnonzero(alive_at(durations, observed, group.gen_lens, t))
        stats = [window_stats(group.kl[j], t, k) for j in others]
        alive_max = [s[0] for s in stats]
        rank = None
        if t > 0:
            pooled_max += alive_max
            pooled_mean += [s[2] for s in stats]
            if alive_max:
                a = np.asarray(alive_max)
                rank = float((np.sum(a < mx) + 0.5 * np.sum(a == mx)) / a.size)
                ranks.append(rank)
        deaths.append({"label": group.label, "prompt_index": group.prompt_index[i], "t_death": t,
                       "win_lo": max(0, t - k), "win_hi": t, "win_max": mx if t > 0 else None,
                       "win_p95": p95 if t > 0 else None, "win_mean": mean if t > 0 else None,
                       "spike": bool(t > 0 and mx > kl_target), "n_alive": int(others.size),
                       "alive_max_med": _median(alive_max) if t > 0 else None, "pct_rank": rank})  # fmt: skip
    windowed = [d for d in deaths if d["t_death"] > 0]
    row = {"label": group.label, "sign": group.sign, "alpha": group.alpha, "k": int(k), "n": len(group.kl),
           "died": len(deaths), "died_at_0": len(deaths) - len(windowed),
           "spike": sum(d["spike"] for d in windowed), "no_spike": sum(not d["spike"] for d in windowed),
           "dead_max_med": _median([d["win_max"] for d in windowed]), "alive_max_med": _median(pooled_max),
           "dead_mean_med": _median([d["win_mean"] for d in windowed]), "alive_mean_med": _median(pooled_mean),
           "alive_spike": float(np.mean(np.asarray(pooled_max) > kl_target)) if pooled_max else None,
           "pct_rank": float(np.mean(ranks)) if ranks else None}  # fmt: skip
    return row, deaths


def transitions(group: LabelGroup, fork_points: np.ndarray, threshold: float, k: int = WINDOW) -> dict[str, np.ndarray]:
    """The at-risk fork transitions of the module docstring: ``drop``, ``win_max`` (float64) and ``dying`` (bool),
    one entry per (fork ``j ≥ 1``, trajectory), fork-major."""
    durations, observed = death_times(group.pmass, group.gen_lens, fork_points, threshold)
    drop, win_max, dying = [], [], []
    for j in range(1, fork_points.size):
        prev, t = int(fork_points[j - 1]), int(fork_points[j])
        at_risk = alive_at(durations, observed, group.gen_lens, prev) & (t <= group.gen_lens)
        for i in np.flatnonzero(at_risk):
            drop.append(group.pmass[i, j] - group.pmass[i, j - 1])
            win_max.append(window_stats(group.kl[i], t, k)[0])
            dying.append(bool(observed[i] and durations[i] == t))
    return {"drop": np.asarray(drop, np.float64), "win_max": np.asarray(win_max, np.float64),
            "dying": np.asarray(dying, bool)}  # fmt: skip


def attribution_figure(
    panels: Mapping[str, Mapping[str, np.ndarray]], kl_target: float, k: int = WINDOW, title: str = ""
) -> Figure:
    """One panel per α label: pmass drop against the preceding window's max KL (:func:`transitions`).

    Per panel (in ``panels`` order) two scatter collections, alive transitions (``ALIVE_COLOUR``) then dying ones
    (``DEAD_COLOUR``), a dashed vertical line at ``kl_target`` and a dotted horizontal one at 0. The x axis is
    symlog (linear below 1e-3) so α = 0 (KL ≡ 0) and large doses share it.
    """
    if not panels:
        raise ValueError("attribution_figure needs at least one α label")
    cols = min(4, len(panels))
    rows = -(-len(panels) // cols)
    fig = Figure(figsize=(3.2 * cols, 2.8 * rows))
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, sharex=True, sharey=True, squeeze=False).ravel()
    for ax, (label, tr) in zip(axes, panels.items(), strict=False):
        dying = np.asarray(tr["dying"], bool)
        x, y = np.asarray(tr["win_max"]), np.asarray(tr["drop"])
        ax.scatter(x[~dying], y[~dying], s=10, color=ALIVE_COLOUR, alpha=0.5, label="alive at fork")
        ax.scatter(x[dying], y[dying], s=14, color=DEAD_COLOUR, alpha=0.8, label="dies at fork")
        ax.axvline(kl_target, color="gray", ls="--", lw=1.0, label=f"target {kl_target:g}")
        ax.axhline(0.0, color="gray", ls=":", lw=0.8)
        ax.set_xscale("symlog", linthresh=1e-3)
        ax.set_title(f"α = {label}", fontsize="small")
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    for ax in axes[(rows - 1) * cols:]:
        ax.set_xlabel(f"max KL, last {k} tokens")
    for ax in axes[::cols]:
        ax.set_ylabel("Δ pmass (fork j − j−1)")
    axes[0].legend(fontsize="x-small", loc="lower left")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def write_attribution(
    out: Path, groups: Mapping[str, LabelGroup], fork_points: np.ndarray, threshold: float, kl_target: float,
    signs: Sequence[str], k: int = WINDOW, writer: Any = None, tag_prefix: str = "survival/", step: int = 0,
) -> list[dict[str, Any]]:
    """Write ``attribution.csv``/``.md`` (one row per label), ``attribution_deaths.csv`` (one row per death) and
    ``figures/attribution_<sign>.png``; TensorBoard: figure ``survival/attribution/<sign>`` and scalars
    ``survival/attribution/<sign>/{spike,no_spike,died_at_0,pct_rank}`` at step ``round(100 α)``. Returns the rows."""
    out.mkdir(parents=True, exist_ok=True)
    rows, deaths = [], []
    for g in groups.values():
        row, ds = attribute_deaths(g, fork_points, threshold, kl_target, k)
        rows.append(row)
        deaths += ds
    write_csv(out / "attribution.csv", rows, COLUMNS)
    write_csv(out / "attribution_deaths.csv", deaths, DEATH_COLUMNS)
    (out / "attribution.md").write_text(markdown_rows(rows, COLUMNS, none="–"))
    for sign in signs:
        labels = labels_of_sign(groups, sign)
        fig = attribution_figure({lab: transitions(groups[lab], fork_points, threshold, k) for lab in labels},
                                 kl_target, k, title=f"pmass drop vs preceding KL, sign {sign} "
                                 f"(red: the fork where pmass < {threshold:g} first)")  # fmt: skip
        save_figure(fig, out / "figures" / f"attribution_{SIGN_WORD[sign]}.png")
        if writer is not None:
            writer.add_figure(f"{tag_prefix}attribution/{sign}", fig, step)
            for r in (r for r in rows if r["label"] in labels):
                for key in ("spike", "no_spike", "died_at_0", "pct_rank"):
                    if r[key] is not None:
                        writer.add_scalar(f"{tag_prefix}attribution/{sign}/{key}", float(r[key]),
                                          round(100 * r["alpha"]))  # fmt: skip
    return rows
