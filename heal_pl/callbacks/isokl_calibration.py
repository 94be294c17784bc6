"""``IsoKLCalibrationCallback``: iso-KL calibration of the module's own adapter, from inside a Lightning fit.

The trained peft LoRA adapter is treated as a steering method (:class:`~heal_pl.steering.AdapterSteering`:
α = 0 is the base, α = 1 the adapter as trained) and, for each sign ``σ``,
:func:`heal_pl.steering.isokl.calibrate_method` finds ``c*`` with ``stat`` of KL(steered ‖ base) along the greedy
trajectory equal to ``target`` (docs/maths.md §3), then audits ``σ·c*`` on held-out prompts. This runs

* at the end of training (``on_train_end``, before the loggers are finalised), and
* optionally every ``every_n_val_epochs`` validation epochs (sanity checks are skipped),

on global rank zero only. The model is put in eval mode and run without gradient; every submodule's
train/eval mode and the adapter's scaling are restored afterwards, so training continues unchanged.

Logged through every logger of the trainer (``logger.log_metrics`` at ``trainer.global_step``; Lightning's
``self.log`` is not allowed in ``on_train_end``), for each sign ``s`` in ``+``/``-``::

    {prefix}{s}/c_star  {prefix}{s}/stat_star  {prefix}{s}/converged  {prefix}{s}/evaluations  {prefix}{s}/audit_ratio

The last results (one :class:`~heal_pl.steering.isokl.IsoKLResult` per sign, history included) are kept in
``callback.results`` and, as plain dicts with the keys of ``calib.json``'s results, in the callback's ``state_dict``
(so in checkpoints).

With ``survival=SweepConfig(...)`` each calibration is followed by the survival sweep of ``heal survival``
(:func:`heal_pl.survival.sweep.sweep_survival`: α · c* per sign, forced-choice forks, Kaplan–Meier) on the
adapter, its files in ``survival_dir/step_<global step>`` (default ``<trainer.log_dir>/survival``) and its
figures and scalars under ``{prefix}survival/`` in the first TensorBoard logger, if any; the last sweep's
summary table is ``callback.survival_table``.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info
from transformers import PreTrainedTokenizerBase

from heal_pl.adapters.switch import find_peft_model
from heal_pl.callbacks.state import load_legacy_state
from heal_pl.checks import choice_problem, int_problem
from heal_pl.data.prompts import chat_prompt, questions
from heal_pl.models.fsdp import gathered_root
from heal_pl.steering.adapter import AdapterSteering
from heal_pl.steering.args import bracket_problem, positive_problem, signs_problem
from heal_pl.steering.isokl import IsoKLResult, calibrate_method, sign_name
from heal_pl.steering.trajectory import STATS
from heal_pl.survival.config import SweepConfig
from heal_pl.survival.probes import answer_token_ids
from heal_pl.survival.sweep import sweep_survival


@contextlib.contextmanager
def _evaluating(module: L.LightningModule) -> Iterator[None]:
    """Eval mode and no gradient inside; every submodule's train/eval mode restored on exit."""
    modes = [(m, m.training) for m in module.modules()]
    try:
        module.eval()
        with torch.no_grad():
            yield
    finally:
        for m, mode in modes:
            m.training = mode


