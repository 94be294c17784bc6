"""Threshold sensitivity (docs/maths.md §4.6): the Kaplan–Meier table at other pmass thresholds, no model calls.

A trajectory is alive while ``pmass ≥ threshold``; the sweep's threshold is one choice. From the stored pmass
trajectories (``trajectories.json``, or the sweep's records in memory) this recomputes, for every threshold
``θ`` of a grid (default 0.5, 0.6, 0.75, 0.9, 0.95) and every α label, the table of
:func:`heal_pl.survival.table.survival_table` (``n``, ``died``, ``censored``, ``t_mid``, ``S_mid``, ``S_end``,
``t_half``) with ``threshold=θ`` — the same death times, censoring and lifelines estimator, nothing re-derived.
A lower θ can only delay deaths (pmass < θ' ⇒ pmass < θ for θ' ≤ θ), so ``died`` is non-decreasing in θ.

    heal thresholds --trajectories runs/survival/trajectories.json --thresholds "[0.5, 0.75, 0.95]"
    heal survival --config survival --thresholds "[0.5, 0.6, 0.75, 0.9, 0.95]"

Files (:func:`write_thresholds`): ``thresholds.csv`` / ``thresholds.md`` (one row per threshold and label) and
``figures/thresholds_<plus|minus>.png`` (one panel per threshold, a Kaplan–Meier curve per α of the sign, α = 0
in both); TensorBoard figure ``survival/thresholds/<sign>`` when a writer is given.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from heal_pl.survival.plotting import draw_km, save_figure
from heal_pl.survival.stored import (
    SIGN_WORD,
    by_label,
    labels_of_sign,
    load_trajectories,
    markdown_rows,
    signs_present,
    write_csv,
)
from heal_pl.survival.table import survival_table

log = logging.getLogger("heal_pl")
THRESHOLDS: tuple[float, ...] = (0.5, 0.6, 0.75, 0.9, 0.95)
COLUMNS = ("threshold", "label", "sign", "alpha", "n", "died", "censored", "t_mid", "S_mid", "S_end", "t_half")


def check_thresholds(thresholds: Sequence[float]) -> list[float]:
    """``thresholds`` as floats; ``ValueError`` unless a non-empty list of distinct numbers in (0, 1)."""
    ok = (isinstance(thresholds, Sequence) and not isinstance(thresholds, str) and len(thresholds) > 0
          and all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and 0 < x < 1
                  for x in thresholds) and len(set(thresholds)) == len(thresholds))  # fmt: skip
    if not ok:
        raise ValueError(f"thresholds={thresholds!r} must be a non-empty list of distinct numbers in the open "
                         "interval (0, 1)")
    return [float(x) for x in thresholds]


def threshold_sensitivity(
    source: str | Path | Mapping[str, Any], thresholds: Sequence[float] = THRESHOLDS
) -> dict[str, Any]:
    """The survival table of every α label at every threshold, from stored trajectories (no model).

    Args:
        source: a ``trajectories.json`` path (``heal survival``'s output) or its parsed object
            ``{"fork_points": [...], "trajectories": [...]}``.
        thresholds: the pmass thresholds, each in (0, 1).

    Returns:
        ``{"fork_points": [...], "rows": [row per (threshold, label)] (:data:`COLUMNS`),
        "tables": {threshold: {label: survival_table(...)}}}``.
    """
    grid = check_thresholds(thresholds)
    forks, records = load_trajectories(source)
    groups = by_label(records)
    rows, tables = [], {}
    for th in grid:
        tables[th] = {}
        for label, g in groups.items():
            table = survival_table(g.pmass, g.gen_lens, forks, th)
            tables[th][label] = table
            rows.append({"threshold": th, "label": label, "sign": g.sign, "alpha": g.alpha,
                         **{k: table[k] for k in COLUMNS[4:]}})  # fmt: skip
    return {"fork_points": forks.tolist(), "rows": rows, "tables": tables}


def thresholds_figure(tables: Mapping[float, Mapping[str, Mapping]], horizon: float, title: str = "") -> Figure:
    """Small multiples: one panel per threshold (in ``tables`` order), the Kaplan–Meier curves of its labels
    (:func:`heal_pl.survival.plotting.draw_km`, one step line per label, the same colour order in every panel)."""
    if not tables:
        raise ValueError("thresholds_figure needs at least one threshold")
    cols = min(3, len(tables))
    rows = -(-len(tables) // cols)
    fig = Figure(figsize=(3.2 * cols + 1.0, 2.8 * rows))
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, sharex=True, sharey=True, squeeze=False).ravel()
    for ax, (th, mine) in zip(axes, tables.items(), strict=False):
        draw_km(ax, mine, horizon)
        ax.set_ylim(0.0, 1.02)
        ax.set_title(f"pmass ≥ {th:g}", fontsize="small")
    for ax in axes[len(tables):]:
        ax.set_visible(False)
    for ax in axes[(rows - 1) * cols:]:
        ax.set_xlabel("tokens generated")
    for ax in axes[::cols]:
        ax.set_ylabel("S(t)")
    fig.legend(*axes[0].get_legend_handles_labels(), title="α", fontsize="small", loc="center right")
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0.0, 0.0, 1.0 - 1.0 / (3.2 * cols + 1.0), 1.0))
    return fig


def write_thresholds(
    out: Path, result: Mapping[str, Any], signs: Sequence[str] | None = None, writer: Any = None,
    tag_prefix: str = "survival/", step: int = 0,
) -> None:
    """Write ``thresholds.csv``, ``thresholds.md`` and ``figures/thresholds_<sign>.png`` of a
    :func:`threshold_sensitivity` result into ``out`` (and the figures to TensorBoard when ``writer``)."""
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "thresholds.csv", result["rows"], COLUMNS, none="never")
    (out / "thresholds.md").write_text(markdown_rows(result["rows"], COLUMNS))
    tables = result["tables"]
    for sign in signs or signs_present(next(iter(tables.values()))):
        mine = {th: {lab: t[lab] for lab in labels_of_sign(t, sign)} for th, t in tables.items()}
        fig = thresholds_figure(mine, float(result["fork_points"][-1]), title=f"Kaplan–Meier by threshold, sign {sign}")
        save_figure(fig, out / "figures" / f"thresholds_{SIGN_WORD[sign]}.png")
        if writer is not None:
            writer.add_figure(f"{tag_prefix}thresholds/{sign}", fig, step)


def run_thresholds(
    trajectories: str, thresholds: list[float] = list(THRESHOLDS), out_dir: str | None = None  # noqa: B006,B008
) -> dict[str, Any]:
    """``heal thresholds``: the survival table at every threshold from a saved ``heal survival`` run (no model).

    Args:
        trajectories: the run's ``trajectories.json``.
        thresholds: pmass thresholds in (0, 1), e.g. ``"[0.5, 0.75, 0.95]"``.
        out_dir: where ``thresholds.csv``/``.md`` and ``figures/thresholds_<sign>.png`` go (default: the folder of
            ``trajectories``).
    """
    result = threshold_sensitivity(trajectories, thresholds)
    out = Path(out_dir) if out_dir is not None else Path(trajectories).parent
    write_thresholds(out, result)
    log.info("survival by threshold (%s)\n%s", trajectories, markdown_rows(result["rows"], COLUMNS))
    return result
