"""``KLBarrierCallback``: add the KL barrier to the loss of a LightningModule that knows nothing of heal_pl.

The module must hold one peft-wrapped Hugging Face causal LM and feed it batches (mappings) with
``input_ids``, ``labels`` (-100 on non-completion tokens, Hugging Face convention) and optionally
``attention_mask``. The callback

1. hooks the causal LM's forward, and the peft tuner's around it, to keep the logits of the module's own forward
   pass (peft < 0.21 calls the LM's ``.forward`` directly, past its hooks; a call seen by both is kept once; no second
   student forward: the barrier reuses them, with their graph). Which forward is the student is decided by
   :func:`heal_pl.callbacks.student_forward.pick_student` (the grad-enabled forward on the batch whose logits
   the returned loss depends on; a no-grad metric pass never counts; an error when it cannot tell);
2. wraps the module's ``training_step`` so that the loss it returns becomes
   ``loss + lam_eff · relu(agg_t KL_t(student ‖ base) − tau)``; the base is the same model with the
   adapter switched off, run once without gradient and in eval mode (no dropout) on **the same call** —
   every argument of the student forward is replayed (``position_ids`` of packed sequences included), and
   the base's rows go through the model's own head (:class:`heal_pl.models.lm.LMHead`, checked against the
   model's logits at ``setup``; a head adapter is switched off for the ref). Lightning then scales,
   accumulates and clips the sum as usual;
3. wraps ``validation_step`` to log the exact pooled KL statistics of the validation epoch, and the
   ``{prefix}val/kl_hist`` / ``{prefix}val/kl_top`` TensorBoard panels (``heal_pl.barrier.panels``).

The value on a batch equals ``HealModule``'s barrier on that batch (same ``heal_pl.barrier.kl`` code). The callback
leaves the student's own mode alone: if the foreign model has dropout and trains in train mode, the student's
logits carry it (the ref never does), so the KL of a zero adapter is then the dropout's.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor
from torch.utils.hooks import RemovableHandle

from heal_pl.adapters.switch import base_head, find_peft_model
from heal_pl.barrier.distributed import gather_tokens
from heal_pl.barrier.fused_head import check_chunk_size, chunk_rows
from heal_pl.barrier.kl import (
    BarrierOutput,
    KLBarrier,
    TokenStats,
    accumulation_note,
    barrier_metrics,
    check_finite,
    counted_positions,
    gather_rows,
    token_stats,
)
from heal_pl.barrier.lazy_head import CHECKPOINTED, KLGradPlan
from heal_pl.barrier.metrics import TokenKLStats
from heal_pl.barrier.panels import DriftPanels
from heal_pl.barrier.ref_cache import RefRowCache, example_keys, ref_fingerprint
from heal_pl.callbacks.state import load_legacy_state
from heal_pl.callbacks.student_forward import Forward, head_input, logits_of, pick_student
from heal_pl.models.lm import LMHead, base_lm, check_head

log = logging.getLogger("heal_pl")


class KLBarrierCallback(Callback):
    """Adds ``lam_eff · relu(agg KL − tau)`` to a foreign module's training loss.

    Args:
        barrier: the barrier (reg, agg, tau, lam, lam_round_pow); ``reg='nll'`` only logs nothing.
        round: steer → heal round, scaling ``lam`` by ``(1 + round)^lam_round_pow``.
        chunk_size: rows of ``[chunk, vocab]`` log-probabilities alive at once; ``auto``: from the vocabulary and the
            free memory (:func:`heal_pl.barrier.fused_head.auto_chunk_size`).
        prefix: logged names are ``{prefix}train/barrier``, ``{prefix}val/kl_p95``, ...
        ref_cache: keep the base's hidden rows of every example seen (:mod:`heal_pl.barrier.ref_cache`, exact; keyed by
            the example's tokens, labels and every other per-row argument of the replayed call), so later epochs
            skip the base's forward; emptied with a log line when the base's weights change.

    Raises:
        ValueError: at ``setup`` when the module holds no (or several) peft models, or when heal_pl's head path
            cannot reproduce the model's logits (:func:`heal_pl.models.lm.check_head`); at a step when the batch lacks
            ``input_ids``/``labels`` or the student forward cannot be told (see ``student_forward``).

    Example::

        trainer = L.Trainer(callbacks=[KLBarrierCallback(KLBarrier(agg="rmse", tau=1.0))])
        trainer.fit(my_module, my_data)   # my_module.training_step returns its own SFT loss
    """

    def __init__(
        self,
        barrier: KLBarrier = KLBarrier(),  # noqa: B008 (frozen dataclass)
        round: int = 0,
        chunk_size: int | Literal["auto"] = "auto",
        prefix: str = "",
        ref_cache: bool = False,
    ) -> None:
        if isinstance(barrier, dict):
            barrier = KLBarrier(**barrier)
        if round < 0:
            raise ValueError(f"round={round} must be >= 0")
        check_chunk_size(chunk_size, "")
        self.barrier, self.round, self.chunk_size, self.prefix = barrier, round, chunk_size, prefix
        self.val_kl = TokenKLStats()
        self.drift = DriftPanels()  # {prefix}val/kl_hist and {prefix}val/kl_top (heal_pl.barrier.panels)
        self.ref_cache = RefRowCache() if ref_cache else None
        self.kl_grad_plan = KLGradPlan()  # the KL's graph only on steps where the hinge opens (barrier.lazy_head)
        self._captured: list[Forward] = []
        self._capturing = False
        self._hooks: list[RemovableHandle] = []
        self._wrapped: list[str] = []

    # ------------------------------------------------------------------ wiring

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        note = accumulation_note(getattr(trainer, "accumulate_grad_batches", 1), self.barrier.agg)
        if stage == "fit" and note is not None and self.barrier.active and trainer.global_rank == 0:
            log.info(note)
        self._module = pl_module
        self.peft = find_peft_model(pl_module)
        lm = base_lm(self.peft)
        check_head(self.peft, "KLBarrierCallback")
        self.head = LMHead(lm)
        tuner = self.peft.base_model  # peft's LoraModel: calls lm.forward() directly before peft 0.21
        self._hooks = [m.register_forward_hook(self._capture, with_kwargs=True) for m in (lm, tuner) if m is not None]
        for name, wrap in (("training_step", self._wrap_train), ("validation_step", self._wrap_val)):
            original = getattr(pl_module, name)
            setattr(pl_module, name, wrap(original))
            self._wrapped.append(name)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        for name in self._wrapped:
            pl_module.__dict__.pop(name, None)  # back to the class's method
        self._wrapped = []

    def _capture(self, module: Any, args: tuple, kwargs: dict, output: Any) -> None:
        if self._capturing:
            logits = logits_of(output)
            seen = self._captured and self._captured[-1].logits is logits  # the tuner passing the LM's output on
            if logits is not None and not seen:
                self._captured.append(Forward(args, kwargs, logits))

    def _run_captured(self, step: Callable[..., Any], args: tuple, kwargs: dict) -> tuple[Any, list[Forward]]:
        self._captured, self._capturing = [], True
        try:
            out = step(*args, **kwargs)
        finally:
            self._capturing = False
        captured, self._captured = self._captured, []
        return out, captured

    # ------------------------------------------------------------------ the barrier on one batch

    def compute(
        self, batch: Mapping[str, Tensor], logits: Tensor, where: str = "batch", call: Forward | None = None
    ) -> tuple[Tensor, dict]:
        """Barrier value and logged scalars, from the student's ``[B, T, V]`` logits on ``batch``.

        ``call`` is the student forward whose arguments the ref replays; ``None`` replays ``input_ids`` and
        ``attention_mask`` of ``batch``. Under DDP the aggregate pools every rank's tokens
        (``heal_pl.barrier.distributed.gather_tokens``); ``scalars["_kl"]`` is this rank's per-token KL.
        """
        mask = batch.get("attention_mask")
        counted = counted_positions(batch["labels"], mask)
        ref = None
        if self.barrier.active:
            args, kwargs = (call.args, call.kwargs) if call is not None else ((), {
                "input_ids": batch["input_ids"], "attention_mask": mask})  # fmt: skip


            def ref_rows() -> Tensor:
                hidden = head_input(self.peft, args, kwargs)
                if tuple(hidden.shape[:2]) != tuple(batch["labels"].shape):
                    raise ValueError(f"{where}: the replayed forward's LM-head input is {tuple(hidden.shape)}, not "
                                     f"[B, T, H] for labels {tuple(batch['labels'].shape)} (logits_to_keep?)")
                return gather_rows(hidden, counted)

            if self.ref_cache is None:
                ref = ref_rows()
            else:
                rows = batch["labels"].shape[0]
                extra = [v for v in (*args, *kwargs.values()) if isinstance(v, Tensor) and v.dim() and len(v) == rows]
                ref = self.ref_cache.rows(example_keys(batch["input_ids"], mask, batch["labels"], extra), counted,
                                          ref_rows)  # fmt: skip
        ref_head = base_head(self.peft, self.head)
        rows = gather_rows(logits, counted)
        chunk = chunk_rows(self.chunk_size, logits.shape[-1], logits.device)

        def barrier() -> tuple[TokenStats, TokenStats, BarrierOutput]:
            stats = token_stats(rows, ref, counted.targets, head=None, ref_head=ref_head, reg=self.barrier.reg,
                                chunk_size=chunk)  # fmt: skip
            check_finite(stats, where)
            pooled = TokenStats(gather_tokens(stats.kl), gather_tokens(stats.nll))  # the global batch under DDP
            return stats, pooled, self.barrier(pooled.kl, self.round)

        training = ref is not None and torch.is_grad_enabled() and rows.requires_grad
        if training and not self.kl_grad_plan.eager(CHECKPOINTED):  # the KL's values first, its graph if it opens
            with torch.no_grad():
                stats, pooled, out = barrier()
            if bool(out.fired):  # D is pooled over the ranks: every rank takes the same branch
                stats, pooled, out = barrier()
        else:
            stats, pooled, out = barrier()
        if training:
            self.kl_grad_plan.note(out.fired)
        return out.value, {**barrier_metrics(pooled, out), "_kl": stats.kl.detach()}

    def _student(self, batch: Any, captured: list[Forward], where: str, loss: Tensor | None = None) -> Forward:
        if not isinstance(batch, Mapping) or "input_ids" not in batch or "labels" not in batch:
            got = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
            raise ValueError(
                f"KLBarrierCallback needs batches with 'input_ids' and 'labels' (-100 on non-completion tokens); "
                f"got {got}"
            )
        return pick_student(captured, tuple(batch["labels"].shape), loss, where)

    def _wrap_train(self, step: Callable[..., Any]) -> Callable[..., Any]:
        def training_step(*args: Any, **kwargs: Any) -> Any:
            out, captured = self._run_captured(step, args, kwargs)
            if not self.barrier.active:
                return out
            module = self._module
            where = f"train step {module.global_step}"
            batch = args[0] if args else kwargs["batch"]
            loss = out if isinstance(out, Tensor) else out.get("loss") if isinstance(out, Mapping) else None
            if not isinstance(loss, Tensor):
                raise ValueError(
                    f"{where}: KLBarrierCallback needs training_step to return the loss (a tensor or a dict with "
                    f"'loss'), got {type(out).__name__}; manual optimisation is not supported"
                )
            student = self._student(batch, captured, where, loss)
            value, scalars = self.compute(batch, student.logits, where, student)
            scalars.pop("_kl")
            bs = batch["input_ids"].shape[0]
            module.log_dict({f"{self.prefix}train/{k}": v for k, v in scalars.items()}, batch_size=bs)
            return out + value if isinstance(out, Tensor) else {**out, "loss": loss + value}

        return training_step

    def _wrap_val(self, step: Callable[..., Any]) -> Callable[..., Any]:
        def validation_step(*args: Any, **kwargs: Any) -> Any:
            out, captured = self._run_captured(step, args, kwargs)
            if self.barrier.active:
                batch = args[0] if args else kwargs["batch"]
                where = f"validation at step {self._module.global_step}"
                student = self._student(batch, captured, where)
                _, scalars = self.compute(batch, student.logits, where, student)
                kl = scalars.pop("_kl")
                self.val_kl.update(kl)
                self.drift.update(kl, batch)
            return out

        return validation_step

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.ref_cache is not None:  # the base = the peft model's frozen weights
            base = [p for p in self.peft.parameters() if not p.requires_grad]
            self.ref_cache.check(ref_fingerprint(("base", id(self.peft)), base))

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.barrier.active and not trainer.sanity_checking:
            stats = self.val_kl.compute()
            pl_module.log_dict({f"{self.prefix}val/{k}": v for k, v in stats.items()}, sync_dist=True)
            self.drift.log(trainer, self.peft, prefix=self.prefix)
        self.val_kl.reset()
        self.drift.reset()

    # ------------------------------------------------------------------ checkpoint state

    @property
    def state_key(self) -> str:
        """Distinct per ``prefix`` and barrier kind, so two barriers in one Trainer keep their own state."""
        return self._generate_state_key(prefix=self.prefix, reg=self.barrier.reg, agg=self.barrier.agg)

    def state_dict(self) -> dict[str, Any]:
        return {"round": self.round, "kl_grad_plan": self.kl_grad_plan.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.round = state_dict.get("round", self.round)
        self.kl_grad_plan.load_state_dict(state_dict.get("kl_grad_plan", {}))

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        load_legacy_state(self, checkpoint)  # a checkpoint from before the state_key: under the class name
