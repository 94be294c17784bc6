"""``RouteAblateEvalCallback``: gradient routing and kept-vs-ablated evaluation for any LightningModule
(docs/maths.md §2).

The module only has to hold a Hugging Face causal LM wrapped with
:func:`heal_pl.adapters.routed.wrap_routed` (``HealModule(adapter="routed")`` does). The callback

1. at fit start, builds the hack basis from a pairs JSONL (:func:`heal_pl.routing.basis.fit_basis`, at the
   model's current point) or loads a saved one (:meth:`HackBasis.load`), and checks it matches the
   adapter; optionally refits it from the pairs every ``refresh_every`` optimizer steps;
2. in ``on_before_optimizer_step`` — after AMP unscaling, before gradient clipping — routes each
   module's accumulated gradient (:func:`heal_pl.routing.train.route_gradients`) and logs
   ``route/cin``, ``route/cout``, ``route/fired``;
3. every ``eval_every`` optimizer steps and at the end of fit, runs the task evaluation with
   ``delta_hack`` kept and ablated, logs ``route/{kept,ablated}_{hack,solve}``, and at the end prints the
   table and writes it as ``route_ablate.csv`` in the log dir.

It also forces weight decay 0 on ``delta_hack`` (moving those knobs to a decay-free copy of their param
group, with a warning) and checks that the hack knobs are in the optimizer when ``arm="route"``.
"""

from __future__ import annotations

import csv
import importlib
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from heal_pl.adapters.routed import RoutedAdapter
from heal_pl.checks import check_choice
from heal_pl.data.formats import ASSETS, bundled_file
from heal_pl.routing.basis import HackBasis, fit_basis, read_pairs
from heal_pl.routing.project import Arm, Gate
from heal_pl.routing.train import find_routed_adapter, force_zero_hack_decay, route_gradients

Evaluate = Callable[[nn.Module, Any], Mapping[str, float]]
COLUMNS = ("step", "kept_hack", "kept_solve", "ablated_hack", "ablated_solve")


def resolve_file(path: str, field: str) -> Path:
    """``path`` as given, or a bare name of a bundled file in ``heal_pl/data/assets``; ``ValueError`` naming
    ``field``."""
    found = Path(bundled_file(path)).expanduser()
    if found.is_file():
        return found
    raise ValueError(f"{field}={path!r} is not an existing file (nor a bundled one in {ASSETS})")


def build_evaluate(evaluate: Evaluate | Mapping[str, Any] | None) -> Evaluate | None:
    """A callable as is; ``{"class_path": "pkg.Class", "init_args": {...}}`` instantiated (the YAML form)."""
    if evaluate is None or callable(evaluate):
        return evaluate
    if isinstance(evaluate, Mapping) and "class_path" in evaluate:
        module_name, _, name = str(evaluate["class_path"]).rpartition(".")
        try:
            cls = getattr(importlib.import_module(module_name), name)
        except (ImportError, AttributeError, ValueError) as e:
            raise ValueError(f"evaluate.class_path={evaluate['class_path']!r} cannot be imported: {e}") from None
        return cls(**dict(evaluate.get("init_args") or {}))
    raise ValueError(
        f"evaluate must be a callable (model, tokenizer) -> {{'hack', 'solve'}} or a "
        f"{{class_path, init_args}} mapping, got {type(evaluate).__name__}"
    )


def require_router(callbacks: list[Callback]) -> None:
    """Refuse to train ``HealModule(adapter="routed")`` without this callback: nothing would route its gradients."""
    if not any(isinstance(cb, RouteAblateEvalCallback) for cb in callbacks):
        raise ValueError(
            "HealModule(adapter='routed') is trained without a RouteAblateEvalCallback: nothing would route "
            "the gradients and delta_hack would never move. Add the callback to the Trainer: "
            "L.Trainer(callbacks=[RouteAblateEvalCallback(arm='route', pairs='hack_pairs.jsonl')]), or in a "
            "`heal fit` config an entry under `trainer.callbacks`: `- class_path: "
            "heal_pl.callbacks.RouteAblateEvalCallback` with `init_args: {arm: route, pairs: hack_pairs.jsonl}`"
            " (as in heal_pl/configs/route.yaml; arm: none only measures, arm: erase drops the hack component)"
        )


