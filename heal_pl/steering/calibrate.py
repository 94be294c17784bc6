"""Iso-KL calibration: the coefficient ``c*`` at which a statistic reaches a target (docs/maths.md §3.4).

:func:`calibrate` is a pure root finder over any increasing ``stat(c) -> float`` with ``c > 0``
(typically the p95 of per-token KL(steered ‖ base) along a greedy trajectory; the default target of
1 nat is the caller's). It works in log–log space, where a power law ``stat = a · c^k`` is a line:

    x = log c,   f(x) = log stat(c) − log target          (root: f = 0)

1. evaluate at the geometric middle ``x_0 = log sqrt(lo · hi)`` of the search range, then step towards
   the target until it is bracketed by a *lower* end ``a`` (``stat(a) < target``) and an *upper* end
   ``b`` (``stat(b) ≥ target``), never leaving ``[lo, hi]``. Each step is a Newton step on the line
   ``f(x) ≈ f_n + k · (x − x_n)``:

       x_{n+1} = x_n − f_n / k,     k = prior_slope                     (first step)
                                    k = (f_n − f_{n−1}) / (x_n − x_{n−1})   (secant, later steps)

   so a power law ``a · c^k`` is hit exactly by the second step when ``k = prior_slope`` and by the third
   otherwise. Safeguards: the prior slope replaces a secant slope that is not ``> 0`` (noise, a
   non-monotone stat); a step moves ``c`` by at most a factor ``MAX_STEP = 16``; when ``f_n`` is not
   finite (``stat ≤ 0`` or ``inf``) the step is a doubling (halving). ``prior_slope=None`` gives the
   plain doubling (halving) search of docs/maths.md §3.4 instead. Per-token KL grows like ``c²`` for small
   steering (a second-order expansion of KL in the logit change), hence the default ``prior_slope = 2``;
2. regula falsi with the Illinois rule on ``f``:

       x_new = x_a − f_a · (x_b − x_a) / (f_b − f_a)

   ``x_new`` replaces the end whose side it falls on. When the same end has been kept twice in a row,
   its *working* ``f`` is halved before the next interpolation (the classic Illinois rule, applied to
   ``f = log(stat / target)``: halving ``f`` replaces that end's stat by the geometric mean of its stat and
   the target, so it never crosses the target; it is halved again each further time the end is kept).
   Geometric bisection ``x_new = (x_a + x_b) / 2`` is used instead when an end's ``f`` is not finite
   (its stat is ``≤ 0`` or ``inf``) or ``x_new`` is not strictly inside ``(x_a, x_b)``;
3. stop as soon as an evaluation gives ``|stat − target| < tol`` (bracketing points included), after
   ``max_iters`` evaluations, or when the target cannot be reached inside ``[lo, hi]`` (``stat(hi) < target``
   or ``stat(lo) ≥ target``). The result is the evaluated point with the smallest ``|stat − target|``;
   ``converged`` says whether it is within ``tol``.

Coefficients are positive: calibrate each sign of a steering method separately (``stat(c)`` evaluating
``−c`` for the negative side).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Calibration:
    """The result of :func:`calibrate`.

    Attributes:
        c_star: the evaluated coefficient with the smallest ``|stat − target|`` (first one on ties).
        stat_star: ``stat(c_star)``.
        converged: ``|stat_star − target| < tol``.
        history: ``(c, stat(c))`` for every evaluation of ``stat``, in call order.
        target: the target the search aimed at.
        message: why the search stopped (``converged``, ``max_iters``, or the unreachable end).
    """

    c_star: float
    stat_star: float
    converged: bool
    history: list[tuple[float, float]] = field(default_factory=list)
    target: float = float("nan")
    message: str = ""

    @property
    def evaluations(self) -> int:
        """How many times ``stat`` was called."""
        return len(self.history)


def _check_args(
    target: float, bracket: tuple[float, float], tol: float, max_iters: int, prior_slope: float | None
) -> None:
    problems = []
    if not (math.isfinite(target) and target > 0):
        problems.append(f"target={target!r} must be a finite number > 0")
    if len(bracket) != 2:
        problems.append(f"bracket={bracket!r} must be a pair (lo, hi)")
    else:
        lo, hi = bracket
        if not (math.isfinite(lo) and lo > 0):
            problems.append(f"bracket lo={lo!r} must be a finite number > 0 (coefficients are positive)")
        if not math.isfinite(hi):
            problems.append(f"bracket hi={hi!r} must be finite")
        elif lo >= hi:
            problems.append(f"bracket=({lo!r}, {hi!r}) needs lo < hi")
    if not (math.isfinite(tol) and tol > 0):
        problems.append(f"tol={tol!r} must be a finite number > 0")
    if isinstance(max_iters, bool) or not isinstance(max_iters, int) or max_iters < 1:
        problems.append(f"max_iters={max_iters!r} must be an integer >= 1")
    if prior_slope is not None and not (math.isfinite(prior_slope) and prior_slope > 0):
        problems.append(f"prior_slope={prior_slope!r} must be a finite number > 0, or None (doubling)")
    if problems:
        raise ValueError("calibrate: " + "; ".join(problems))


MAX_STEP = 16.0  # the largest factor one extrapolated bracketing step may move c by


def _bracketing_step(
    c: float, f: float, prev: tuple[float, float] | None, prior_slope: float | None, up: bool
) -> float:
    """The next ``c`` of stage 1: a Newton step in log–log (see the module docstring), or a doubling.

    ``prev`` is the previous ``(x, f)`` with a finite ``f``; ``up`` says the target lies above ``c``.
    The step always moves towards the target, by a factor in ``(1, MAX_STEP]``.
    """
    if prior_slope is None or not math.isfinite(f):
        return 2.0 * c if up else 0.5 * c
    x, k = math.log(c), prior_slope
    if prev is not None and prev[0] != x:
        secant = (f - prev[1]) / (x - prev[0])
        if math.isfinite(secant) and secant > 0:
            k = secant
    step = min(abs(f / k), math.log(MAX_STEP))
    return math.exp(x + step) if up else math.exp(x - step)


def _log_ratio(s: float, target: float) -> float:
    """``f = log(s / target)``; ``-inf`` for ``s ≤ 0`` (no log), ``+inf`` for ``s = inf``."""
    return math.log(s / target) if 0 < s < math.inf else (math.inf if s > 0 else -math.inf)


def calibrate(
    stat: Callable[[float], float],
    target: float,
    bracket: tuple[float, float] = (0.01, 100.0),
    tol: float = 0.05,
    max_iters: int = 12,
    prior_slope: float | None = 2.0,
) -> Calibration:
    """Find ``c*`` in ``[lo, hi]`` with ``|stat(c*) − target| < tol`` (see the module docstring).

    Args:
        stat: an increasing function of the coefficient ``c > 0``; called once per evaluation.
        target: the value to reach, ``> 0`` (e.g. p95 KL = 1 nat).
        bracket: the search range ``(lo, hi)``, ``0 < lo < hi``; ``stat`` is never called outside it.
            The first evaluation is at ``sqrt(lo · hi)``.
        tol: absolute tolerance on ``stat`` (same unit as ``target``), ``> 0``.
        max_iters: the most evaluations of ``stat``, bracketing included, ``≥ 1``.
        prior_slope: the exponent ``k`` of ``stat ∝ c^k`` assumed for the first bracketing step (``> 0``);
            ``None`` brackets by doubling / halving instead.

    Returns:
        a :class:`Calibration`; ``converged=False`` when ``tol`` was not met, with ``c_star`` the closest
        evaluated point.

    Raises:
        ValueError: a bad ``target``, ``bracket``, ``tol``, ``max_iters`` or ``prior_slope`` (all in one message).
        FloatingPointError: ``stat`` returned NaN.

    Example:
        >>> cal = calibrate(lambda c: c**3, target=8.0)   # stat(1) = 1; prior slope 2: c = sqrt(8)
        >>> [round(c, 6) for c, _ in cal.history]            # then the secant slope 3 gives c = 2
        [1.0, 2.828427, 2.0]
        >>> cal.converged
        True
    """
    _check_args(target, bracket, tol, max_iters, prior_slope)
    lo, hi = float(bracket[0]), float(bracket[1])
    history: list[tuple[float, float]] = []

    def evaluate(c: float) -> float:
        s = float(stat(c))
        if math.isnan(s):
            raise FloatingPointError(f"calibrate: stat({c!r}) returned nan")
        history.append((c, s))
        return s

    def result(message: str) -> Calibration:
        c_best, s_best = min(history, key=lambda cs: abs(cs[1] - target))
        converged = abs(s_best - target) < tol
        return Calibration(c_best, s_best, converged, history, target, "converged" if converged else message)

    # 1. geometric middle, then extrapolate (or double / halve) until the target is bracketed.
    c = math.sqrt(lo * hi)
    s = evaluate(c)
    prev: tuple[float, float] | None = None  # the previous (log c, f) with a finite f
    lower: tuple[float, float] | None = None  # (c, stat) with stat < target
    upper: tuple[float, float] | None = None  # (c, stat) with stat >= target
    while True:
        if abs(s - target) < tol:
            return result("converged")
        if s < target:
            lower = (c, s)
        else:
            upper = (c, s)
        if lower is not None and upper is not None:
            break
        if len(history) >= max_iters:
            return result(f"max_iters={max_iters} reached before the target was bracketed")
        if upper is None and c >= hi:
            return result(f"target {target} not reached inside the bracket: stat(hi={hi})={s} < target")
        if lower is None and c <= lo:
            return result(f"target {target} already exceeded at the bracket's end: stat(lo={lo})={s} >= target")
        f = _log_ratio(s, target)
        nxt = _bracketing_step(c, f, prev, prior_slope, up=upper is None)
        if math.isfinite(f):
            prev = (math.log(c), f)
        c = min(nxt, hi) if upper is None else max(nxt, lo)
        s = evaluate(c)

    # 2. regula falsi in (log c, log stat) with the Illinois rule; geometric bisection as fallback.
    (a, s_a), (b, s_b) = lower, upper
    f_a, f_b = _log_ratio(s_a, target), _log_ratio(s_b, target)  # working values (Illinois halves them)
    last_replaced = 0  # -1: lower end, +1: upper end, 0: none yet
    while len(history) < max_iters:
        x_a, x_b = math.log(a), math.log(b)
        x = (x_a + x_b) / 2
        if math.isfinite(f_a) and math.isfinite(f_b) and f_b != f_a:
            x_rf = x_a - f_a * (x_b - x_a) / (f_b - f_a)
            if x_a < x_rf < x_b:
                x = x_rf
        c = math.exp(x)
        if not a < c < b:  # the bracket has shrunk to float resolution
            return result(f"bracket [{a}, {b}] cannot be split further")
        s = evaluate(c)
        if abs(s - target) < tol:
            return result("converged")
        if s < target:
            a, f_a = c, _log_ratio(s, target)
            if last_replaced == -1:
                f_b /= 2  # the upper end was kept twice in a row
            last_replaced = -1
        else:
            b, f_b = c, _log_ratio(s, target)
            if last_replaced == 1:
                f_a /= 2  # the lower end was kept twice in a row
            last_replaced = 1
    return result(f"max_iters={max_iters} reached")
