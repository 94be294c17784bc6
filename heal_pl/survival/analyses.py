"""The analyses :func:`heal_pl.survival.sweep.write_outputs` adds after the survival table, from the sweep's
trajectory records alone (no model call): death attribution (:mod:`heal_pl.survival.attribution`), the KL fan
(:mod:`heal_pl.survival.fan`) and, when ``SweepConfig.thresholds`` is set, threshold sensitivity
(:mod:`heal_pl.survival.thresholds`). Files and tags are listed in :mod:`heal_pl.survival.sweep`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from heal_pl.survival.attribution import WINDOW, write_attribution
from heal_pl.survival.fan import fan_figure
from heal_pl.survival.plotting import save_figure
from heal_pl.survival.stored import SIGN_WORD, by_label, labels_of_sign, load_trajectories
from heal_pl.survival.thresholds import threshold_sensitivity, write_thresholds


def write_analyses(
    out: Path, fork_points: Sequence[int], trajectories: Sequence[Mapping[str, Any]], signs: Sequence[str],
    threshold: float, kl_target: float, thresholds: Sequence[float] | None = None, k: int = WINDOW,
    writer: Any = None, tag_prefix: str = "survival/", step: int = 0,
) -> None:
    """Attribution and fan figures for every sign in ``signs``; the threshold grid when ``thresholds`` is given."""
    stored = {"fork_points": list(fork_points), "trajectories": list(trajectories)}
    forks, records = load_trajectories(stored)
    groups = by_label(records)
    write_attribution(out, groups, forks, threshold, kl_target, signs, k, writer, tag_prefix, step)
    for sign in signs:
        fig = fan_figure({lab: groups[lab].kl for lab in labels_of_sign(groups, sign)}, target=kl_target,
                         title=f"per-token KL by α, sign {sign}")  # fmt: skip
        save_figure(fig, out / "figures" / f"fan_{SIGN_WORD[sign]}.png")
        if writer is not None:
            writer.add_figure(f"{tag_prefix}fan/{sign}", fig, step)
    if thresholds:
        write_thresholds(out, threshold_sensitivity(stored, thresholds), signs, writer, tag_prefix, step)
