"""Threshold sensitivity against lifelines' KaplanMeierFitter on hand-made death times, and ``heal thresholds``.

Forks 0, 4, 8 (w = 8); four trajectories, the last one ends at EOS after 4 tokens:

    pmass           θ = 0.5           θ = 0.75          θ = 0.95
    .97 .80 .55     censored at 8     dies at 8         dies at 4
    .92 .92 .92     censored at 8     censored at 8     dies at 0
    .70 .70 .40     dies at 8         dies at 0         dies at 0
    .96 .96  –      censored at 4     censored at 4     censored at 4
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from lifelines import KaplanMeierFitter

from heal_pl.cli import main
from heal_pl.survival.thresholds import threshold_sensitivity, thresholds_figure
from tests.helpers import heal_error

FORKS = [0, 4, 8]
PMASS = [[0.97, 0.80, 0.55], [0.92, 0.92, 0.92], [0.70, 0.70, 0.40], [0.96, 0.96, None]]
GEN_LENS = [8, 8, 8, 4]
BY_HAND = {0.5: ([8, 8, 8, 4], [0, 0, 1, 0]), 0.75: ([8, 8, 0, 4], [1, 0, 1, 0]),
           0.95: ([4, 0, 0, 4], [1, 1, 1, 0])}  # fmt: skip


def stored(labels: tuple[tuple[str, str, float], ...] = (("0", "0", 0.0), ("+1", "+", 1.0), ("-1", "-", 1.0))) -> dict:
    trajectories = [{"label": lab, "sign": sign, "alpha": alpha, "prompt_index": i, "gen_len": g, "kl": [0.1] * g,
                     "pmass": p, "p_true": [0.5] * 3} for lab, sign, alpha in labels
                    for i, (p, g) in enumerate(zip(PMASS, GEN_LENS, strict=True))]  # fmt: skip
    return {"fork_points": FORKS, "trajectories": trajectories}


def reference(theta: float) -> dict:
    durations, observed = BY_HAND[theta]
    kmf = KaplanMeierFitter().fit(durations, event_observed=observed)
    s = kmf.survival_function_at_times(FORKS).to_numpy()
    below = np.flatnonzero(s <= 0.5)
    return {"n": 4, "died": sum(observed), "censored": 1, "t_mid": 4, "S_mid": s[1], "S_end": s[2],
            "t_half": FORKS[below[0]] if below.size else None}  # fmt: skip


def test_every_threshold_matches_lifelines_on_hand_made_durations() -> None:
    result = threshold_sensitivity(stored(), [0.5, 0.75, 0.95])
    rows = result["rows"]
    assert [(r["threshold"], r["label"]) for r in rows] == [(t, lab) for t in (0.5, 0.75, 0.95)
                                                            for lab in ("0", "+1", "-1")]  # fmt: skip
    for r in rows:
        ref = reference(r["threshold"])
        assert {k: r[k] for k in ref} == {**ref, "S_mid": pytest.approx(ref["S_mid"]),
                                          "S_end": pytest.approx(ref["S_end"])}  # fmt: skip
        assert (r["sign"], r["alpha"]) == {"0": ("0", 0.0), "+1": ("+", 1.0), "-1": ("-", 1.0)}[r["label"]]
        table = result["tables"][r["threshold"]][r["label"]]
        assert table["durations"].tolist() == BY_HAND[r["threshold"]][0]
    assert [r["died"] for r in rows[::3]] == [1, 2, 3]  # non-decreasing in θ
    # by hand, Π (1 − d_j / n_j): θ = .5: 1 · (1 − 1/3); θ = .75: (1 − 1/4)(1 − 1/2); θ = .95: (1 − 2/4)(1 − 1/2)
    assert [r["S_end"] for r in rows[::3]] == pytest.approx([2 / 3, 3 / 8, 1 / 4])


def test_heal_thresholds_on_a_saved_trajectories_json(tmp_path: Path) -> None:
    path = tmp_path / "run" / "trajectories.json"
    path.parent.mkdir()
    path.write_text(json.dumps(stored()))
    main(["thresholds", "--trajectories", str(path), "--thresholds", "[0.95, 0.5]"])
    with open(tmp_path / "run" / "thresholds.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["threshold"], r["label"]) for r in rows] == [(t, lab) for t in ("0.95", "0.5")
                                                            for lab in ("0", "+1", "-1")]  # fmt: skip
    for r in rows:
        ref = reference(float(r["threshold"]))
        assert int(r["died"]) == ref["died"] and float(r["S_end"]) == pytest.approx(ref["S_end"])
        assert r["t_half"] == ("never" if ref["t_half"] is None else str(ref["t_half"]))
    md = (tmp_path / "run" / "thresholds.md").read_text().splitlines()
    assert len(md) == 2 + 6 and md[0].startswith("| threshold | label | sign | alpha")
    figures = sorted(p.name for p in (tmp_path / "run" / "figures").iterdir())
    assert figures == ["thresholds_minus.png", "thresholds_plus.png"]
    other = tmp_path / "elsewhere"
    main(["thresholds", "--trajectories", str(path), "--out_dir", str(other)])  # the default grid of five
    assert len((other / "thresholds.csv").read_text().splitlines()) == 1 + 5 * 3


def test_figure_has_one_panel_per_threshold_and_a_curve_per_label() -> None:
    tables = threshold_sensitivity(stored(), [0.5, 0.75, 0.95])["tables"]
    mine = {th: {lab: t[lab] for lab in ("0", "+1")} for th, t in tables.items()}
    fig = thresholds_figure(mine, horizon=8.0)
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in axes] == ["pmass ≥ 0.5", "pmass ≥ 0.75", "pmass ≥ 0.95"]
    for ax, th in zip(axes, (0.5, 0.75, 0.95), strict=True):
        assert len(ax.lines) == 2
        xy = ax.lines[1].get_xydata()  # "+1": lifelines' step curve, held flat to the horizon w = 8
        curve = tables[th]["+1"]["curve"]
        expected = np.c_[curve["timeline"], curve["S"]]
        if expected[-1, 0] < 8:
            expected = np.vstack([expected, [8.0, expected[-1, 1]]])
        np.testing.assert_allclose(xy, expected)


@pytest.mark.parametrize(
    ("thresholds", "message"),
    [([0.5, 1.0], r"thresholds=\[0.5, 1.0\] must be a non-empty list of distinct numbers in the open interval"),
     ([0.0], "thresholds=.* in the open interval"), ([], "thresholds=.* non-empty"),
     ([0.5, 0.5], "thresholds=.* distinct")],
)
def test_bad_thresholds(thresholds: list[float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        threshold_sensitivity(stored(), thresholds)


def test_bad_trajectories_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    error = heal_error(["thresholds", "--trajectories", "/nonexistent/trajectories.json"], capsys)
    assert "trajectories='/nonexistent/trajectories.json' does not exist" in error
    summary = tmp_path / "summary.json"
    summary.write_text(json.dumps({"table": [], "fork_points": FORKS}))
    assert "is not a heal survival trajectories.json" in heal_error(["thresholds", "--trajectories", str(summary)],
                                                                    capsys)  # fmt: skip
    (tmp_path / "bad.json").write_text("[1, 2")
    assert "is not valid JSON" in heal_error(["thresholds", "--trajectories", str(tmp_path / "bad.json")], capsys)