class IsoKLCalibrationCallback(Callback):
    """Calibrates the module's peft adapter to an equal KL dose per sign, at fit end and every N validations.

    Args:
        prompts: chat-formatted calibration prompts; ``None`` = the first ``n_calib`` bundled persona questions
            (held-out ones first) rendered with the tokenizer's chat template and no system prompt.
        audit_prompts: held-out prompts measured once at ``c*``; ``None`` = the next ``n_audit`` bundled
            questions (no audit when ``n_audit = 0``).
        n_calib, n_audit: how many bundled questions to use when ``prompts`` / ``audit_prompts`` are ``None``.
        target: the KL budget in nats (``> 0``); stat: which trajectory statistic must equal it
            (mean, p50, p90, p95, p99, max, rms).
        bracket: the search range ``(lo, hi)`` of ``c``, ``0 < lo < hi``; signs: which signs to calibrate (±1).
        tol, max_iters: the root finder's stopping rules (absolute nats; evaluations).
        max_new_tokens, batch_size: greedy trajectory length and prompts per forward.
        every_n_val_epochs: also calibrate after every N-th (non-sanity) validation epoch; ``None`` = fit end only.
        tokenizer_name: model alias / folder / Hugging Face id to load the tokenizer from when neither the
            module (``pl_module.tokenizer``) nor the datamodule (``trainer.datamodule.tokenizer``) has one.
        prefix: logged names are ``{prefix}+/c_star``, ...
        survival: run the survival sweep after each calibration with these settings; ``None`` = no sweep.
        survival_dir: where the sweep's files go (``None``: ``<trainer.log_dir>/survival``).

    Raises:
        ValueError: at construction, for any bad argument (the message names the field); at calibration time,
            when the module holds no (or several) peft models or no tokenizer can be found.

    Example::

        cb = IsoKLCalibrationCallback(target=1.0, signs=(1, -1), every_n_val_epochs=2, tokenizer_name="tiny-llama")
        L.Trainer(max_epochs=4, callbacks=[cb]).fit(HealModule(model="tiny-llama"), datamodule=dm)
        cb.results["+"].c_star, cb.results["+"].audit_ratio
    """

    def __init__(
        self,
        prompts: list[str] | None = None,
        audit_prompts: list[str] | None = None,
        n_calib: int = 4,
        n_audit: int = 4,
        target: float = 1.0,
        stat: str = "p95",
        bracket: tuple[float, float] = (0.05, 8.0),
        signs: Sequence[int] = (1,),
        tol: float = 0.05,
        max_iters: int = 8,
        max_new_tokens: int = 16,
        batch_size: int = 8,
        every_n_val_epochs: int | None = None,
        tokenizer_name: str | None = None,
        prefix: str = "isokl/",
        survival: SweepConfig | None = None,
        survival_dir: str | None = None,
    ) -> None:
        problems = [f"{name} is empty; give prompts or None for the bundled questions"
                    for name, given in (("prompts", prompts), ("audit_prompts", audit_prompts))
                    if given is not None and len(given) == 0]  # fmt: skip
        # heal calibrate's field rules (heal_pl.steering.args), its sign rule included; n_audit may be 0 here
        problems += [p for p in (
            int_problem("n_calib", n_calib, 1), int_problem("n_audit", n_audit, 0, " (0 = no audit)"),
            positive_problem("target", target), choice_problem("stat", stat, STATS), bracket_problem(bracket),
            signs_problem(signs), positive_problem("tol", tol), int_problem("max_iters", max_iters, 1),
            int_problem("max_new_tokens", max_new_tokens, 1), int_problem("batch_size", batch_size, 1),
        ) if p is not None]  # fmt: skip
        if every_n_val_epochs is not None and int_problem("every_n_val_epochs", every_n_val_epochs, 1):
            problems.append(f"every_n_val_epochs={every_n_val_epochs!r} must be an integer >= 1 or None (fit end only)")
        if survival is not None and not isinstance(survival, SweepConfig):
            problems.append("survival must be a heal_pl.survival.config.SweepConfig or None, got "
                            f"{type(survival).__name__}")
        if problems:
            raise ValueError("IsoKLCalibrationCallback: " + "; ".join(problems))
        signs = tuple(signs)
        self.prompts = None if prompts is None else list(prompts)
        self.audit_prompts = None if audit_prompts is None else list(audit_prompts)
        self.n_calib, self.n_audit = n_calib, n_audit
        self.target, self.stat, self.bracket = float(target), stat, (float(bracket[0]), float(bracket[1]))
        self.signs, self.tol, self.max_iters = signs, float(tol), max_iters
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size
        self.every_n_val_epochs, self.tokenizer_name, self.prefix = every_n_val_epochs, tokenizer_name, prefix
        self.survival, self.survival_dir = survival, survival_dir
        self.survival_table: list[dict[str, Any]] = []
        self.results: dict[str, IsoKLResult] = {}
        self.val_epochs = 0  # non-sanity validation epochs seen
        self.calibrations = 0  # calibrations run (each covers every sign)
        self._tokenizer: PreTrainedTokenizerBase | None = None

    # ------------------------------------------------------------------ hooks

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or self.every_n_val_epochs is None:
            return
        self.val_epochs += 1
        if self.val_epochs % self.every_n_val_epochs == 0:
            self.run(trainer, pl_module, f"validation epoch {self.val_epochs}")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.run(trainer, pl_module, "end of training")

    # ------------------------------------------------------------------ the calibration

    def tokenizer(self, trainer: L.Trainer | None, pl_module: L.LightningModule) -> PreTrainedTokenizerBase:
        """The module's tokenizer, else the datamodule's, else ``load_tokenizer(tokenizer_name)``."""
        tok = getattr(pl_module, "tokenizer", None)
        if tok is None and trainer is not None:
            tok = getattr(getattr(trainer, "datamodule", None), "tokenizer", None)
        if tok is None and self.tokenizer_name is not None:
            if self._tokenizer is None:
                from heal_pl.models.load import load_tokenizer

                self._tokenizer = load_tokenizer(self.tokenizer_name)
            tok = self._tokenizer
        if tok is None:
            raise ValueError(
                f"IsoKLCalibrationCallback found no tokenizer: give {type(pl_module).__name__} a `.tokenizer` "
                "attribute, or use a datamodule with a `.tokenizer` (trainer.datamodule.tokenizer), or pass "
                "tokenizer_name= (a model alias, folder or Hugging Face id) to the callback"
            )
        return tok

    def build_prompts(self, tokenizer: PreTrainedTokenizerBase) -> tuple[list[str], list[str] | None]:
        """(calibration prompts, audit prompts or None): the given ones, or bundled questions in chat format."""
        n_calib = 0 if self.prompts is not None else self.n_calib
        n_audit = 0 if self.audit_prompts is not None else self.n_audit
        qs = questions(n_calib + n_audit) if n_calib + n_audit else []
        calib = self.prompts if self.prompts is not None else [chat_prompt(tokenizer, q, None) for q in qs[:n_calib]]
        if self.audit_prompts is not None:
            audit: list[str] | None = self.audit_prompts
        else:
            audit = [chat_prompt(tokenizer, q, None) for q in qs[n_calib:]] or None
        return calib, audit

    def calibrate(self, pl_module: L.LightningModule, tokenizer: PreTrainedTokenizerBase) -> dict[str, IsoKLResult]:
        """Calibrate each sign of ``pl_module``'s adapter; modes and the adapter's scaling restored after."""
        peft_model = find_peft_model(pl_module)
        method = AdapterSteering(peft_model)
        calib, audit = self.build_prompts(tokenizer)
        results: dict[str, IsoKLResult] = {}
        with _evaluating(pl_module):
            for sign in self.signs:
                results[sign_name(sign)] = calibrate_method(
                    peft_model, tokenizer, method, calib, audit, target=self.target, stat=self.stat,
                    bracket=self.bracket, sign=sign, tol=self.tol, max_iters=self.max_iters,
                    max_new_tokens=self.max_new_tokens, batch_size=self.batch_size,
                )  # fmt: skip
        return results

    def sweep(self, trainer: L.Trainer, pl_module: L.LightningModule,
              tokenizer: PreTrainedTokenizerBase) -> list[dict[str, Any]]:
        """The survival sweep at the last results' c* (``survival`` settings), modes restored; its table rows."""
        if self.survival is None:
            raise ValueError("IsoKLCalibrationCallback.sweep needs survival=SweepConfig(...) at construction")
        peft_model = find_peft_model(pl_module)
        root = Path(self.survival_dir) if self.survival_dir else Path(trainer.log_dir or trainer.default_root_dir)
        out = (root if self.survival_dir else root / "survival") / f"step_{trainer.global_step}"
        tb = next((lg.experiment for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)
        ids = answer_token_ids(tokenizer, self.survival.answer_sets())
        scratch = contextlib.nullcontext() if trainer.is_global_zero else tempfile.TemporaryDirectory()
        with _evaluating(pl_module), scratch as elsewhere:  # the other ranks run the same sweep, writing nothing kept
            if elsewhere is not None:
                out, tb = Path(elsewhere), None
            summary = sweep_survival(
                peft_model, tokenizer, AdapterSteering(peft_model), {n: r.c_star for n, r in self.results.items()},
                self.survival, ids, out, kl_target=self.target, writer=tb, tag_prefix=f"{self.prefix}survival/",
                step=trainer.global_step,
            )  # fmt: skip
        return summary["table"]

    def metrics(self) -> dict[str, float]:
        """The logged scalars of the last results (``audit_ratio`` only when there was an audit)."""
        return {f"{self.prefix}{name}/{key}": value for name, r in self.results.items()
                for key, value in r.scalars().items()}  # fmt: skip

    def run(self, trainer: L.Trainer, pl_module: L.LightningModule, when: str = "") -> dict[str, IsoKLResult]:
        """Calibrate now, keep the results, log them to every logger of ``trainer`` at its global step.

        Every rank runs it (the same forwards: nobody waits at the next collective under DDP, and FSDP's
        gathers stay in step, with the root unit gathered); only rank 0 logs and writes files."""
        with gathered_root(trainer.strategy.model):
            return self._run(trainer, pl_module, when)

    def _run(self, trainer: L.Trainer, pl_module: L.LightningModule, when: str) -> dict[str, IsoKLResult]:
        self.results = self.calibrate(pl_module, self.tokenizer(trainer, pl_module))
        self.calibrations += 1
        metrics = self.metrics()
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        rows = ", ".join(
            f"{n}: c*={r.c_star:.4g} {self.stat}={r.stat_star:.3f} converged={r.converged} "
            f"evals={r.evaluations} audit_ratio={'n/a' if r.audit_ratio is None else format(r.audit_ratio, '.3f')}"
            for n, r in self.results.items()
        )
        rank_zero_info(f"heal_pl: iso-KL calibration ({when}, {self.stat} = {self.target:g} nats) {rows}")
        if self.survival is not None:
            self.survival_table = self.sweep(trainer, pl_module, self.tokenizer(trainer, pl_module))
            rank_zero_info("heal_pl: survival after calibration: " + ", ".join(
                f"α={r['label']}: S_end={r['S_end']:.2f}" for r in self.survival_table))
        return self.results

    # ------------------------------------------------------------------ state

    @property
    def state_key(self) -> str:
        """Distinct per ``prefix`` and calibration goal, so two calibrations in one Trainer keep their own state."""
        return self._generate_state_key(prefix=self.prefix, stat=self.stat, target=self.target)

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        load_legacy_state(self, checkpoint)  # a checkpoint from before the state_key: under the class name

    def state_dict(self) -> dict[str, Any]:
        results = {n: r.to_dict() for n, r in self.results.items()}  # plain values: loadable with weights_only
        return {"results": results, "val_epochs": self.val_epochs, "calibrations": self.calibrations}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "results" in state_dict:
            self.results = {n: IsoKLResult.from_dict(r) for n, r in state_dict["results"].items()}
        self.val_epochs = int(state_dict.get("val_epochs", self.val_epochs))
        self.calibrations = int(state_dict.get("calibrations", self.calibrations))
