"""The arguments of ``heal calibrate``, and the groups of them ``heal survival`` and ``heal compare`` share.

One dataclass per group; a command's arguments are its groups joined by inheritance, so each field is written once
and the YAML keys and flags stay flat (``--stat p95``, never ``--steering.stat``):

* :class:`SteeringArgs`: model, device, dtype, adapter_dir, layers, target, stat, signs (calibrate, survival, compare);
* :class:`MethodArgs`: SteeringArgs + method (calibrate and survival; compare has ``methods``);
* :class:`CalibrationSettings`: pos_system, neg_system, n_fit, n_calib, n_audit, prompts, bracket, tol, max_iters,
  max_new_tokens, batch_size (flat in ``heal calibrate``, the ``calibration`` dict of survival and compare);
* :class:`CalibrateArgs`: MethodArgs + CalibrationSettings + out_dir, the arguments of ``heal calibrate``.

Each checks itself when built (:class:`heal_pl.checks.Checked`): one ``ValueError`` names every bad field and what it
allows. The field rules are functions (:func:`signs_problem`, :func:`bracket_problem`, :func:`positive_problem`), so
that :class:`~heal_pl.callbacks.IsoKLCalibrationCallback` applies the very same ones. ``heal survival`` and
``heal compare`` add their groups in :mod:`heal_pl.survival.args`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import ClassVar, Literal, get_args

from heal_pl.checks import Checked, choice_problem, int_problem
from heal_pl.data.prompts import NEUTRAL, PIRATE, questions
from heal_pl.hardware import RunDtype, resolve_device, resolve_dtype
from heal_pl.steering.trajectory import STATS, Stat

Method = Literal["mean_diff", "pca", "directional_ablation", "adapter"]
METHODS: tuple[str, ...] = get_args(Method)


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def signs_problem(signs: object) -> str | None:
    """The one sign rule of every command and of the callback: a non-empty list of distinct signs, each the integer
    1 or -1. The message shows ``signs`` as given, or ``None`` when it follows the rule."""
    ok = (isinstance(signs, Sequence) and not isinstance(signs, str) and len(signs) > 0
          and all(isinstance(s, int) and not isinstance(s, bool) and s in (1, -1) for s in signs)
          and len(set(signs)) == len(signs))  # fmt: skip
    return None if ok else f"signs={signs!r} must hold +1 and/or -1, each once"


def bracket_problem(bracket: object) -> str | None:
    """The search range ``(lo, hi)`` of ``c``: two finite numbers, ``0 < lo < hi``."""
    ok = (isinstance(bracket, Sequence) and len(bracket) == 2 and all(_is_number(b) for b in bracket)
          and 0 < bracket[0] < bracket[1])  # fmt: skip
    return None if ok else f"bracket={bracket!r} must be (lo, hi) with 0 < lo < hi, both finite"


def positive_problem(name: str, value: object) -> str | None:
    """``value`` must be a finite number ``> 0`` (``target``, ``tol``)."""
    ok = _is_number(value) and value > 0  # type: ignore[operator]
    return None if ok else f"{name}={value!r} must be a finite number > 0"


def n_fit_problem(n_fit: object, methods: Sequence[str]) -> str | None:
    """A vector is fitted on ``n_fit ≥ 1`` questions; with only ``adapter`` in ``methods`` nothing is fitted."""
    return int_problem("n_fit", n_fit, 1 if set(methods) - {"adapter"} else 0)


def _present(*problems: str | None) -> list[str]:
    return [p for p in problems if p is not None]


@dataclass
class SteeringArgs(Checked):
    """What is steered, on which model, to which KL dose: the arguments every steering command shares.

    Args:
        model: model alias, folder or Hugging Face id.
        device: ``auto`` (CUDA when present, else CPU), ``cpu``, ``cuda`` or ``cuda:N`` (:mod:`heal_pl.hardware`).
        dtype: the dtype the weights are loaded in: ``auto`` (``bfloat16`` on a CUDA device, else ``float32``),
            ``float32``, ``bfloat16`` or ``float16``; the KLs are float32 whatever it is.
        adapter_dir: a peft adapter folder (e.g. ``runs/rmse/version_0/adapter``), read by the ``adapter`` method.
        layers: decoder blocks to steer, as depth fractions (floats) or indices (ints).
        target: the KL budget in nats (> 0).
        stat: which statistic of the per-token KL(steered ‖ base) along the greedy trajectory must equal ``target``.
        signs: which signs to calibrate: +1 and/or -1, each once.
    """

    where: ClassVar[str] = "steering"
    model: str = "smollm2-135m-instruct"
    device: str = "auto"
    dtype: RunDtype = "auto"
    adapter_dir: str | None = None
    layers: list[float] | list[int] | float | int = 0.5
    target: float = 1.0
    stat: Stat = "p95"
    signs: list[int] = field(default_factory=lambda: [1, -1])

    def problems(self) -> list[str]:
        try:
            resolve_device(self.device)
            device = None
        except ValueError as e:
            device = str(e)
        return [*super().problems(), *_present(
            device, choice_problem("dtype", self.dtype, RunDtype), positive_problem("target", self.target),
            choice_problem("stat", self.stat, STATS), signs_problem(self.signs))]  # fmt: skip

    def __post_init__(self) -> None:
        super().__post_init__()
        self.dtype = resolve_dtype(self.dtype, self.device)  # auto -> the device's; the journal records the choice


@dataclass
class MethodArgs(SteeringArgs):
    """One steering method (``heal calibrate``, ``heal survival``).

    Args:
        method: a vector to fit from the persona contrast (mean_diff | pca | directional_ablation), or ``adapter``
            (the adapter of ``adapter_dir``, its delta scaled by the coefficient).
    """

    method: Method = "mean_diff"

    def problems(self) -> list[str]:
        problems = [*super().problems(), *_present(choice_problem("method", self.method, METHODS))]
        if self.method == "adapter" and not self.adapter_dir:
            problems.append("method='adapter' needs adapter_dir (a peft adapter folder)")
        if self.method != "adapter" and self.adapter_dir:
            problems.append(f"adapter_dir is only read with method='adapter', got method={self.method!r}")
        return problems


@dataclass
class CalibrationSettings(Checked):
    """How c* is found and audited: flat in ``heal calibrate``, the ``calibration`` dict of survival and compare.

    Args:
        pos_system: the persona whose contrast with ``neg_system`` defines the vector.
        neg_system: the other side of the contrast (a plain assistant).
        n_fit: questions the vector is fitted on (>= 1; 0 is allowed with ``method: adapter``, nothing fitted).
        n_calib: the next questions, on which c* is searched (>= 1).
        n_audit: the next ones, held out, on which c* is re-measured (>= 1).
        prompts: your own questions: a ``.jsonl`` / ``.csv`` file with a ``prompt`` field, a ``.txt`` file with one
            per line, or a ``datasets`` source (:mod:`heal_pl.data.prompt_files`), read in file order (fit,
            calibration, audit); ``None`` = the bundled persona questions.
        bracket: the search range ``(lo, hi)`` of ``c``, ``0 < lo < hi``.
        tol: the root finder's tolerance on the statistic (absolute nats, > 0).
        max_iters: the most evaluations per sign (>= 1).
        max_new_tokens: the greedy trajectory length in tokens (>= 1).
        batch_size: prompts per forward (>= 1).
    """

    where: ClassVar[str] = "calibration"
    pos_system: str = PIRATE
    neg_system: str = NEUTRAL
    n_fit: int = 16
    n_calib: int = 8
    n_audit: int = 8
    prompts: str | None = None
    bracket: tuple[float, float] = (0.5, 64.0)
    tol: float = 0.05
    max_iters: int = 10
    max_new_tokens: int = 32
    batch_size: int = 8

    def problems(self) -> list[str]:
        counts = _present(int_problem("n_fit", self.n_fit, 0), int_problem("n_calib", self.n_calib, 1),
                          int_problem("n_audit", self.n_audit, 1))  # fmt: skip
        return [*super().problems(), *counts, *_present(
            None if counts else self.prompts_problem(), bracket_problem(self.bracket),
            positive_problem("tol", self.tol), int_problem("max_iters", self.max_iters, 1),
            int_problem("max_new_tokens", self.max_new_tokens, 1), int_problem("batch_size", self.batch_size, 1))]

    def questions(self) -> list[str]:
        """The ``n_fit + n_calib + n_audit`` questions, in that order: from ``prompts``, or bundled ones."""
        return questions(self.n_fit + self.n_calib + self.n_audit, self.prompts)

    def prompts_problem(self) -> str | None:
        """Why ``prompts`` cannot give the questions (a missing field, too few prompts, ...), or ``None``."""
        if self.prompts is None:
            return None
        try:
            self.questions()
        except ValueError as e:
            return str(e)
        return None


CALIBRATION_KEYS: tuple[str, ...] = tuple(f.name for f in fields(CalibrationSettings))  # the `calibration` dict's keys


@dataclass
class CalibrateArgs(CalibrationSettings, MethodArgs):
    """The arguments of ``heal calibrate``.

    Args:
        out_dir: where calib.json, history.csv, summary.csv, audit.csv and TensorBoard events go.
    """

    where: ClassVar[str] = "heal calibrate"
    out_dir: str = "runs/calibrate"

    def problems(self) -> list[str]:
        problems = super().problems()
        if not any(p.startswith("n_fit=") for p in problems):
            problems += _present(n_fit_problem(self.n_fit, [self.method]))
        return problems
