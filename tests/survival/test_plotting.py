"""Tests for heal_pl.survival.plotting figure builders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from matplotlib.colors import to_rgba

from heal_pl.survival.plotting import (
    ALIVE_COLOUR,
    DEAD_COLOUR,
    moving_average,
    save_figure,
    spaghetti_figure,
    survival_figure,
)


def _ref_ma(x: np.ndarray, width: int) -> np.ndarray:
    """Loop reference: window aligned like np.convolve 'same', mean over existing values only."""
    n = len(x)
    lo_off = (width - 1) // 2 + (width - 1) % 2 if width % 2 == 0 else (width - 1) // 2
    out = np.empty(n)
    for i in range(n):
        lo, hi = max(0, i - lo_off), min(n, i - lo_off + width)
        out[i] = x[lo:hi].mean()
    return out


@pytest.mark.parametrize("width", [1, 2, 3, 4, 5, 7])
def test_moving_average_matches_reference(width: int) -> None:
    x = np.random.default_rng(0).normal(size=23)
    got = moving_average(x, width)
    conv = np.convolve(x, np.ones(width), "same") / np.convolve(np.ones(23), np.ones(width), "same")
    np.testing.assert_allclose(got, conv)
    np.testing.assert_allclose(got, _ref_ma(x, width))


def test_moving_average_short_input_and_bad_width() -> None:
    x = np.array([1.0, 2.0, 3.0])
    assert moving_average(x, 9).shape == (3,)
    np.testing.assert_allclose(moving_average(x, 9), [2.0, 2.0, 2.0])
    with pytest.raises(ValueError, match="width"):
        moving_average(x, 0)


def _synthetic() -> tuple[list[np.ndarray], list[int | None], list[int | None]]:
    rng = np.random.default_rng(1)
    kl = [rng.uniform(0.5, 1.5, size=n) for n in (60, 40, 50)]
    return kl, [None, 25, None], [None, 39, 30]


def test_spaghetti_artists() -> None:
    kl, alive, eos = _synthetic()
    fig = spaghetti_figure(kl, alive, eos, target=0.8, smooth=3, title="α=1")
    ax = fig.axes[0]
    # 3 alive + 1 dead + median + target
    assert len(ax.lines) == 6
    target_line = ax.lines[-1]
    np.testing.assert_allclose(np.asarray(target_line.get_ydata(), float), 0.8)
    assert target_line.get_linestyle() == ":"
    alive0, alive1, dead1 = ax.lines[0], ax.lines[1], ax.lines[2]
    assert to_rgba(alive0.get_color()) == to_rgba(ALIVE_COLOUR)
    assert to_rgba(alive1.get_color()) == to_rgba(ALIVE_COLOUR)
    assert to_rgba(dead1.get_color()) == to_rgba(DEAD_COLOUR)
    assert dead1.get_xdata()[0] == 25 and dead1.get_xdata()[-1] == 39
    assert alive1.get_xdata()[-1] == 25
    # median over positions with >= 1 trajectory: length of the longest
    assert to_rgba(ax.lines[3].get_color()) == to_rgba(ALIVE_COLOUR)
    median = ax.lines[4]
    assert len(median.get_xdata()) == 60
    sm = [moving_average(k, 3) for k in kl]
    np.testing.assert_allclose(median.get_ydata()[45], np.median([sm[0][45], sm[2][45]]))
    np.testing.assert_allclose(median.get_ydata()[55], sm[0][55])
    # EOS markers: one collection with two points
    assert len(ax.collections) == 1
    np.testing.assert_allclose(ax.collections[0].get_offsets(), [[39, sm[1][39]], [30, sm[2][30]]])


def test_spaghetti_normalisation_divides_by_head_p95() -> None:
    kl, alive, eos = _synthetic()
    kl[2] = np.zeros(50)  # zero head: left unnormalised
    fig = spaghetti_figure(kl, alive, eos, smooth=1, normalise=True, log_y=False)
    ax = fig.axes[0]
    np.testing.assert_allclose(ax.lines[0].get_ydata(), kl[0] / np.percentile(kl[0][:20], 95))
    full1 = np.concatenate([ax.lines[1].get_ydata(), ax.lines[2].get_ydata()[1:]])
    np.testing.assert_allclose(full1, kl[1] / np.percentile(kl[1][:20], 95))
    np.testing.assert_allclose(ax.lines[3].get_ydata(), 0.0)


def test_spaghetti_bad_input() -> None:
    kl, alive, eos = _synthetic()
    with pytest.raises(ValueError, match="alive_until"):
        spaghetti_figure(kl, alive[:2], eos)
    with pytest.raises(ValueError, match="eos_at"):
        spaghetti_figure(kl, alive, eos + [None])
    with pytest.raises(ValueError, match="smooth"):
        spaghetti_figure(kl, alive, eos, smooth=0)


def _table(t: list[float], s: list[float]) -> dict:
    s_arr = np.asarray(s)
    return {"curve": {"timeline": np.asarray(t), "S": s_arr,
                      "lower": np.clip(s_arr - 0.1, 0, 1), "upper": np.clip(s_arr + 0.1, 0, 1)}}


def test_survival_figure_and_save(tmp_path: Path) -> None:
    tables = {"0": _table([0, 10, 20], [1.0, 1.0, 1.0]),
              "1": _table([0, 10, 20], [1.0, 0.6, 0.3]),
              "4": _table([0, 5], [1.0, 0.0])}
    fig = survival_figure(tables)
    ax = fig.axes[0]
    assert len(ax.lines) == 3
    assert len(ax.collections) == 3
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["0", "1", "4"]
    assert ax.get_ylim() == (0.0, 1.02)
    assert ax.get_xlabel() == "tokens generated" and ax.get_ylabel() == "S(t)"
    out = save_figure(fig, tmp_path / "sub" / "surv.png")
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1024
    kl, alive, eos = _synthetic()
    out2 = save_figure(spaghetti_figure(kl, alive, eos, log_y=True), tmp_path / "sp.png")
    assert out2.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out2.stat().st_size > 1024
    with pytest.raises(ValueError, match="curve"):
        survival_figure({"1": {}})


def test_survival_figure_holds_curves_flat_to_the_horizon() -> None:
    tables = {"2": _table([0], [0.0]), "1": _table([0, 10], [1.0, 0.5])}
    ax = survival_figure(tables, horizon=32).axes[0]
    dead, half = (line.get_xydata() for line in ax.lines)
    assert dead[0].tolist() == [0.0, 0.0] and dead[-1].tolist() == [32.0, 0.0]  # a line, not a dot at t = 0
    assert half[-1].tolist() == [32.0, 0.5]
    assert survival_figure(tables).axes[0].lines[0].get_xydata().tolist() == [[0.0, 0.0]]  # no horizon: as given
