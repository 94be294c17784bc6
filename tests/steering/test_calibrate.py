"""Tests of heal_pl.steering.calibrate (docs/maths.md §3): the iso-KL root finder on synthetic statistics.

Roots are known in closed form (power laws, a saturating curve) or checked against the recorded calls
of ``stat`` itself; the Illinois rule is checked against a plain regula falsi written out here.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable

import pytest

from heal_pl.steering.calibrate import MAX_STEP, Calibration, calibrate


class Recorder:
    """Wraps a stat and records every call ``(c, stat(c))`` in order."""

    def __init__(self, fn: Callable[[float], float]) -> None:
        self.fn = fn
        self.calls: list[tuple[float, float]] = []

    def __call__(self, c: float) -> float:
        s = self.fn(c)
        self.calls.append((c, s))
        return s


def check_result(cal: Calibration, rec: Recorder, target: float, tol: float, bracket: tuple[float, float]) -> None:
    """Invariants of every result: history = the calls, c* the closest call, all calls inside the bracket."""
    assert cal.history == rec.calls
    assert cal.evaluations == len(rec.calls)
    closest = min(rec.calls, key=lambda cs: abs(cs[1] - target))
    assert (cal.c_star, cal.stat_star) == closest
    assert cal.converged == (abs(closest[1] - target) < tol)
    assert all(bracket[0] <= c <= bracket[1] for c, _ in rec.calls)


# ----------------------------------------------------------------------------- converging cases


@pytest.mark.parametrize("k", [0.5, 1.0, 2.0, 3.0])
def test_power_laws_converge_in_few_evaluations(k: float) -> None:
    bracket, tol = (1e-3, 1e3), 0.05
    counts = []
    for a in (0.7, 1.3):
        for target in (0.3, 0.7, 1.5, 3.0, 10.0):
            rec = Recorder(lambda c, a=a: a * c**k)
            cal = calibrate(rec, target, bracket=bracket, tol=tol)
            check_result(cal, rec, target, tol, bracket)
            assert cal.converged, (k, a, target, cal)
            assert abs(a * cal.c_star**k - target) < tol
            root = (target / a) ** (1 / k)  # closed form
            assert min(root, cal.c_star) / max(root, cal.c_star) >= (1 - tol / target) ** (1 / k) - 1e-12
            counts.append(cal.evaluations)
    # log-log regula falsi is exact on a power law: bracketing steps + one interpolation
    assert statistics.median(counts) <= 6
    assert max(counts) <= 10  # c^0.5 from c = 1 to c* ≈ 204: eight doublings


def test_power_law_interpolation_is_exact_in_log_log() -> None:
    """Doubling mode: bracketed at c = 2, 4; one regula-falsi step lands on the root of c^2 = 10."""
    cal = calibrate(lambda c: c**2, 10.0, tol=1e-9, prior_slope=None)
    assert [c for c, _ in cal.history[:3]] == [1.0, 2.0, 4.0]
    assert cal.evaluations == 4
    assert cal.c_star == pytest.approx(math.sqrt(10.0), rel=1e-12)


@pytest.mark.parametrize("target", [0.5, 1.0, 1.5, 1.9])
def test_saturating_curve(target: float) -> None:
    fn = lambda c: 2 * c / (1 + c)  # noqa: E731 — saturates at 2
    rec = Recorder(fn)
    cal = calibrate(rec, target)
    check_result(cal, rec, target, 0.05, (0.01, 100.0))
    assert cal.converged and abs(fn(cal.c_star) - target) < 0.05
    assert cal.evaluations <= 8


@pytest.mark.parametrize("target", [0.4, 2.5, 8.0])
def test_noisy_curve(target: float) -> None:
    """c^1.5 times a deterministic ±3 % wiggle: not monotone at small scales, still found."""
    fn = lambda c: c**1.5 * (1 + 0.03 * math.sin(1000.0 * c))  # noqa: E731
    rec = Recorder(fn)
    cal = calibrate(rec, target)
    check_result(cal, rec, target, 0.05, (0.01, 100.0))
    assert cal.converged and abs(cal.stat_star - target) < 0.05
    assert cal.evaluations <= 10


def test_within_tol_at_midpoint_is_one_evaluation() -> None:
    rec = Recorder(lambda c: 1.0 + 0.04 * c)  # stat(sqrt(0.1 · 10) = 1) = 1.04, within 0.05 of 1
    cal = calibrate(rec, 1.0, bracket=(0.1, 10.0))
    assert len(rec.calls) == 1 and cal.history == [(1.0, 1.04)]
    assert cal.converged and cal.c_star == 1.0 and cal.stat_star == 1.04 and cal.message == "converged"


def test_stops_at_a_bracketing_point_within_tol() -> None:
    rec = Recorder(lambda c: c)  # 1, 2, 4: the third is the target
    cal = calibrate(rec, 4.0)
    assert [c for c, _ in rec.calls] == [1.0, 2.0, 4.0] and cal.converged and cal.c_star == 4.0


def test_history_is_call_order() -> None:
    rec = Recorder(lambda c: c**1.7 + 0.01)
    cal = calibrate(rec, 0.2, tol=1e-4)
    assert cal.history == rec.calls and len(rec.calls) >= 4
    assert cal.history is not rec.calls


def plain_regula_falsi_evaluations(
    fn: Callable[[float], float], target: float, a: float, b: float, tol: float, limit: int = 200
) -> int:
    """Regula falsi in (log c, log stat) WITHOUT the Illinois rule, from the bracket [a, b]."""
    fa, fb = math.log(fn(a) / target), math.log(fn(b) / target)
    for n in range(1, limit + 1):
        c = math.exp(math.log(a) - fa * (math.log(b) - math.log(a)) / (fb - fa))
        s = fn(c)
        if abs(s - target) < tol:
            return n
        if s < target:
            a, fa = c, math.log(s / target)
        else:
            b, fb = c, math.log(s / target)
    return limit


# ----------------------------------------------------------------------------- extrapolated bracketing


@pytest.mark.parametrize("k", [1.0, 2.0, 3.0])
@pytest.mark.parametrize("bracket", [(1e-3, 1e3), (0.5, 128.0)])
def test_power_laws_need_at_most_three_evaluations(k: float, bracket: tuple[float, float]) -> None:
    """a · c^k is a line in log-log: the prior-slope step is exact for k = 2, the secant step for any k.

    c* is checked against the closed-form root in float64, with a tolerance far below the default.
    """
    counts = []
    for a in (0.02, 0.3, 1.7):
        for target in (0.5, 1.0, 2.0):
            root = (target / a) ** (1 / k)
            if not bracket[0] * 2 <= root <= bracket[1] / 2:
                continue
            rec = Recorder(lambda c, a=a: a * c**k)
            cal = calibrate(rec, target, bracket=bracket, tol=1e-9 * target)
            check_result(cal, rec, target, 1e-9 * target, bracket)
            assert cal.converged, (k, a, target, cal.history)
            assert cal.c_star == pytest.approx(root, rel=1e-9)
            first_jump = k * abs(math.log(root) - math.log(math.sqrt(bracket[0] * bracket[1]))) / 2.0
            expected = 2 if k == 2.0 else 3
            if first_jump <= math.log(MAX_STEP):  # the prior step was not clipped
                assert cal.evaluations == expected, (a, target, cal.history)
            counts.append(cal.evaluations)
    assert counts and max(counts) <= 4


def test_default_search_beats_doubling_on_power_laws() -> None:
    """Over a grid of power laws, the extrapolating search needs fewer evaluations than doubling."""
    new, old = [], []
    for k in (0.8, 1.3, 2.0, 2.7):
        for target in (0.5, 1.0, 2.0):
            fn = lambda c, k=k: 0.01 * c**k  # noqa: E731
            new.append(calibrate(fn, target, bracket=(0.5, 128.0)).evaluations)
            old.append(calibrate(fn, target, bracket=(0.5, 128.0), prior_slope=None).evaluations)
    assert statistics.median(new) <= 3 < statistics.median(old)
    assert all(n <= o for n, o in zip(new, old, strict=True))


def test_extrapolated_steps_are_clipped() -> None:
    """stat far below the target: each bracketing step moves c by at most MAX_STEP, and reaches the root."""
    rec = Recorder(lambda c: 1e-12 * c**2)
    cal = calibrate(rec, 1.0, bracket=(1e-3, 1e9), tol=1e-6)
    ratios = [c1 / c0 for (c0, _), (c1, _) in zip(rec.calls, rec.calls[1:], strict=False)]
    assert ratios[0] == pytest.approx(MAX_STEP) and all(r <= MAX_STEP * (1 + 1e-12) for r in ratios)
    assert cal.converged and cal.c_star == pytest.approx(1e6, rel=1e-6)


def test_nonincreasing_secant_falls_back_to_the_prior_slope() -> None:
    """stat(1) = 0.2, stat(c₂) = 0.1 < stat(1): the secant slope is negative, so the next step uses k = 2 again."""
    rec = Recorder(lambda c: 0.2 if c == 1.0 else 0.1 * max(1.0, c / 3.0) ** 4)
    cal = calibrate(rec, 1.0, bracket=(0.1, 10.0))
    c2 = math.sqrt(1.0 / 0.2)  # prior slope 2 from stat(1) = 0.2
    assert rec.calls[1][0] == pytest.approx(c2)
    assert rec.calls[2][0] == pytest.approx(c2 * math.sqrt(1.0 / 0.1))  # prior slope 2 again from stat = 0.1
    assert cal.converged


@pytest.mark.parametrize(
    ("fn", "target"),
    [
        (lambda c: c if c < 1.5 else 1.5 * (c / 1.5) ** 40, 1.4),  # flat then steep: the upper end is kept
        (lambda c: 1.5 * (c / 1.5) ** 40 if c < 1.5 else c, 1.6),  # steep then flat: the lower end is kept
    ],
    ids=["upper-end-kept", "lower-end-kept"],
)
def test_illinois_rule_beats_plain_regula_falsi_on_kinked_curves(fn: Callable[[float], float], target: float) -> None:
    """Plain regula falsi keeps the far end of a kinked curve and crawls; Illinois halves that end's f.

    Doubling mode, so that the search enters regula falsi with the bracket [1, 2] around the kink.
    """
    cal = calibrate(fn, target, prior_slope=None)
    assert [c for c, _ in cal.history[:2]] == [1.0, 2.0]  # bracketed by [1, 2]
    assert cal.converged and cal.evaluations <= 10
    assert plain_regula_falsi_evaluations(fn, target, 1.0, 2.0, 0.05) > 40


def test_nonpositive_end_falls_back_to_bisection() -> None:
    """stat = 0 below c = 2.5: the lower end has no log, so the next point is the geometric middle."""
    rec = Recorder(lambda c: 0.0 if c < 2.5 else c)
    cal = calibrate(rec, 3.0, bracket=(0.25, 4.0), tol=1e-3)
    assert [c for c, _ in rec.calls[:3]] == [1.0, 2.0, 4.0]
    assert rec.calls[3][0] == pytest.approx(math.sqrt(2.0 * 4.0))
    assert cal.converged and cal.c_star == pytest.approx(3.0, abs=1e-3)


# ----------------------------------------------------------------------------- not converging


def test_target_unreachable_below_hi() -> None:
    rec = Recorder(lambda c: 2 * c / (1 + c))  # never reaches 3
    cal = calibrate(rec, 3.0)
    check_result(cal, rec, 3.0, 0.05, (0.01, 100.0))
    assert not cal.converged
    assert cal.c_star == 100.0 and rec.calls[-1][0] == 100.0  # doubled up to hi, then stopped
    assert "not reached" in cal.message


def test_target_exceeded_at_lo() -> None:
    rec = Recorder(lambda c: c + 5.0)
    cal = calibrate(rec, 1.0)
    check_result(cal, rec, 1.0, 0.05, (0.01, 100.0))
    assert not cal.converged and cal.c_star == 0.01 and "exceeded" in cal.message


def test_step_function_exhausts_max_iters_and_returns_closest() -> None:
    """A jump over the target: no point is within tol; the closest (first, on ties) is returned."""
    rec = Recorder(lambda c: 0.5 if c < 3.3 else 2.0)
    cal = calibrate(rec, 1.0, max_iters=9)
    check_result(cal, rec, 1.0, 0.05, (0.01, 100.0))
    assert not cal.converged and len(rec.calls) == 9 and "max_iters" in cal.message
    assert (cal.c_star, cal.stat_star) == rec.calls[0] == (1.0, 0.5)
    assert all(c < 3.3 for c, s in rec.calls if s == 0.5) and all(c >= 3.3 for c, s in rec.calls if s == 2.0)


def test_max_iters_one() -> None:
    rec = Recorder(lambda c: c)
    cal = calibrate(rec, 5.0, max_iters=1)
    assert len(rec.calls) == 1 and not cal.converged and cal.c_star == 1.0


def test_nan_stat_raises() -> None:
    with pytest.raises(FloatingPointError, match="nan"):
        calibrate(lambda c: float("nan"), 1.0)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"target": 0.0}, "target"),
        ({"target": -1.0}, "target"),
        ({"target": float("nan")}, "target"),
        ({"bracket": (1.0, 1.0)}, "lo < hi"),
        ({"bracket": (2.0, 1.0)}, "lo < hi"),
        ({"bracket": (0.0, 1.0)}, "lo"),
        ({"bracket": (-1.0, 1.0)}, "lo"),
        ({"bracket": (1.0, float("inf"))}, "hi"),
        ({"tol": 0.0}, "tol"),
        ({"tol": -0.1}, "tol"),
        ({"max_iters": 0}, "max_iters"),
        ({"max_iters": 2.5}, "max_iters"),
        ({"prior_slope": 0.0}, "prior_slope"),
        ({"prior_slope": float("inf")}, "prior_slope"),
    ],
)
def test_bad_input(kwargs: dict, field: str) -> None:
    args = {"target": 1.0, **kwargs}
    calls = []
    with pytest.raises(ValueError, match=field):
        calibrate(lambda c: calls.append(c) or c, **args)
    assert calls == []  # rejected before any evaluation
