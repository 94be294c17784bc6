"""Iso-KL calibration of a steering method on a model, per sign, with a held-out audit (docs/maths.md §3.4).

For one sign ``σ ∈ {+1, −1}`` of a steering method (a ``SteeringVector``, an ``AdapterSteering``, ...):

    stat(c) = S( measure_kl(model, tokenizer, prompts, method, coeff=σ·c) )      c > 0

where ``S`` is one of the trajectory statistics (default p95 of per-token KL(steered ‖ base)), and
:func:`heal_pl.steering.calibrate.calibrate` finds ``c*`` with ``stat(c*) ≈ target``. The audit then re-measures at
``σ·c*`` on held-out prompts and reports

    audit_ratio = S_audit(σ·c*) / S_calib(σ·c*)

(1 when the budget transfers to new prompts). Every evaluation's coefficient and full statistics are kept.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar

from torch import nn
from transformers import PreTrainedTokenizerBase

from heal_pl.checks import check_choice
from heal_pl.journal import Journal, journaled
from heal_pl.steering.calibrate import calibrate
from heal_pl.steering.hooks import LayerSpec, SteeringMethod
from heal_pl.steering.trajectory import STATS, measure_kl


def sign_name(sign: int) -> str:
    """``"+"`` or ``"-"``: how a sign names its results, rows and logged scalars."""
    return "+" if sign > 0 else "-"


@dataclass
class IsoKLResult:
    """The iso-KL calibration of one sign (:func:`calibrate_method`). As JSON (:meth:`to_dict`, ``calib.json``'s
    ``results``, the callback's state) its keys are the field names; ``result["c_star"]`` reads a field by that key.

    Args:
        sign: ``+1`` or ``-1``; stat: the calibrated statistic; target: its budget in nats.
        c_star: the coefficient found (``> 0``); coeff: ``sign · c_star``, what the model is steered at.
        stat_star: ``stat`` at ``c_star``; converged: whether it is within ``tol`` of ``target``.
        evaluations: ``measure_kl`` calls of the search; message: the root finder's account of how it stopped.
        history: one dict per evaluation, in order: ``c``, ``coeff`` and every statistic of :data:`STATS`.
        stats_star: every statistic at ``c_star``.
        audit: every statistic on the held-out prompts at ``coeff``, or ``None`` (no audit).
        audit_ratio: ``audit[stat] / stat_star``; ``None`` without an audit, NaN when ``stat_star = 0``.
    """

    SCALARS: ClassVar[tuple[str, ...]] = ("c_star", "stat_star", "converged", "evaluations", "audit_ratio")

    sign: int
    stat: str
    target: float
    c_star: float
    coeff: float
    stat_star: float
    converged: bool
    evaluations: int
    message: str
    history: list[dict[str, float]]
    stats_star: dict[str, float]
    audit: dict[str, float] | None
    audit_ratio: float | None

    @property
    def name(self) -> str:
        """``"+"`` or ``"-"`` (:func:`sign_name`)."""
        return sign_name(self.sign)

    def __getitem__(self, key: str) -> Any:
        if key not in self.__dataclass_fields__:
            raise KeyError(key)
        return getattr(self, key)

    def summary(self) -> dict[str, Any]:
        """The headline values :data:`SCALARS` (``audit_ratio`` may be ``None``)."""
        return {k: getattr(self, k) for k in self.SCALARS}

    def scalars(self) -> dict[str, float]:
        """:meth:`summary` as floats for loggers, without the ``None`` ones (no audit: no ``audit_ratio``)."""
        return {k: float(v) for k, v in self.summary().items() if v is not None}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: plain dicts, lists and numbers, keyed by the field names (copied)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> IsoKLResult:
        """The result :meth:`to_dict` wrote; ``ValueError`` naming the missing keys."""
        missing = [f.name for f in fields(cls) if f.name not in data]
        if missing:
            raise ValueError(f"an iso-KL result lacks {', '.join(missing)} (has {', '.join(map(str, data))})")
        return cls(**{f.name: data[f.name] for f in fields(cls)})


def calibrate_method(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    method: SteeringMethod,
    prompts: Sequence[str],
    audit_prompts: Sequence[str] | None = None,
    target: float = 1.0,
    stat: str = "p95",
    bracket: tuple[float, float] = (0.01, 100.0),
    sign: int = 1,
    tol: float = 0.05,
    max_iters: int = 12,
    max_new_tokens: int = 64,
    batch_size: int = 8,
    layers: LayerSpec | None = None,
    on_evaluation: Callable[[dict[str, Any]], None] | None = None,
    journal: Journal | None = None,
) -> IsoKLResult:
    """Find the coefficient at which ``stat`` of KL(steered ‖ base) along the trajectory equals ``target``.

    Args:
        model, tokenizer, method, layers, max_new_tokens, batch_size: as in
            :func:`heal_pl.steering.trajectory.measure_kl`.
        prompts: calibration prompts (chat-formatted text).
        audit_prompts: held-out prompts measured once at the result; ``None`` skips the audit.
        target: the budget in nats, ``> 0`` (default 1).
        stat: which statistic to calibrate: mean, p50, p90, p95, p99, max or rms.
        bracket: the search range ``(lo, hi)`` of ``c > 0`` (see :func:`heal_pl.steering.calibrate.calibrate`).
        sign: ``+1`` or ``−1``; the model is steered at ``sign · c``.
        tol, max_iters: the root finder's stopping rules.
        on_evaluation: called with each history entry as it is measured (progress bars, loggers).
        journal: where each evaluation and the audit are recorded as they finish and read back on a rerun
            (steps ``<plus|minus>_eval_<i>``, ``<plus|minus>_audit``; :class:`heal_pl.journal.Journal`).

    Returns:
        an :class:`IsoKLResult`: ``c_star`` (``> 0``), ``coeff`` (``sign · c_star``), ``stat_star``, ``converged``,
        the search's ``history`` (one dict per ``measure_kl`` call, in order), the ``audit`` on ``audit_prompts``
        at ``coeff`` (``None`` without) and ``audit_ratio``.

    Raises:
        ValueError: an unknown ``stat``, a ``sign`` other than ±1, empty ``audit_prompts``, and every error of
            :func:`~heal_pl.steering.calibrate.calibrate` (target ≤ 0, lo ≥ hi, ...) and of ``measure_kl``.
    """
    check_choice("stat", stat, STATS)
    if isinstance(sign, bool) or sign not in (1, -1):
        raise ValueError(f"sign={sign!r} must be +1 or -1 (calibrate each side separately)")
    if audit_prompts is not None and len(audit_prompts) == 0:
        raise ValueError("audit_prompts is empty; give held-out prompts or None to skip the audit")
    history: list[dict[str, Any]] = []

    def measure(c: float, texts: Sequence[str]) -> dict[str, float]:
        result = measure_kl(model, tokenizer, texts, method, sign * c, max_new_tokens, batch_size, layers)
        return result.stats

    side = "plus" if sign > 0 else "minus"

    def evaluate(c: float) -> float:
        entry = journaled(journal, f"{side}_eval_{len(history) + 1:03d}", {"c": c},
                          lambda: {"c": c, "coeff": sign * c, **measure(c, prompts)})  # fmt: skip
        stats = {k: entry[k] for k in STATS}
        history.append(entry)
        if on_evaluation is not None:
            on_evaluation(entry)
        return stats[stat]

    cal = calibrate(evaluate, target, bracket=bracket, tol=tol, max_iters=max_iters)
    best = next(h for h in history if h["c"] == cal.c_star)
    stats_star = {k: best[k] for k in STATS}
    audit = None if audit_prompts is None else journaled(
        journal, f"{side}_audit", {"c": cal.c_star}, lambda: {"c": cal.c_star, **measure(cal.c_star, audit_prompts)})
    audit = None if audit is None else {k: audit[k] for k in STATS}
    ratio = None
    if audit is not None:
        ratio = audit[stat] / cal.stat_star if cal.stat_star != 0 else math.nan
    return IsoKLResult(sign=sign, stat=stat, target=target, c_star=cal.c_star, coeff=sign * cal.c_star,
                       stat_star=cal.stat_star, converged=cal.converged, evaluations=cal.evaluations,
                       message=cal.message, history=history, stats_star=stats_star, audit=audit, audit_ratio=ratio)
