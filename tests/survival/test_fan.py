"""The KL fan: quantiles over the trajectories that still exist at t, checked against numpy on the artists' data."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib.colors import to_rgb

from heal_pl.survival.fan import QUANTILES, fan_figure, kl_quantiles


def trajectories(seed: int, lengths: tuple[int, ...]) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.lognormal(-1.0, 1.0, size=n) for n in lengths]


def padded(kls: list[np.ndarray]) -> np.ndarray:
    out = np.full((len(kls), max(len(k) for k in kls)), np.nan)
    for i, k in enumerate(kls):
        out[i, : len(k)] = k
    return out


def test_quantiles_are_over_the_trajectories_that_still_exist() -> None:
    kls = trajectories(0, (20, 20, 7, 13, 3))  # three ended at EOS before t = 20
    n, q = kl_quantiles(kls)
    assert n.tolist() == [5] * 3 + [4] * 4 + [3] * 6 + [2] * 7
    np.testing.assert_allclose(q, np.nanquantile(padded(kls), QUANTILES, axis=0))
    t = 15  # only the two full-length ones: numpy on those two, not on zeros or carried-forward values
    np.testing.assert_allclose(q[:, t], np.quantile([kls[0][t], kls[1][t]], QUANTILES))
    assert kl_quantiles([])[1].shape == (5, 0)
    with pytest.raises(ValueError, match="quantile levels in"):
        kl_quantiles(kls, qs=(0.5, 1.5))


def test_fan_artists_hold_the_quantiles() -> None:
    by_label = {"0": [np.zeros(12)] * 3, "+1": trajectories(1, (12, 12, 5, 9)), "+4": trajectories(2, (4, 12, 12))}
    fig = fan_figure(by_label, target=0.7, title="sign +")
    ax = fig.axes[0]
    assert [line.get_label() for line in ax.lines] == ["0", "+1", "+4", "target 0.7"]
    target = ax.lines[-1]
    assert target.get_linestyle() == "--" and np.asarray(target.get_ydata(), float).tolist() == [0.7, 0.7]
    assert len(ax.collections) == 2 * 3
    for i, (label, kls) in enumerate(by_label.items()):
        ref = np.nanquantile(padded(kls), [0.05, 0.25, 0.5, 0.75, 0.95], axis=0)
        line = ax.lines[i]
        np.testing.assert_allclose(line.get_xdata(), np.arange(12))
        np.testing.assert_allclose(line.get_ydata(), ref[2], err_msg=label)
        for band, (lo, hi) in zip(ax.collections[2 * i : 2 * i + 2], ((0, 4), (1, 3)), strict=True):
            xy = band.get_paths()[0].vertices
            for t in range(12):
                ys = xy[np.isclose(xy[:, 0], t), 1]
                assert ys.min() == pytest.approx(ref[lo, t]) and ys.max() == pytest.approx(ref[hi, t])
            assert tuple(band.get_facecolor()[0][:3]) == pytest.approx(to_rgb(line.get_color()))
    assert ax.get_yscale() == "symlog"
    with pytest.raises(ValueError, match="at least one"):
        fan_figure({})

