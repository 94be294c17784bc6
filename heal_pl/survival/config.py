"""What a survival sweep measures: :class:`SweepConfig` (everything but the model, the steering and c*), the
default α grid, the probe check's bar, and the true/false questions it reads: bundled, or your own (``prompts``,
:mod:`heal_pl.data.prompt_files`) (docs/maths.md §4.6)."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any, ClassVar, Literal

import numpy as np

from heal_pl.checks import Checked
from heal_pl.data.formats import ASSETS
from heal_pl.data.prompt_files import overlap_problem, read_prompts, split_check_eval
from heal_pl.journal import fingerprint
from heal_pl.survival.probes import AUTO, DEFAULT_ANSWER_SETS, AnswerSet, probe_splice
from heal_pl.survival.table import fork_schedule
from heal_pl.survival.thresholds import check_thresholds

ALPHAS: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 4.0)
# heal survival / heal compare stop when fewer than this share of the probe check's prompts is alive (pmass ≥
# threshold) at fork 0 on the unsteered model: the probe then does not suit the model, whatever the steering
MIN_SHARE_ALIVE = 0.5


def load_questions(split: Literal["calib", "eval"]) -> list[dict[str, Any]]:
    """The bundled true/false questions ``heal_pl/data/assets/yesno_{split}.jsonl`` (``prompt``, ``answer``, ...)."""
    if split not in ("calib", "eval"):
        raise ValueError(f"split={split!r} must be 'calib' or 'eval'")
    with open(ASSETS / f"yesno_{split}.jsonl") as f:
        return [json.loads(line) for line in f if line.strip()]


@dataclass
class SweepConfig(Checked):
    """What a survival sweep measures (everything but the model, the steering and c*).

    Args:
        alphas: multiples of c* to sweep, each ``≥ 0``; ``0`` (the unsteered model) is run once for all signs.
        w: rollout window in generated tokens, ``≥ 1``.
        fork_step: a fork every ``fork_step`` tokens (``0, s, 2s, …, w``); or ``n_log_forks`` log-spaced forks.
        threshold: alive while ``pmass ≥ threshold``, in the open interval (0, 1).
        splice: the probe's text, appended after the first ``t`` generated tokens; ``"auto"`` = the model's own turn
            asking "Is the statement true or false?", built from its chat template
            (:func:`heal_pl.survival.probes.probe_splice`; resolved by :meth:`resolved`).
        n_eval: how many evaluation questions (``None`` = all); stop_at_eos: end a rollout at EOS
            (right-censored there) or run every rollout to ``w``.
        prompts: your own true/false statements (``prompt`` and ``answer`` fields: a ``.jsonl`` / ``.csv`` file or a
            ``datasets`` source, :mod:`heal_pl.data.prompt_files`): the evaluation set; without ``check_prompts``
            the file is cut in two, rows 1, 5, 9, … for the probe check and the others for the evaluation.
            ``None`` = the bundled ``yesno_eval.jsonl`` (and ``yesno_calib.jsonl``).
        check_prompts: the probe check's statements, in a file of their own (disjoint from the evaluation's).
        batch_size: prompts per rollout forward; fork_batch: forks packed per probe forward.
        smooth, normalise: spaghetti figure smoothing width and per-trajectory normalisation.
        true_variants, false_variants: the surface forms of the two answer sets.
        thresholds: also recompute the table at these pmass thresholds (``None``: not), from the stored pmass.
    """

    alphas: list[float] = field(default_factory=lambda: list(ALPHAS))
    w: int = 64
    fork_step: int | None = 4
    n_log_forks: int | None = None
    threshold: float = 0.95
    splice: str = AUTO
    n_eval: int | None = None
    stop_at_eos: bool = True
    batch_size: int = 8
    fork_batch: int = 64
    smooth: int = 5
    normalise: bool = False
    true_variants: list[str] = field(default_factory=lambda: list(DEFAULT_ANSWER_SETS[0].variants))
    false_variants: list[str] = field(default_factory=lambda: list(DEFAULT_ANSWER_SETS[1].variants))
    thresholds: list[float] | None = None
    prompts: str | None = None
    check_prompts: str | None = None

    where: ClassVar[str] = "survival"

    def problems(self) -> list[str]:
        def pos_int(x: Any) -> bool:
            return isinstance(x, int) and not isinstance(x, bool) and x >= 1

        try:
            n_questions, sets = len(self.question_sets()[1]), None
        except ValueError as e:
            n_questions, sets = None, str(e)
        given = "bundled questions" if self.prompts is None else f"evaluation prompts of prompts={self.prompts!r}"
        checks = [
            (len(self.alphas) > 0 and all(isinstance(a, (int, float)) and math.isfinite(a) and a >= 0
                                          for a in self.alphas) and len(set(self.alphas)) == len(self.alphas),
             f"alphas={self.alphas!r} must be distinct finite numbers >= 0 (multiples of c*)"),
            (pos_int(self.w), f"w={self.w!r} must be an integer >= 1 (the rollout window in tokens)"),
            ((self.fork_step is None) != (self.n_log_forks is None),
             f"give exactly one of fork_step or n_log_forks, got fork_step={self.fork_step!r}, "
             f"n_log_forks={self.n_log_forks!r}"),
            (self.fork_step is None or pos_int(self.fork_step), f"fork step={self.fork_step!r} must be an integer > 0"),
            (isinstance(self.threshold, (int, float)) and 0.0 < self.threshold < 1.0,
             f"threshold={self.threshold!r} must be in the open interval (0, 1)"),
            (isinstance(self.splice, str) and self.splice.strip() != "", f"splice={self.splice!r} must be non-empty"),
            (sets is None, sets or ""),
            (self.n_eval is None or n_questions is None or (pos_int(self.n_eval) and self.n_eval <= n_questions),
             f"n_eval={self.n_eval!r} must be None or an integer in [1, {n_questions}] ({given})"),
            (pos_int(self.batch_size), f"batch_size={self.batch_size!r} must be an integer >= 1"),
            (pos_int(self.fork_batch), f"fork_batch={self.fork_batch!r} must be an integer >= 1"),
            (pos_int(self.smooth), f"smooth={self.smooth!r} must be an integer >= 1"),
        ]  # fmt: skip
        problems = [msg for ok, msg in checks if not ok]
        if self.thresholds is not None:
            try:
                check_thresholds(self.thresholds)
            except ValueError as e:
                problems.append(str(e))
        if not problems:
            try:
                self.fork_points()
            except ValueError as e:
                problems.append(str(e))
        return [*super().problems(), *problems]

    def __post_init__(self) -> None:
        super().__post_init__()  # every problem in one ValueError
        self.alphas = [float(a) for a in self.alphas]
        self.thresholds = None if self.thresholds is None else check_thresholds(self.thresholds)

    def sweep_config(self) -> SweepConfig:
        """Just the sweep's fields, as a :class:`SweepConfig` (from a subclass that holds more arguments)."""
        return SweepConfig(**{f.name: getattr(self, f.name) for f in fields(SweepConfig)})

    def resolved(self, tokenizer: Any) -> SweepConfig:
        """This config with ``splice`` as the text the probe appends: ``"auto"`` becomes the model's own probe turn
        (:func:`heal_pl.survival.probes.probe_splice`); a given splice is kept (then ``self`` is returned)."""
        return self if self.splice != AUTO else replace(self, splice=probe_splice(tokenizer, self.splice))

    def probe_check_problem(self, check: Mapping[str, Any]) -> str | None:
        """Why the probe check ``check`` (``n``, ``mean_pmass``, ``share_alive``) stops the run, or ``None`` when at
        least :data:`MIN_SHARE_ALIVE` of its prompts is alive at fork 0."""
        if check["share_alive"] >= MIN_SHARE_ALIVE:
            return None
        return (f"the probe check failed: on the unsteered model, right after the prompt (fork 0), "
                f"share_alive={check['share_alive']:.2f} of the {check['n']} probe check prompts have pmass >= "
                f"threshold={self.threshold:g} (mean pmass {check['mean_pmass']:.3g}; a run needs a share >= "
                f"{MIN_SHARE_ALIVE:g}) with splice={self.splice!r}. Most rollouts would die at t = 0, whatever the "
                f"steering: give a splice in the model's own turn format (splice: auto builds it from the chat "
                f"template) or a threshold below the mean pmass")  # fmt: skip

    def fork_points(self) -> np.ndarray:
        """The forks: :func:`heal_pl.survival.table.fork_schedule` of ``w`` with ``fork_step`` or ``n_log_forks``."""
        return fork_schedule(self.w, step=self.fork_step, n_log=self.n_log_forks)

    def question_sets(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """``(probe check questions, evaluation questions)``, each ``{"prompt", "answer", ...}``: from ``prompts``
        and ``check_prompts`` (class docstring), else the bundled ones.

        Raises:
            ValueError: a problem of a file (naming it and the line), or the two sets share a prompt.
        """
        given = self.prompts is not None
        evals = read_prompts(self.prompts, "prompts", answers=True) if given else load_questions("eval")
        if self.check_prompts is not None:
            check = read_prompts(self.check_prompts, "check_prompts", answers=True)
        elif given:
            check, evals = split_check_eval(evals, f"prompts={self.prompts!r}")
        else:
            return load_questions("calib"), evals
        problem = overlap_problem("probe check prompts", check, "evaluation prompts", evals)
        if problem is not None:
            raise ValueError(problem)
        return check, evals

    def eval_questions(self) -> list[dict[str, Any]]:
        """The questions the sweep rolls out: the first ``n_eval`` evaluation questions (all when ``None``)."""
        return self.question_sets()[1][: self.n_eval]

    def prompts_digest(self) -> dict[str, str]:
        """``{"prompts_digest": SHA-256 of both question sets}`` when your own prompts are read, else ``{}``: for a
        journal's config, where an edited file under the same name is another config."""
        if self.prompts is None and self.check_prompts is None:
            return {}
        return {"prompts_digest": fingerprint(dict(zip(("check", "eval"), self.question_sets(), strict=True)))}

    def answer_sets(self) -> tuple[AnswerSet, AnswerSet]:
        return AnswerSet("true", tuple(self.true_variants)), AnswerSet("false", tuple(self.false_variants))
