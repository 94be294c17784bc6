"""Tests of heal_pl.survival.table (docs/maths.md §4): death/censoring rules and Kaplan–Meier against hand computation.

Expected survival values are written out as products of (1 − d_j/n_j) in the tests, or come from a float64
reference KM coded here; lifelines' own fit is compared as a second check, never as the only reference.
"""

from __future__ import annotations

import numpy as np
import pytest

from heal_pl.survival.table import death_times, fork_schedule, survival_table

NAN = np.nan
FORKS = [0, 5, 10, 15, 20]


def ref_km(durations: np.ndarray, observed: np.ndarray, t: float) -> float:
    """S(t) = Π_{u ≤ t, u an event time} (1 − d_u / n_u), n_u = #{duration ≥ u}, in float64."""
    s = 1.0
    for u in np.unique(durations[observed.astype(bool)]):
        if u <= t:
            d = np.sum((durations == u) & observed.astype(bool))
            n = np.sum(durations >= u)
            s *= 1.0 - d / n
    return s


def test_all_die_at_the_same_fork():
    P = [[1.0, 0.99, 0.2, 0.1, 0.1]] * 3
    out = survival_table(P, [20, 20, 20], FORKS, threshold=0.95)
    d, o = death_times(P, [20, 20, 20], FORKS)
    np.testing.assert_array_equal(d, [10, 10, 10])
    np.testing.assert_array_equal(o, [True, True, True])
    assert (out["n"], out["died"], out["censored"]) == (3, 3, 0)
    np.testing.assert_allclose(out["S_forks"], [1, 1, 0, 0, 0])  # 1 − 3/3 at t=10
    assert out["S_mid"] == 0.0 and out["t_mid"] == 10 and out["S_end"] == 0.0 and out["t_half"] == 10


def test_all_censored():
    P = [[1.0, 0.97, 0.96, NAN, NAN],
         [0.99, 0.99, 0.99, 0.99, 0.99],
         [1.0, NAN, NAN, NAN, NAN]]
    out = survival_table(P, [12, 20, 3], FORKS)
    d, o = death_times(P, [12, 20, 3], FORKS)
    np.testing.assert_array_equal(d, [10, 20, 0])
    assert not o.any()
    assert (out["n"], out["died"], out["censored"]) == (3, 0, 2)  # the one that reached w is not counted
    np.testing.assert_allclose(out["S_forks"], 1.0)
    np.testing.assert_allclose(out["curve"]["S"], 1.0)
    assert out["S_mid"] == 1.0 and out["S_end"] == 1.0 and out["t_half"] is None


def test_deaths_and_censoring_interleaved():
    # traj: A dies at 5; B censored at 5 (EOS at 7); C dies at 10; D censored at 10 (EOS at 14);
    #       E dies at 15; F alive to w=20.
    P = [[1.0, 0.5, 0.4, 0.4, 0.4],
         [1.0, 0.99, NAN, NAN, NAN],
         [1.0, 0.96, 0.94, 0.99, 0.99],
         [1.0, 0.96, 0.96, NAN, NAN],
         [0.98, 0.97, 0.96, 0.1, 0.0],
         [1.0, 1.0, 1.0, 1.0, 1.0]]
    gl = [20, 7, 20, 14, 20, 20]
    d, o = death_times(P, gl, FORKS)
    np.testing.assert_array_equal(d, [5, 5, 10, 10, 15, 20])
    np.testing.assert_array_equal(o, [True, False, True, False, True, False])
    out = survival_table(P, gl, FORKS)
    # at risk: t=5: 6 (B censored at 5 still at risk), d=1; t=10: 4 (A dead, B censored), d=1;
    #          t=15: 2 (C dead, D censored), d=1; t=20: 1, d=0
    s5 = 1 - 1 / 6
    s10 = s5 * (1 - 1 / 4)
    s15 = s10 * (1 - 1 / 2)
    np.testing.assert_allclose(out["S_forks"], [1.0, s5, s10, s15, s15], rtol=1e-12)
    assert (out["n"], out["died"], out["censored"]) == (6, 3, 2)
    assert out["t_mid"] == 10 and out["S_mid"] == pytest.approx(s10)
    assert out["S_end"] == pytest.approx(s15)
    assert out["t_half"] == 15  # s10 = 0.625 > 0.5, s15 = 0.3125
    # lifelines' own curve agrees with the hand computation at its event times
    tl, surv = out["curve"]["timeline"], out["curve"]["S"]
    for t, s in ((5, s5), (10, s10), (15, s15)):
        assert surv[np.flatnonzero(tl == t)[0]] == pytest.approx(s, rel=1e-12)
    lo, hi = out["curve"]["lower"], out["curve"]["upper"]
    assert np.all(lo <= surv + 1e-12) and np.all(surv <= hi + 1e-12) and np.all((lo >= 0) & (hi <= 1))


