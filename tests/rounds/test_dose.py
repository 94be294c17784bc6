"""The dose controller: bisection of log κ against an independent numpy reference, and its edge cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from heal_pl.rounds.dose import DoseAttempt, search_dose


def _threshold(kappa_star: float, n: int = 10):
    """All n samples pass at κ ≤ κ*, none above it."""
    return lambda k: DoseAttempt(k, kept=n if k <= kappa_star else 0, total=n)


def _reference(kappa_star: float, kappa_min: float, attempts: int) -> list[float]:
    """The tried doses, computed in float64 with numpy from the rule: 1, then geometric midpoints."""
    lo, hi, tried, k = np.log(kappa_min), 0.0, [], 1.0
    for _ in range(attempts):
        tried.append(k)
        if k <= kappa_star:
            if k == 1.0:
                break
            lo = np.log(k)
        else:
            hi = np.log(k)
        k = float(np.exp(0.5 * (lo + hi)))
    return tried


@pytest.mark.parametrize("kappa_star", [0.02, 0.07, 0.3, 0.55, 0.99])
def test_bisection_matches_the_reference_and_picks_the_largest_passing_dose(kappa_star: float) -> None:
    result = search_dose(_threshold(kappa_star), kappa_min=0.01, target_share=0.5, max_attempts=6)
    tried = [a.kappa for a in result.attempts]
    assert tried == pytest.approx(_reference(kappa_star, 0.01, 6))
    passing = [k for k in tried if k <= kappa_star]
    assert result.passed == bool(passing)
    if passing:
        assert result.chosen.kappa == max(passing) <= kappa_star
        # six attempts: the chosen dose is within one bisection step (in log κ) of the threshold
        assert math.log(kappa_star) - math.log(result.chosen.kappa) <= math.log(1 / 0.01) / 2**4


def test_full_dose_that_passes_is_the_only_attempt() -> None:
    result = search_dose(_threshold(1.0), kappa_min=0.1, target_share=1.0, max_attempts=5)
    assert [a.kappa for a in result.attempts] == [1.0] and result.passed


def test_nothing_passes_returns_the_attempt_that_kept_most() -> None:
    # share rises as κ falls but never reaches the target: kept = round(100 (1 - κ)) of 200
    result = search_dose(lambda k: DoseAttempt(k, round(100 * (1 - k)), 200), 0.05, 0.9, 4)
    assert not result.passed
    assert result.chosen.kept == max(a.kept for a in result.attempts)
    assert result.chosen.kappa == min(a.kappa for a in result.attempts)


def test_zero_kept_everywhere_is_reported_not_raised() -> None:
    result = search_dose(lambda k: DoseAttempt(k, 0, 8), 0.1, 0.5, 3)
    assert not result.passed and result.chosen.kept == 0 and len(result.attempts) == 3
    assert result.chosen.kappa == max(a.kappa for a in result.attempts)  # ties: the larger dose


@pytest.mark.parametrize(("field", "kwargs"), [
    ("kappa_min", {"kappa_min": 0.0}), ("kappa_min", {"kappa_min": 1.5}),
    ("target_share", {"target_share": 0.0}), ("max_attempts", {"max_attempts": 0}),
])  # fmt: skip
def test_bad_arguments_name_the_field(field: str, kwargs: dict) -> None:
    with pytest.raises(ValueError, match=field):
        search_dose(_threshold(0.5), **kwargs)