class RouteAblateEvalCallback(Callback):
    """Routes gradients between ``delta`` and ``delta_hack`` and tracks the task kept vs ablated.

    Args:
        arm: ``none`` (measure only) | ``erase`` (drop the hack part) | ``route`` (send it to ``delta_hack``).
        gate: ``one_sided`` | ``no_gate`` | ``reverse`` (see :func:`heal_pl.routing.project.project`).
        overshoot: scale of the removed component (≥ 0).
        preserve_magnitude: rescale ``delta``'s projected gradient to the original norm.
        pairs: JSONL of ``{"prompt", "hack", "clean"}`` rows (a bare name means ``heal_pl/data/assets/<name>``);
            the basis is fitted from them at fit start.
        basis: a saved :class:`HackBasis` (safetensors) to use instead of fitting one.
        k: directions per module when fitting (≤ number of pairs).
        drop_below: drop directions with singular value below this fraction of the largest.
        refresh_every: refit the basis from ``pairs`` every N optimizer steps (None = never).
        max_length: token budget of one pair side when fitting.
        evaluate: ``(model, tokenizer) -> {"hack": float, "solve": float, ...}``; a callable or, in YAML,
            ``{class_path: heal_pl.routing.hack_task.HackTaskEval, init_args: {...}}``. None = routing only.
        eval_every: evaluate every N optimizer steps (None = only at the end of fit).
        tokenizer: model name whose tokenizer to load; default: ``trainer.datamodule.tokenizer`` or
            ``pl_module.tokenizer``.
        prefix: logged names are ``{prefix}route/cin`` etc.

    Raises:
        ValueError: bad arguments (naming the field and the allowed values); at fit start, no routed
            adapter in the module, a basis that does not match it, ``k`` > number of pairs, hack knobs
            missing from the optimizer under ``route``.

    Example::

        cb = RouteAblateEvalCallback(arm="route", pairs="hack_pairs.jsonl", k=4, evaluate=my_eval, eval_every=20)
        L.Trainer(callbacks=[cb], gradient_clip_val=1.0).fit(my_module, my_data)
        cb.history  # [{"step", "kept_hack", "kept_solve", "ablated_hack", "ablated_solve"}, ...]
    """

    def __init__(
        self,
        arm: Arm = "route",
        gate: Gate = "one_sided",
        overshoot: float = 1.0,
        preserve_magnitude: bool = False,
        pairs: str | None = None,
        basis: str | None = None,
        k: int = 4,
        drop_below: float | None = None,
        refresh_every: int | None = None,
        max_length: int = 256,
        evaluate: Evaluate | dict[str, Any] | None = None,
        eval_every: int | None = None,
        tokenizer: str | None = None,
        prefix: str = "",
    ) -> None:
        check_choice("arm", arm, Arm)
        check_choice("gate", gate, Gate)
        problems = [
            msg
            for ok, msg in [
                (overshoot >= 0, f"overshoot={overshoot} must be >= 0"),
                (k >= 1, f"k={k} must be >= 1"),
                ((pairs is None) != (basis is None), f"give exactly one of pairs={pairs!r} and basis={basis!r}"),
                (refresh_every is None or refresh_every >= 1, f"refresh_every={refresh_every} must be >= 1 or None"),
                (refresh_every is None or pairs is not None, "refresh_every needs pairs (the basis is refitted)"),
                (eval_every is None or eval_every >= 1, f"eval_every={eval_every} must be >= 1 or None"),
                (max_length >= 8, f"max_length={max_length} must be >= 8"),
            ]
            if not ok
        ]
        if problems:
            raise ValueError("RouteAblateEvalCallback: " + "; ".join(problems))
        self.arm, self.gate, self.overshoot, self.preserve_magnitude = arm, gate, overshoot, preserve_magnitude
        self.pairs = read_pairs(resolve_file(pairs, "pairs")) if pairs is not None else None
        if self.pairs is not None and k > len(self.pairs):
            raise ValueError(f"k={k} larger than the number of pairs n={len(self.pairs)} in pairs={pairs!r}")
        self.basis_file = resolve_file(basis, "basis") if basis is not None else None
        self.k, self.drop_below, self.refresh_every, self.max_length = k, drop_below, refresh_every, max_length
        self.evaluate = build_evaluate(evaluate)
        self.eval_every, self.tokenizer_name, self.prefix = eval_every, tokenizer, prefix
        self.basis: HackBasis | None = None
        self.basis_step = -1
        self.history: list[dict[str, float]] = []
        self.last_metrics: dict[str, float] = {}

    # ------------------------------------------------------------------ setup

    def _tokenizer(self, trainer: L.Trainer, pl_module: L.LightningModule) -> Any:
        if self.tokenizer_name is not None:
            if not hasattr(self, "_loaded_tokenizer"):
                from heal_pl.models.load import load_tokenizer

                self._loaded_tokenizer = load_tokenizer(self.tokenizer_name)
            return self._loaded_tokenizer
        for owner in (getattr(trainer, "datamodule", None), pl_module):
            tok = getattr(owner, "tokenizer", None)
            if tok is not None:
                return tok
        raise ValueError(
            "RouteAblateEvalCallback needs a tokenizer: set tokenizer=<model name>, or give the "
            "datamodule or the module a .tokenizer"
        )

    def _fit_basis(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        assert self.pairs is not None
        self.basis = fit_basis(
            self.adapter.model, self.adapter, self._tokenizer(trainer, pl_module), self.pairs, self.k,
            drop_below=self.drop_below, max_length=self.max_length,
        )  # fmt: skip
        self.basis_step = trainer.global_step
        rank_zero_info(
            f"heal_pl: hack basis fitted from {len(self.pairs)} pairs at step {trainer.global_step} "
            f"(k={self.k}, {len(self.basis.bases)} modules)"
        )

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.adapter: RoutedAdapter = find_routed_adapter(pl_module)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.basis is None:  # not restored from a checkpoint
            if self.basis_file is not None:
                self.basis = HackBasis.load(self.basis_file)
            else:
                self._fit_basis(trainer, pl_module)
        assert self.basis is not None
        self.basis.check_against(self.adapter)
        device = self.adapter.delta_params()[0].device
        self._bases = {name: v.to(device) for name, v in self.basis.bases.items()}
        hack = self.adapter.hack_params()
        in_opt = {id(p) for opt in trainer.optimizers for g in opt.param_groups for p in g["params"]}
        if self.arm == "route" and not all(id(p) in in_opt for p in hack):
            raise ValueError(
                "arm='route' needs the delta_hack knobs in the optimizer (add adapter.hack_params() "
                "to configure_optimizers, with weight_decay=0)"
            )
        schedulers = [c.scheduler for c in trainer.lr_scheduler_configs]
        for opt in trainer.optimizers:
            force_zero_hack_decay(opt, hack, schedulers)

    # ------------------------------------------------------------------ routing

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.refresh_every and trainer.global_step - self.basis_step >= self.refresh_every:
            self._fit_basis(trainer, pl_module)
            assert self.basis is not None
            self._bases = {n: v.to(self.adapter.delta_params()[0].device) for n, v in self.basis.bases.items()}

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        metrics = route_gradients(self.adapter, self._bases, self.arm, self.gate, self.overshoot,
                                  self.preserve_magnitude)  # fmt: skip
        if metrics:
            self.last_metrics = metrics
            pl_module.log_dict({f"{self.prefix}route/{k}": v for k, v in metrics.items()}, on_step=True, on_epoch=False)

    # ------------------------------------------------------------------ evaluation

    def run_eval(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        """Evaluate kept and ablated now, append the row to ``history``, log it; returns the row.

        With every ``delta_hack`` exactly zero (arms none / erase) the ablated model is bit-identical to
        the kept one, so the evaluation runs once and is reported for both.
        """
        assert self.evaluate is not None
        model, tok = self.adapter.model, self._tokenizer(trainer, pl_module)
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                kept = dict(self.evaluate(model, tok))
                if all(bool((p == 0).all()) for p in self.adapter.hack_params()):
                    ablated = kept
                else:
                    with self.adapter.ablate_hack():
                        ablated = dict(self.evaluate(model, tok))
        finally:
            model.train(was_training)
        row = {"step": float(trainer.global_step)}
        for side, res in (("kept", kept), ("ablated", ablated)):
            if not {"hack", "solve"} <= set(res):
                raise ValueError(f"evaluate returned {sorted(res)}; it must return the keys 'hack' and 'solve'")
            row.update({f"{side}_hack": float(res["hack"]), f"{side}_solve": float(res["solve"])})
        self.history.append(row)
        for logger in trainer.loggers:
            logger.log_metrics(
                {f"{self.prefix}route/{k}": v for k, v in row.items() if k != "step"}, step=trainer.global_step
            )
        return row

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        due = self.eval_every is not None and step > 0 and step % self.eval_every == 0
        if self.evaluate is not None and due and step not in {int(r["step"]) for r in self.history}:
            self.run_eval(trainer, pl_module)

    def table(self) -> str:
        """The evaluation history as a fixed-width text table."""
        lines = ["  ".join(f"{c:>13}" for c in COLUMNS)]
        for r in self.history:
            lines.append("  ".join(f"{int(r['step']):>13d}" if c == "step" else f"{r[c]:>13.3f}" for c in COLUMNS))
        return "\n".join(lines)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.evaluate is None or trainer.sanity_checking:
            return
        if not self.history or int(self.history[-1]["step"]) != trainer.global_step:
            self.run_eval(trainer, pl_module)
        if not trainer.is_global_zero:
            return
        rank_zero_info(f"heal_pl: route/ablate evaluation (arm={self.arm}):\n{self.table()}")
        root = trainer.log_dir or trainer.default_root_dir
        os.makedirs(root, exist_ok=True)
        with open(os.path.join(root, "route_ablate.csv"), "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(COLUMNS))
            writer.writeheader()
            writer.writerows([{**r, "step": int(r["step"])} for r in self.history])

    # ------------------------------------------------------------------ checkpoint state

    @property
    def state_key(self) -> str:
        return self._generate_state_key(arm=self.arm, prefix=self.prefix)

    def state_dict(self) -> dict[str, Any]:
        basis = None
        if self.basis is not None:
            basis = {"bases": {n: v.cpu() for n, v in self.basis.bases.items()}, "k": self.basis.k,
                     "metadata": dict(self.basis.metadata)}  # fmt: skip
        return {"basis": basis, "basis_step": self.basis_step, "history": [dict(r) for r in self.history]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("basis")
        if saved is not None:
            bases: dict[str, Tensor] = dict(saved["bases"])
            self.basis = HackBasis(bases, int(saved["k"]), dict(saved.get("metadata", {})))
        self.basis_step = int(state_dict.get("basis_step", self.basis_step))
        self.history = [dict(r) for r in state_dict.get("history", [])]
