"""Dose controller of the steer → heal rounds (docs/maths.md §5.2): the strongest steering whose samples pass.

Steering is applied at ``coeff · κ`` with ``κ ∈ [κ_min, 1]``. ``evaluate(κ)`` samples completions at that
dose and returns ``(kept, total)`` after the filter; the dose passes when ``kept / total ≥ target_share``.

    attempt 1:   κ = 1                                  (full dose; if it passes, stop)
    attempt j:   κ = exp((log lo + log hi) / 2)         lo = κ_min, hi = 1 at the start;
                 pass → lo = κ (try stronger), fail → hi = κ (try weaker)

until ``max_attempts`` doses were tried. The chosen dose is the largest passing κ; when none passed, the
attempt with the most kept samples (ties: the larger κ). ``κ_min`` itself is never sampled unless the
bisection lands on it; with more attempts the tried doses approach it geometrically.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class DoseAttempt:
    """One tried dose: κ, the samples kept by the filter, how many were sampled, and whatever else was made."""

    kappa: float
    kept: int
    total: int
    payload: Any = None

    @property
    def share(self) -> float:
        return self.kept / self.total if self.total else 0.0


@dataclass
class DoseResult:
    """The chosen attempt and every attempt in the order tried."""

    chosen: DoseAttempt
    attempts: list[DoseAttempt] = field(default_factory=list)
    passed: bool = False


def check_dose(kappa_min: float, target_share: float, max_attempts: int) -> None:
    """ValueError naming the field unless ``0 < kappa_min ≤ 1``, ``0 < target_share ≤ 1``, ``max_attempts ≥ 1``."""
    problems = [msg for ok, msg in [
        (0 < kappa_min <= 1, f"kappa_min={kappa_min} must be in (0, 1]"),
        (0 < target_share <= 1, f"target_share={target_share} must be in (0, 1]"),
        (max_attempts >= 1, f"max_attempts={max_attempts} must be >= 1"),
    ] if not ok]  # fmt: skip
    if problems:
        raise ValueError("dose: " + "; ".join(problems))


def search_dose(
    evaluate: Callable[[float], DoseAttempt],
    kappa_min: float = 0.05,
    target_share: float = 0.5,
    max_attempts: int = 4,
) -> DoseResult:
    """Bisect log κ in ``[kappa_min, 1]`` (module docstring) and return the chosen and all attempts.

    Example:
        >>> r = search_dose(lambda k: DoseAttempt(k, kept=int(k < 0.3), total=1), 0.01, 1.0, 4)
        >>> [round(a.kappa, 3) for a in r.attempts], round(r.chosen.kappa, 3)
        ([1.0, 0.1, 0.316, 0.178], 0.178)
    """
    check_dose(kappa_min, target_share, max_attempts)
    lo, hi = math.log(kappa_min), 0.0
    attempts: list[DoseAttempt] = []
    kappa = 1.0
    for _ in range(max_attempts):
        attempt = evaluate(kappa)
        attempts.append(attempt)
        if attempt.share >= target_share:
            if kappa == 1.0:
                break
            lo = math.log(kappa)
        else:
            hi = math.log(kappa)
        kappa = math.exp((lo + hi) / 2)
    passing = [a for a in attempts if a.share >= target_share]
    if passing:
        return DoseResult(max(passing, key=lambda a: a.kappa), attempts, True)
    return DoseResult(max(attempts, key=lambda a: (a.kept, a.kappa)), attempts, False)
