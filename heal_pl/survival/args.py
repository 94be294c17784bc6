"""The arguments of ``heal survival`` and ``heal compare``: the groups of :mod:`heal_pl.steering.args` and the sweep's
(:class:`~heal_pl.survival.config.SweepConfig`), joined by inheritance so that each field is written once and the
YAML keys and flags stay flat (``--w 32``, ``--stat p95``, ``--calibration "{n_fit: 8}"``):

* :class:`SweepArgs`: SteeringArgs + SweepConfig + ``calibration`` (both commands);
* :class:`SurvivalArgs`: SweepArgs + method + calib_json + out_dir, the arguments of ``heal survival``;
* :class:`CompareArgs`: SweepArgs + methods + prompt_baseline + system + out_dir, the arguments of ``heal compare``.

Each checks itself when built (:class:`heal_pl.checks.Checked`): one ``ValueError`` names every bad field, the
``calibration`` dict's keys and values included, before any model is loaded.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

from heal_pl.checks import choice_problem
from heal_pl.data.prompt_files import overlap_problem
from heal_pl.steering.args import (
    CALIBRATION_KEYS,
    METHODS,
    CalibrationSettings,
    Method,
    MethodArgs,
    SteeringArgs,
    n_fit_problem,
)
from heal_pl.steering.prompt_baseline import SystemPrompt
from heal_pl.survival.config import SweepConfig


@dataclass
class SweepArgs(SweepConfig, SteeringArgs):
    """What ``heal survival`` and ``heal compare`` share: the steering, its calibration, the α sweep.

    Args:
        calibration: further ``heal calibrate`` arguments, by name (:class:`~heal_pl.steering.args.
            CalibrationSettings`: ``n_fit``, ``n_calib``, ``n_audit``, ``bracket``, ``tol``, ``max_iters``,
            ``max_new_tokens``, ``batch_size``, ``pos_system``, ``neg_system``, ``prompts``: your own open questions
            for the vector and c*); ``None`` = their defaults. With your own prompts on either side, the
            calibration's questions and the evaluation's must be disjoint.
    """

    calibration: dict[str, Any] | None = None

    def calibrated_methods(self) -> list[str]:
        """The methods this command calibrates (their needs decide whether ``n_fit`` may be 0)."""
        return []

    def problems(self) -> list[str]:
        problems = super().problems()
        extra = {} if self.calibration is None else self.calibration
        if not isinstance(extra, Mapping):
            return [*problems, f"calibration={extra!r} must be a mapping of heal calibrate arguments or None"]
        unknown = sorted(set(extra) - set(CALIBRATION_KEYS))
        if unknown:
            return [*problems, f"calibration keys {unknown} are not heal calibrate arguments; "
                               f"allowed: {sorted(CALIBRATION_KEYS)}"]  # fmt: skip
        try:
            settings = CalibrationSettings(**extra)
        except ValueError as e:
            return [*problems, str(e)]
        n_fit = n_fit_problem(settings.n_fit, self.calibrated_methods()) if self.calibrated_methods() else None
        if n_fit is not None:
            return [*problems, f"calibration: {n_fit}"]
        overlap = self.overlap_problem(settings) if self.calibrated_methods() and not problems else None
        return problems if overlap is None else [*problems, overlap]

    def overlap_problem(self, settings: CalibrationSettings) -> str | None:
        """Why the calibration's questions (the vector is fitted, c* searched and audited on them) meet the
        evaluation's, or ``None``; checked when your own prompts are given to either (the bundled sets are
        disjoint)."""
        if settings.prompts is None and self.prompts is None:
            return None
        calibration = [{"prompt": q} for q in settings.questions()]
        return overlap_problem("calibration prompts", calibration, "evaluation prompts", self.question_sets()[1])

    def calibrate_kwargs(self, method: str, adapter_dir: str | None, out_dir: str) -> dict[str, Any]:
        """The keywords of ``run_calibration`` (:class:`~heal_pl.steering.args.CalibrateArgs`) for ``method``."""
        steering = {f.name: getattr(self, f.name) for f in fields(SteeringArgs)}
        return {**steering, "method": method, "adapter_dir": adapter_dir, "out_dir": out_dir,
                **(self.calibration or {})}  # fmt: skip


@dataclass
class SurvivalArgs(SweepArgs, MethodArgs):
    """The arguments of ``heal survival``.

    Args:
        calib_json: a ``calib.json`` from ``heal calibrate`` on the same model; ``None`` = calibrate now with
            ``method``, ``adapter_dir``, ``layers``, ``target``, ``stat``, ``signs`` and ``calibration`` (which are
            ignored otherwise, but for ``signs``: each must have been calibrated there).
        out_dir: where the files, figures and TensorBoard events go (calibration in ``out_dir/calibrate``).
    """

    where: ClassVar[str] = "heal survival"
    calib_json: str | None = None
    out_dir: str = "runs/survival"

    def calibrated_methods(self) -> list[str]:
        return [self.method] if self.calib_json is None else []


def methods_problems(methods: Sequence[str], adapter_dir: str | None) -> list[str]:
    """Every problem of ``methods`` / ``adapter_dir``: empty, unknown, twice, ``adapter`` without a folder, …"""
    problems = []
    if not methods:
        problems.append(f"methods={list(methods)!r} is empty; give at least one of {', '.join(METHODS)}")
    problems += [p for p in (choice_problem("methods item", m, Method) for m in methods) if p is not None]
    twice = sorted({m for m in methods if list(methods).count(m) > 1})
    if twice:
        problems.append(f"methods={list(methods)!r} names {', '.join(twice)} more than once")
    if "adapter" in methods and not adapter_dir:
        problems.append("methods holds 'adapter', which needs adapter_dir (a peft adapter folder)")
    if adapter_dir and "adapter" not in methods:
        problems.append(f"adapter_dir is only read with 'adapter' in methods, got methods={list(methods)!r}")
    return problems


@dataclass
class CompareArgs(SweepArgs):
    """The arguments of ``heal compare``.

    Args:
        methods: the steering methods, each once: mean_diff, pca, directional_ablation, adapter (needs
            ``adapter_dir``); each runs ``heal survival`` into ``out_dir/<method>/``.
        prompt_baseline: also measure the system prompt ``system`` against none (the row ``prompt``).
        system: the baseline's system prompt; ``None`` = the calibration's ``pos_system`` (default the pirate
            persona, :data:`heal_pl.data.prompts.PIRATE`). A blank one is refused.
        out_dir: where compare.md / .csv / .json, the figures, TensorBoard and the per-method folders go.
    """

    where: ClassVar[str] = "heal compare"
    methods: list[Method] = field(default_factory=lambda: ["mean_diff", "pca", "directional_ablation"])
    prompt_baseline: bool = True
    system: str | None = None
    out_dir: str = "runs/compare"

    @property
    def baseline_system(self) -> str:
        """``system``, or the calibration's ``pos_system`` when ``None``."""
        if self.system is not None:
            return self.system
        extra = self.calibration if isinstance(self.calibration, Mapping) else {}
        return extra.get("pos_system", CalibrationSettings.pos_system)

    def calibrated_methods(self) -> list[str]:
        return list(self.methods)

    def problems(self) -> list[str]:
        problems = [*super().problems(), *methods_problems(self.methods, self.adapter_dir)]
        if self.prompt_baseline:
            try:
                SystemPrompt(self.baseline_system)
            except ValueError as e:
                problems.append(str(e))
        return problems
