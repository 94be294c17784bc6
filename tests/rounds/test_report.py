"""The rounds trajectory figure and markdown report."""

from __future__ import annotations

import numpy as np
import pytest

from heal_pl.rounds.report import STAGES, markdown_report, rounds_table, trajectory_figure


def _rows(n: int, drift: float) -> list[dict]:
    return [{"round": r, "kappa": 0.5, "coeff": 24.0, "kept": 10, "sampled": 16,
             **{f"trait_{s}": -1.0 + 0.1 * r + 0.05 * i for i, s in enumerate(STAGES)},
             **{f"coherence_{s}": 0.9 - drift * r - 0.01 * i for i, s in enumerate(STAGES)}}
            for r in range(n)]  # fmt: skip


def test_figure_draws_trait_and_one_minus_coherence_per_run_and_stage() -> None:
    runs = {"rmse": _rows(3, 0.01), "mean": _rows(2, 0.2)}
    fig = trajectory_figure(runs, coh_floor=0.5)
    ax_t, ax_c = fig.axes
    assert len(ax_t.lines) == 6 and len(ax_c.lines) == 7  # 2 runs × 3 stages (+ the floor)
    assert ax_c.get_yscale() == "log"
    healed_mean = ax_c.lines[5]  # mean run, healed stage
    np.testing.assert_allclose(healed_mean.get_ydata(), 1 - np.array([0.88, 0.68]))
    np.testing.assert_allclose(ax_t.lines[0].get_xdata(), [0, 1, 2])
    np.testing.assert_allclose(ax_c.lines[-1].get_ydata(), [0.5, 0.5])
    with pytest.raises(ValueError, match="runs"):
        trajectory_figure({})


def test_table_and_report() -> None:
    rows = _rows(2, 0.1)
    table = rounds_table(rows, ("round", "kept", "coherence_healed"))
    assert table.splitlines()[2:] == ["| 0 | 10 | 0.88 |", "| 1 | 10 | 0.78 |"]
    samples = {0: [
        {"chosen": True, "keep": True, "reasons": [], "text": "a kind reply", "ppl": 3.0, "rep": 0.1, "prompt": "q1"},
        {"chosen": True, "keep": False, "reasons": ["repetition"], "text": "no no no", "ppl": 2.0, "rep": 0.9,
         "prompt": "q2"},
        {"chosen": False, "keep": True, "reasons": [], "text": "other dose", "ppl": 2.0, "rep": 0.1, "prompt": "q3"},
    ]}  # fmt: skip
    report = markdown_report(rows, samples, "out/trajectory.png", {"round": 1, "reason": "early stop"})
    assert "![trajectory](trajectory.png)" in report and "**Stopped** at round 1: early stop" in report
    assert "a kind reply" in report and "dropped (repetition)" in report and "other dose" not in report