def test_death_is_absorbing():
    P = [[1.0, 0.5, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0, 1.0]]
    d, o = death_times(P, [20, 20], FORKS)
    np.testing.assert_array_equal(d, [5, 20])
    np.testing.assert_array_equal(o, [True, False])
    out = survival_table(P, [20, 20], FORKS)
    np.testing.assert_allclose(out["S_forks"], [1, 0.5, 0.5, 0.5, 0.5])
    assert out["S_end"] == 0.5 and out["t_half"] == 5


@pytest.mark.parametrize("n", [6, 8, 10, 14, 20])
def test_t_half_when_exactly_half_died(n):
    """Half of n die over the forks: S(20) is exactly 1/2 in rationals, a hair off 0.5 in floats."""
    from fractions import Fraction

    P = np.ones((n, 5))
    for i in range(n // 2):
        P[i, 1 + (i * 4) // (n // 2) :] = 0.0
    out = survival_table(P, [20] * n, FORKS, threshold=0.5)
    at_risk, surv, t_half = n, Fraction(1), None
    for j in range(1, 5):  # Kaplan–Meier by hand, in exact arithmetic
        d = int(np.sum((P[:, j] == 0) & (P[:, j - 1] == 1)))
        surv, at_risk = surv * Fraction(at_risk - d, at_risk), at_risk - d
        t_half = FORKS[j] if t_half is None and surv <= Fraction(1, 2) else t_half
    assert surv == Fraction(1, 2) and out["S_end"] == pytest.approx(0.5, abs=1e-12)
    assert t_half is not None and out["t_half"] == t_half


def test_threshold_is_inclusive_and_death_at_fork_zero():
    P = [[0.95, 0.95, 0.95, 0.95, 0.95], [0.9, 1.0, 1.0, 1.0, 1.0], [1, 1, 1, 1, 1], [1, 1, 1, 1, 1]]
    d, o = death_times(P, [20] * 4, FORKS, threshold=0.95)
    np.testing.assert_array_equal(d, [20, 0, 20, 20])
    np.testing.assert_array_equal(o, [False, True, False, False])
    out = survival_table(P, [20] * 4, FORKS)
    np.testing.assert_allclose(out["S_forks"], 0.75)
    assert out["t_half"] is None


def test_nan_past_end_and_eos_exactly_at_fork():
    # EOS at 10 reaches fork 10; EOS at 9 does not (censored at 5); EOS at 20 = w is not "censored early".
    P = [[1, 1, 1, NAN, NAN], [1, 1, NAN, NAN, NAN], [1, 1, 1, 1, 1]]
    d, o = death_times(P, [10, 9, 20], FORKS)
    np.testing.assert_array_equal(d, [10, 5, 20])
    assert not o.any()
    assert survival_table(P, [10, 9, 20], FORKS)["censored"] == 2
    # a drop at the last reached fork is a death, not a censoring
    d, o = death_times([[1, 1, 0.1, NAN, NAN]], [12], FORKS)
    assert d.tolist() == [10] and o.tolist() == [True]


@pytest.mark.parametrize(("forks", "t_mid"), [([0, 3, 7, 10], 3), ([0, 4, 10], 4), ([0, 6, 10], 6),
                                               ([0, 1, 2, 9, 20], 9), ([0, 11, 20], 11)])
def test_s_mid_picks_the_nearest_fork(forks, t_mid):
    m = len(forks)
    P = np.ones((4, m))
    P[0, 1:] = 0.0  # dies at forks[1]
    P[1, 2:] = 0.0  # dies at forks[2]
    out = survival_table(P, [forks[-1]] * 4, forks)
    assert out["t_mid"] == t_mid
    j = forks.index(t_mid)
    expected = [1.0, 1 - 1 / 4] + [(1 - 1 / 4) * (1 - 1 / 3)] * (m - 2)  # at risk 4, then 3
    assert out["S_mid"] == pytest.approx(expected[j], rel=1e-12)


def test_random_against_reference_and_lifelines():
    from lifelines import KaplanMeierFitter

    rng = np.random.default_rng(0)
    forks = fork_schedule(64, step=4)
    n = 200
    gl = rng.integers(0, 65, size=n)
    shape = (n, forks.size)
    P = np.where(rng.random(shape) < 0.08, 0.9 * rng.random(shape), 0.96 + 0.04 * rng.random(shape))
    P[forks[None, :] > gl[:, None]] = np.nan
    out = survival_table(P, gl, forks, threshold=0.95)
    # death times by a plain loop
    dur, obs = [], []
    for i in range(n):
        t_last, died = None, False
        for j, t in enumerate(forks):
            if t > gl[i]:
                break
            t_last = int(t)
            if P[i, j] < 0.95:
                died = True
                break
        dur.append(t_last)
        obs.append(died)
    dur, obs = np.array(dur), np.array(obs)
    np.testing.assert_array_equal(out["durations"], dur)
    np.testing.assert_array_equal(out["observed"], obs)
    ref = np.array([ref_km(dur, obs, t) for t in forks])
    np.testing.assert_allclose(out["S_forks"], ref, rtol=1e-12)
    assert out["died"] == obs.sum() and out["censored"] == np.sum(~obs & (gl < 64))
    kmf = KaplanMeierFitter().fit(dur, obs)
    sf = kmf.survival_function_
    np.testing.assert_allclose(out["curve"]["S"], sf.iloc[:, 0].values, rtol=1e-12)
    for t, s in zip(sf.index, sf.iloc[:, 0].values, strict=True):
        assert ref_km(dur, obs, t) == pytest.approx(s, rel=1e-12)
    below = np.flatnonzero(ref <= 0.5)
    assert out["t_half"] == (int(forks[below[0]]) if below.size else None)


def test_fork_schedule():
    assert fork_schedule(20, step=5).tolist() == [0, 5, 10, 15, 20]
    assert fork_schedule(22, step=5).tolist() == [0, 5, 10, 15, 20, 22]
    assert fork_schedule(3, step=5).tolist() == [0, 3]
    lg = fork_schedule(256, n_log=10)
    assert lg[0] == 0 and lg[-1] == 256 and np.all(np.diff(lg) > 0) and lg.size <= 10
    np.testing.assert_array_equal(lg[1:], np.unique(np.rint(np.geomspace(1, 256, 9)).astype(int)))
    assert fork_schedule(5, n_log=2).tolist() == [0, 5]
    assert fork_schedule(4, n_log=50).tolist() == [0, 1, 2, 3, 4]


@pytest.mark.parametrize(("kwargs", "match"), [
    (dict(w=10, step=0), "step"), (dict(w=10, step=-2), "step"), (dict(w=10), "exactly one"),
    (dict(w=10, step=2, n_log=3), "exactly one"), (dict(w=0, step=1), "w="), (dict(w=10, n_log=1), "n_log"),
])
def test_fork_schedule_bad_inputs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fork_schedule(**kwargs)


GOOD = dict(pmass=[[1.0, 1.0, NAN]], gen_lens=[5], fork_points=[0, 5, 10])


@pytest.mark.parametrize(("change", "match"), [
    (dict(threshold=0.0), "threshold"), (dict(threshold=1.0), "threshold"), (dict(threshold=1.5), "threshold"),
    (dict(pmass=[1.0, 1.0, NAN]), "pmass must be"), (dict(gen_lens=[5, 5]), "gen_lens shape"),
    (dict(fork_points=[0, 5]), "fork_points shape"), (dict(fork_points=[0, 5, 5]), "strictly increasing"),
    (dict(fork_points=[0, 6, 5]), "strictly increasing"), (dict(gen_lens=[-1]), "gen_lens must be"),
    (dict(gen_lens=[5.5]), "gen_lens must hold integers"), (dict(pmass=[[1.0, NAN, NAN]]), r"pmass\[0, 1\]"),
    (dict(pmass=[[1.0, 1.0, 1.0]]), "must be NaN"), (dict(pmass=[[1.0, 1.5, NAN]]), r"\[0, 1\]"),
    (dict(fork_points=[6, 7, 8], pmass=[[NAN, NAN, NAN]]), "reached no fork"),
])
def test_bad_inputs(change, match):
    kw = {**GOOD, "threshold": 0.95, **change}
    with pytest.raises(ValueError, match=match):
        death_times(**kw)
    with pytest.raises(ValueError, match=match):
        survival_table(**kw)


def test_bad_ci_alpha():
    with pytest.raises(ValueError, match="ci_alpha"):
        survival_table(**GOOD, ci_alpha=1.0)
