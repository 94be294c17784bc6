"""The KL barrier inside transformers' ``Trainer`` (and TRL's ``SFTTrainer``, :mod:`heal_pl.integrations.trl`).

:class:`KLBarrierMixin` overrides one method, ``compute_loss``, with :class:`heal_pl.module.HealModule`'s objective
on the Trainer's batch (docs/maths.md §1):

    loss = mean_t NLL_t  +  lam_eff · relu(agg_t KL_t(student ‖ base) − tau)

- the student is the Trainer's peft model; the base is the same model with the adapter off (no copy);
- ``t`` runs over the counted positions of the collator's ``labels`` (``-100`` = not trained on), so the barrier
  reads exactly the tokens the Trainer trains on;
- the student's backbone runs once, through the (possibly DDP-wrapped) model the Trainer hands in, with the LM head
  asked for one position only (``logits_to_keep=1``); heal_pl's fused head then gives the NLL and the KL of every
  counted row together (``token_stats``, the lazy KL gradient of ``heal_pl.barrier.lazy_head``);
- under DDP the SFT mean and the aggregate pool every rank's tokens (``pooled_objective``), as in HealModule.

The loss is a per-micro-batch mean, as in HealModule: the Trainer divides it by the gradient-accumulation steps
(``model_accepts_loss_kwargs = False``), and ``num_items_in_batch`` is not used.
"""

from __future__ import annotations

import contextlib
import inspect
from collections import defaultdict
from collections.abc import Iterator
from typing import Any, Literal

import torch
from torch import Tensor, nn
from transformers import Trainer

from heal_pl.adapters.switch import adapter_off, base_dropout_off, base_head, find_peft_model
from heal_pl.barrier.fused_head import check_chunk_size, chunk_rows
from heal_pl.barrier.kl import KLBarrier, barrier_metrics, counted_positions, gather_rows, token_stats
from heal_pl.barrier.lazy_head import KLGradPlan
from heal_pl.barrier.metrics import TokenKLStats
from heal_pl.barrier.objective import pooled_objective
from heal_pl.models.lm import LMHead, base_lm, check_head, eval_mode

MODEL_INPUTS = ("input_ids", "attention_mask")  # what the student and the ref forwards are given
LOGGED = ("sft", "barrier", "barrier_fired", "D", "kl_mean", "kl_rmse", "kl_p95", "kl_max")


@contextlib.contextmanager
def decoder_output(lm: nn.Module) -> Iterator[list[Tensor]]:
    """Inside the block, every forward of ``lm``'s decoder appends its last hidden states ``[B, T, H]``."""
    seen: list[Tensor] = []

    def keep(module: nn.Module, args: tuple, output: Any) -> None:
        seen.append(output[0] if isinstance(output, tuple) else output.last_hidden_state)

    handle = lm.get_decoder().register_forward_hook(keep)
    try:
        yield seen
    finally:
        handle.remove()


def check_completion_mask(collator: Any, examples: list[dict[str, Any]], where: str) -> None:
    """Raise unless the collator's ``labels`` leave some real token out (``-100`` where ``attention_mask`` is 1) in
    ``examples``: labels on every token mean no completion mask, and the barrier would count the prompts."""
    batch = collator(examples)
    labels = batch.get("labels")
    if labels is None:
        raise ValueError(f"{where}: the collator ({type(collator).__name__}) gives no 'labels'; the barrier needs "
                         "labels with -100 on every token that is not trained on")  # fmt: skip
    real = batch.get("attention_mask", torch.ones_like(labels)).bool()
    if not (real & (labels == -100)).any():
        raise ValueError(
            f"{where}: the collator ({type(collator).__name__}) gives no completion mask: its labels count every "
            f"token of the first {len(examples)} examples, prompts included. Give prompt-completion data "
            "(SFTConfig completion_only_loss=True, the default for it) or conversational data with "
            "assistant_only_loss=True, or labels with -100 on the prompt"
        )


class KLBarrierMixin:
    """Put before a ``transformers.Trainer`` subclass: ``class MyTrainer(KLBarrierMixin, Trainer)``.

    Args (keyword-only, the rest go to the Trainer):
        barrier: the barrier (reg, agg, tau, lam, lam_round_pow); a dict is read as its fields.
        round: the steer → heal round, which scales ``lam`` by ``(1 + round)^lam_round_pow``.
        chunk_size: rows of ``[chunk, vocab]`` log-probabilities alive at once; ``auto`` from the vocabulary and the
            free memory (:func:`heal_pl.barrier.fused_head.auto_chunk_size`).

    Logged through the Trainer's own logging (``report_to``), averaged over the steps of each logging interval:
    ``sft``, ``barrier``, ``barrier_fired``, ``D``, ``kl_mean``, ``kl_rmse``, ``kl_p95``, ``kl_max``; an evaluation
    adds ``eval_kl_mean`` … ``eval_kl_max`` of every counted token of the evaluation set pooled (not averaged).

    Raises:
        ValueError: at construction, when the model holds no (or several) peft adapters, heal_pl's head cannot
            reproduce the model's logits, the collator gives no completion mask, or a Trainer option would change
            the loss the barrier is added to (:meth:`refused_options`).
    """

    model: nn.Module
    args: Any

    def __init__(
        self,
        *args: Any,
        barrier: KLBarrier | dict[str, Any] = KLBarrier(),  # noqa: B008 (frozen dataclass)
        round: int = 0,
        chunk_size: int | Literal["auto"] = "auto",
        **kwargs: Any,
    ) -> None:
        name = type(self).__name__
        self.barrier = KLBarrier(**barrier) if isinstance(barrier, dict) else barrier
        if round < 0:
            raise ValueError(f"{name}: round={round} must be >= 0")
        check_chunk_size(chunk_size, f"{name}: ")
        self.round, self.chunk_size = round, chunk_size
        super().__init__(*args, **kwargs)  # the Trainer's own checks and data preparation
        refused = self.refused_options()
        if refused:
            raise ValueError(f"{name}: " + "; ".join(refused))
        self.peft = find_peft_model(self.model)
        check_head(self.peft, name)
        self.head = LMHead(base_lm(self.peft))
        self.kl_grad_plan = KLGradPlan()
        self.model_accepts_loss_kwargs = False  # a per-micro-batch mean: the Trainer divides by the accumulation steps
        self.loss_is_scaled_for_ga = False
        self._logged: dict[str, list[float]] = defaultdict(list)
        self._eval_kl = TokenKLStats()
        train = getattr(self, "train_dataset", None)
        if train is not None and hasattr(train, "__getitem__") and len(train):
            check_completion_mask(self.data_collator, [train[i] for i in range(min(8, len(train)))], name)

    def refusals(self) -> list[tuple[str, bool, str]]:
        """``(option, set, what to do instead)`` for each Trainer option that replaces or reshapes the loss;
        a subclass adds its trainer's own (:class:`heal_pl.integrations.trl.HealSFTTrainer`)."""
        a = self.args
        return [
            (f"label_smoothing_factor={a.label_smoothing_factor}", a.label_smoothing_factor != 0,
             "the SFT term is the plain NLL; set it to 0"),
            ("compute_loss_func", getattr(self, "compute_loss_func", None) is not None, "the barrier owns the loss"),
            ("DeepSpeed", getattr(a, "deepspeed", None) is not None, "use DDP (torchrun) or heal fit with FSDP"),
            ("FSDP", bool(getattr(a, "fsdp", None)), "use DDP (torchrun) or heal fit with FSDP"),
        ]  # fmt: skip

    def refused_options(self) -> list[str]:
        """The options of :meth:`refusals` that are set, each named with what to do instead."""
        return [f"{what} cannot be combined with the KL barrier ({fix})" for what, on, fix in self.refusals() if on]

    # ------------------------------------------------------------------ the loss

    def compute_loss(
        self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Tensor | tuple[Tensor, Any]:
        """SFT + barrier on one micro-batch (the module docstring); ``num_items_in_batch`` is not used."""
        training = model.training and torch.is_grad_enabled()
        step = self.state.global_step
        where = f"train step {step}" if training else f"evaluation at step {step}"
        missing = [k for k in ("input_ids", "labels") if k not in inputs]
        if missing:
            raise ValueError(f"{where}: the batch has no {missing} (keys: {sorted(inputs)})")
        if "position_ids" in inputs and "attention_mask" not in inputs:
            raise ValueError(f"{where}: padding-free batches (position_ids, no attention_mask) are not supported by "
                             "the KL barrier; set padding_free=False and packing=False")  # fmt: skip
        if training:
            base_dropout_off(self.peft)  # as in HealModule: only the adapter's own dropout trains
        labels, mask = inputs["labels"], inputs.get("attention_mask")
        counted = counted_positions(labels, mask)
        feed = {k: inputs[k] for k in MODEL_INPUTS if k in inputs}
        hidden = self._decoder_rows(model, feed, where)  # through the Trainer's wrappers: DDP sync, autocast
        ref = None
        if self.barrier.active:  # the same call, adapter off: the same autocast and kernels as the student
            with torch.no_grad(), adapter_off(self.peft), eval_mode(self.peft):
                ref = gather_rows(self._decoder_rows(model, feed, where), counted)
        weight = self.head.proj.weight
        stats = token_stats(
            gather_rows(hidden, counted), ref, counted.targets, head=self.head,
            ref_head=base_head(self.peft, self.head), reg=self.barrier.reg,
            chunk_size=chunk_rows(self.chunk_size, weight.shape[0], weight.device),
            plan=self.kl_grad_plan if training else None,
        )  # fmt: skip
        sft, barrier, pooled = pooled_objective(stats, self.barrier, self.round, where, hidden)
        loss = sft + barrier.value
        if training:
            self.kl_grad_plan.note(barrier.fired)
            scalars = {"sft": sft, **barrier_metrics(pooled, barrier)}
            values = torch.stack([torch.as_tensor(scalars[k], dtype=torch.float32, device=sft.device).detach()
                                  for k in LOGGED]).tolist()  # one host sync  # fmt: skip
            for k, v in zip(LOGGED, values, strict=True):
                self._logged[k].append(v)
        else:
            self._eval_kl.update(stats.kl)
        if return_outputs:
            with torch.no_grad():
                return loss, model(**feed, use_cache=False)
        return loss

    def _decoder_rows(self, model: nn.Module, feed: dict[str, Tensor], where: str) -> Tensor:
        """The decoder's last hidden states ``[B, T, H]`` in one call of ``model`` as the Trainer wraps it (DDP,
        the mixed-precision autocast ``accelerate`` puts around the forward), its LM head kept to one position."""
        with decoder_output(base_lm(self.peft)) as seen:
            model(**feed, use_cache=False, **self._one_logit())
        if len(seen) != 1:
            raise ValueError(f"{where}: the model ran its decoder {len(seen)} times in one forward")
        return seen[0]

    def _one_logit(self) -> dict[str, int]:
        """``logits_to_keep=1`` where the model's forward takes it: the Trainer's forward computes no full logits."""
        forward = inspect.signature(type(base_lm(self.peft)).forward).parameters
        return {"logits_to_keep": 1} if "logits_to_keep" in forward else {}

    # ------------------------------------------------------------------ logging

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """The Trainer's ``log``, with the barrier's scalars of the interval (training) or the evaluation's pooled
        per-token KL statistics (``eval_kl_*``) added."""
        if any(k.startswith("eval_") for k in logs):
            if self._eval_kl.update_count:
                logs.update({f"eval_{k}": float(v) for k, v in self._eval_kl.compute().items()})
            self._eval_kl.reset()
        elif "loss" in logs:
            logs.update({k: sum(v) / len(v) for k, v in self._logged.items() if v})
            self._logged.clear()
        super().log(logs, *args, **kwargs)  # type: ignore[misc]


class HealTrainer(KLBarrierMixin, Trainer):
    """``transformers.Trainer`` with the KL barrier (:class:`KLBarrierMixin`) on a peft model.

    Example::

        trainer = HealTrainer(model=peft_model, args=TrainingArguments("out", max_steps=100),
                              train_dataset=rows, data_collator=collator, barrier=KLBarrier(agg="p95", tau=2.0))
        trainer.train()
    """
