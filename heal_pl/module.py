"""``HealModule``: a LoRA student trained with SFT plus the KL barrier (docs/maths.md §1).

    loss = mean_t NLL_t  +  lam · (1 + round)^lam_round_pow · relu(agg_t KL_t(student ‖ ref) − tau)
           [+ spectral_lam · mean_layers σ_max(ΔW)]

The student is base + a peft LoRA adapter; the ref is the same weights with the adapter switched off.
Log-softmax is taken only at completion positions, in checkpointed chunks (``heal_pl.barrier.kl.token_stats``).
Checkpoints carry only the adapter; the final adapter is also saved in peft's own format.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from contextvars import ContextVar
from dataclasses import asdict
from typing import Any, Literal, get_args

import lightning as L
import torch
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from transformers import PreTrainedModel

from heal_pl.adapters.card import final_validation, write_card
from heal_pl.adapters.lora import LoRASpec, save_lora, spectral_norms, wrap_lora
from heal_pl.adapters.routed import RoutedSpec, hack_decay_groups, wrap_routed
from heal_pl.adapters.switch import base_dropout_off
from heal_pl.barrier.fused_head import chunk_rows
from heal_pl.barrier.kl import (
    KLBarrier,
    accumulation_note,
    barrier_metrics,
    counted_positions,
    gather_rows,
    token_stats,
)
from heal_pl.barrier.lazy_head import KLGradPlan
from heal_pl.barrier.metrics import TokenKLStats
from heal_pl.barrier.objective import pooled_objective
from heal_pl.barrier.panels import DriftPanels, logged_step
from heal_pl.barrier.ref_cache import RefRowCache
from heal_pl.barrier.ref_source import RefSource
from heal_pl.checks import choice_problem
from heal_pl.hardware import auto_dtype
from heal_pl.models.checkpointing import checkpoint_blocks, enable_checkpointing
from heal_pl.models.fsdp import adapter_tensors, check_block_units, gathered_root, is_sharded
from heal_pl.models.lm import LMHead, base_lm, check_head, last_hidden
from heal_pl.models.load import load_model
from heal_pl.models.rank_zero import LoadOn, is_launch_rank_zero, prepare_strategy
from heal_pl.resume import AdapterCheckpoint

log = logging.getLogger("heal_pl")
PLAN_KEY = "heal_pl_kl_grad_plan"  # the next step's head path, in a checkpoint (heal_pl.barrier.lazy_head)
_AROUND: ContextVar[PreTrainedModel | None] = ContextVar("heal_pl_around", default=None)  # HealModule.around


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """LR multiplier: linear warm-up over ``warmup_steps``, then cosine from 1 to ``min_lr_ratio``."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class HealModule(RefSource, AdapterCheckpoint, L.LightningModule):
    """SFT + KL barrier on a peft LoRA student of a Hugging Face causal LM.

    Args:
        model: a model alias (``smollm2-135m-instruct`` — the embedded default —, ``tiny-llama``,
            ``tiny-qwen2``), a local folder, or a Hugging Face id.
        dtype: dtype the frozen base weights are loaded in; ``auto`` = ``bfloat16`` when torch sees a CUDA device,
            else ``float32`` (:func:`heal_pl.hardware.auto_dtype`). The adapter's weights, their gradients and the
            optimizer state are float32 whatever it is; ``trainer.precision`` sets the autocast of the forward.
        lora: the adapter (rank, alpha, dropout, target modules, depth range).
        barrier: the KL barrier (reg, agg, tau, lam, lam_round_pow).
        ref: what the barrier leashes to; ``base`` = the model with the adapter off.
        round: the steer → heal round, which scales ``lam`` by ``(1 + round)^lam_round_pow``.
        spectral_lam: weight of the mean spectral norm of the adapter updates (0 = off).
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        warmup_steps: linear warm-up steps before the cosine decay.
        min_lr_ratio: final LR as a fraction of ``lr``.
        chunk_size: rows of ``[chunk, vocab]`` log-probabilities alive at once in the loss; ``auto`` sizes the chunk
            from the vocabulary and the free memory (:func:`heal_pl.barrier.fused_head.auto_chunk_size`: 256 rows at
            SmolLM2's vocabulary on a CPU, an eighth of the free memory up to 4 GiB on a GPU).
        adapter_dir: where the final peft adapter is saved (default ``<log_dir>/adapter``).
        adapter: ``lora`` (peft) or ``routed`` (``delta`` / ``delta_hack``, docs/maths.md §2; the routing itself is
            done by :class:`heal_pl.callbacks.RouteAblateEvalCallback`, which ``fit`` requires in the Trainer).
        routed: the routed adapter's spec (used when ``adapter="routed"``); saved as
            ``<adapter_dir>/routed.safetensors`` at train end.
        ref_cache: keep the ref's hidden rows of every example seen (:mod:`heal_pl.barrier.ref_cache`, exact), so later
            epochs skip the ref's forward; emptied with a log line whenever the ref changes.
        ref_cache_memory_mb: rows kept in memory; beyond, in a memory-mapped file under ``<log_dir>/ref_cache``.
        gradient_checkpointing: recompute each decoder block in backward instead of keeping its activations
            (:mod:`heal_pl.models.checkpointing`): activation memory of one block instead of all, for about one more
            forward of the student; the loss and the gradients are those of a run without it.
        quantize: the frozen base's block weights in 4 bits (``nf4``, ``fp4``) or 8 (``int8``) through bitsandbytes
            (QLoRA; :mod:`heal_pl.models.quantize`, ``pip install 'heal_pl[quant]'``); the head stays in ``dtype``
            and the ref is the same quantized base with the adapter off. ``adapter="routed"`` needs ``none``.
        load_on: ``rank_zero``: only global rank 0 reads the base's weights; the other ranks build it empty and
            ``FSDPStrategy`` (required on several processes) broadcasts rank 0's weights into them as it shards
            (:mod:`heal_pl.models.rank_zero`; a 70B base is then read once per node, not once per GPU).

    Raises:
        ValueError: at ``fit`` start (``setup("fit")``, before any step), ``adapter="routed"`` in a Trainer without a
            ``RouteAblateEvalCallback``.

    Example:
        >>> from heal_pl.data.datamodule import HealDataModule
        >>> module = HealModule(model="tiny-llama", barrier=KLBarrier(agg="rmse", tau=1.0))
        >>> trainer = L.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        ...                     enable_model_summary=False)
        >>> trainer.fit(module, HealDataModule(model="tiny-llama", batch_size=2, max_examples=8))
        >>> trainer.global_step, sorted(os.listdir("adapter"))  # the final adapter, in peft's format
        (2, ['adapter_config.json', 'adapter_model.safetensors', 'heal_pl.json'])
    """

    def __init__(
        self,
        model: str = "smollm2-135m-instruct",
        dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto",
        lora: LoRASpec = LoRASpec(),  # noqa: B008 (frozen dataclass)
        barrier: KLBarrier = KLBarrier(),  # noqa: B008 (frozen dataclass)
        ref: Literal["base"] = "base",
        round: int = 0,
        spectral_lam: float = 0.0,
        lr: float = 2e-4,
        weight_decay: float = 0.0,
        warmup_steps: int = 10,
        min_lr_ratio: float = 0.1,
        chunk_size: int | Literal["auto"] = "auto",
        adapter_dir: str | None = None,
        adapter: Literal["lora", "routed"] = "lora",
        routed: RoutedSpec = RoutedSpec(),  # noqa: B008 (frozen dataclass)
        ref_cache: bool = False,
        ref_cache_memory_mb: int = 2048,
        gradient_checkpointing: bool = False,
        quantize: Literal["none", "nf4", "fp4", "int8"] = "none",
        load_on: LoadOn = "every_rank",
    ) -> None:
        super().__init__()
        lora = LoRASpec(**lora) if isinstance(lora, dict) else lora
        barrier = KLBarrier(**barrier) if isinstance(barrier, dict) else barrier
        routed = RoutedSpec(**routed) if isinstance(routed, dict) else routed
        problems = [
            f"{name}={value} must be {rule}"
            for name, value, ok, rule in [
                ("round", round, round >= 0, ">= 0"),
                ("spectral_lam", spectral_lam, spectral_lam >= 0, ">= 0"),
                ("lr", lr, lr > 0, "> 0"),
                ("weight_decay", weight_decay, weight_decay >= 0, ">= 0"),
                ("warmup_steps", warmup_steps, warmup_steps >= 0, ">= 0"),
                ("min_lr_ratio", min_lr_ratio, 0 <= min_lr_ratio <= 1, "in [0, 1]"),
                ("chunk_size", chunk_size, chunk_size == "auto" or (isinstance(chunk_size, int) and chunk_size >= 1),
                 ">= 1 or 'auto'"),
                ("ref_cache_memory_mb", ref_cache_memory_mb, ref_cache_memory_mb >= 0, ">= 0"),
            ]
            if not ok
        ]
        problems += [p for p in (choice_problem("ref", ref, ("base",)),
                                 choice_problem("adapter", adapter, ("lora", "routed")),
                                 choice_problem("load_on", load_on, get_args(LoadOn))) if p]  # fmt: skip
        if adapter == "routed":  # its fixed A is fitted on the whole, unquantized base weight
            problems += [f"{field} needs adapter='lora' ({why})" for field, on, why in (
                (f"quantize={quantize!r}", quantize != "none", "use quantize: none"),
                (f"load_on={load_on!r}", load_on != "every_rank", "use load_on: every_rank"),
                (f"spectral_lam={spectral_lam}", spectral_lam > 0, "no spectral penalty on routed knobs")) if on]
        if problems:
            raise ValueError("HealModule: " + "; ".join(problems))
        self.save_hyperparameters()
        # plain values for YAML / TensorBoard
        self.hparams.update(lora=asdict(lora), barrier=asdict(barrier), routed=asdict(routed))
        self.strict_loading = False  # checkpoints hold the adapter only; on_load_checkpoint checks it is complete
        self.barrier, self.lora_spec = barrier, lora
        dtype = auto_dtype() if dtype == "auto" else dtype
        empty = load_on == "rank_zero" and not is_launch_rank_zero()  # filled from rank 0 by FSDP
        base = _AROUND.get() or load_model(model, dtype=dtype, quantize=quantize, empty=empty)
        if adapter == "routed":
            self.student = base
            self.routed_adapter = wrap_routed(self.student, routed)
            for p in self.routed_adapter.hack_params():  # no autograd work: the router hands it its gradient
                p.requires_grad_(False)
        else:
            self.student = wrap_lora(base, lora)
        if gradient_checkpointing:
            enable_checkpointing(self.student)
        self.train()  # from_pretrained returns eval mode; LoRA dropout needs train mode (see HealModule.train)
        self.head = LMHead(base_lm(self.student))
        if not empty:  # rank 0 checks the weights every rank will hold
            check_head(self.student, "HealModule")
        # base modules stay in eval mode by design (HealModule.train): Lightning's warning about it is noise here
        warnings.filterwarnings("ignore", r"Found \d+ module\(s\) in eval mode at the start of training")
        self.val_kl = TokenKLStats()
        self.drift = DriftPanels()  # the val/kl_hist and val/kl_top TensorBoard panels (heal_pl.barrier.panels)
        self.final_validation: dict[str, float | int] | None = None
        self.ref_cache = RefRowCache(ref_cache_memory_mb * 2**20) if ref_cache else None
        self.kl_grad_plan = KLGradPlan()  # the KL's gradient only on steps where the hinge opens (barrier.lazy_head)
        self.shared_prefix = self._shared_prefix()
        self.record_adapter_shapes()  # the shapes a resumed checkpoint must have (heal_pl.resume.AdapterCheckpoint)

    @classmethod
    def around(cls, base: PreTrainedModel, **kwargs: Any) -> HealModule:
        """A HealModule whose student is ``base`` itself, adapted in place (peft injects the adapter's layers into
        it; no second copy is loaded), e.g. the model a steer → heal round holds. ``model`` (recorded in the
        hparams and the adapter card) defaults to ``base``'s ``name_or_path``, ``dtype`` to its dtype. Afterwards
        ``module.student.unload()`` gives ``base`` back without the adapter's layers, its weights untouched."""
        kwargs.setdefault("model", base.name_or_path)
        kwargs.setdefault("dtype", str(base.dtype).removeprefix("torch."))
        refused = {k: kwargs[k] for k, default in (("quantize", "none"), ("load_on", "every_rank"))
                   if kwargs.get(k, default) != default}  # fmt: skip
        if refused:
            raise ValueError(f"HealModule.around: {refused} need a model HealModule loads itself (model=NAME)")
        token = _AROUND.set(base)
        try:
            return cls(**kwargs)
        finally:
            _AROUND.reset(token)

    def train(self, mode: bool = True) -> HealModule:
        """Train/eval switch. In train mode only the adapter's own dropout (``lora.dropout``) is on: the base
        model's dropout (GPT-2's 0.1, ...) stays off in the student as in the ref, so the barrier measures the
        adapter, not dropout noise (a zero adapter reads KL 0). With ``gradient_checkpointing`` the decoder blocks'
        own flags are on too, and only theirs: transformers recomputes them in backward, their dropout stays off."""
        super().train(mode)
        if mode:
            base_dropout_off(self.student)
            if self.hparams.gradient_checkpointing:
                checkpoint_blocks(self.student)
        return self

    # ------------------------------------------------------------------ loss

    def loss_terms(self, batch: dict[str, Tensor], where: str = "batch") -> tuple[Tensor, dict[str, Any], Tensor]:
        """SFT + barrier (+ spectral) on one batch: ``(loss, scalars to log, this rank's per-token KL)``.

        Under DDP the SFT mean and the barrier's aggregate pool the tokens of every rank
        (``heal_pl.barrier.distributed.gather_tokens``), so the loss and the logged scalars are those of the
        global batch, and equal on every rank.
        """
        mask = batch.get("attention_mask")
        counted = counted_positions(batch["labels"], mask)
        with self.shared_prefix.capture():
            hidden = last_hidden(self.student, batch["input_ids"], mask)
        ref, keys = self._ref_rows(batch, counted) if self.barrier.active else (None, None)
        self.shared_prefix.drop()
        ref_lse = None if keys is None else self.ref_cache.lse(keys, hidden.device)  # cached: no ref head product
        lse_out: list[Tensor] | None = [] if keys is not None and ref_lse is None else None  # to cache it
        stats = token_stats(
            gather_rows(hidden, counted), ref, counted.targets, head=self.head, reg=self.barrier.reg,
            chunk_size=self.chunk_rows(), plan=self.kl_grad_plan, ref_lse=ref_lse, lse_out=lse_out,
        )  # fmt: skip
        if lse_out:
            self.ref_cache.put_lse(keys, counted, lse_out[0])
        sft, out, pooled = pooled_objective(stats, self.barrier, self.hparams.round, where, hidden)
        loss = sft + out.value
        scalars: dict[str, Any] = {"sft": sft.detach(), **barrier_metrics(pooled, out)}
        if self.hparams.spectral_lam > 0:
            spectral = spectral_norms(self.student).mean()
            loss = loss + self.hparams.spectral_lam * spectral
            scalars["spectral"] = spectral.detach()
        scalars["loss"] = loss.detach()
        return loss, scalars, stats.kl

    def chunk_rows(self) -> int:
        """``chunk_size``, with ``auto`` resolved for the head's vocabulary and device now."""
        weight = self.head.proj.weight
        return chunk_rows(self.hparams.chunk_size, weight.shape[0], weight.device)

    def setup(self, stage: str) -> None:
        prepare_strategy(self.hparams.load_on, self.trainer.strategy, self.trainer.world_size)
        if isinstance(self.trainer.strategy, FSDPStrategy):
            check_block_units(self.student, self.trainer.strategy.kwargs.get("auto_wrap_policy"))
            hp = self.hparams
            refused = [f for f, on in (("adapter='routed'", hp.adapter == "routed"),
                                       (f"spectral_lam={hp.spectral_lam}", hp.spectral_lam > 0)) if on]  # fmt: skip
            if refused:
                raise ValueError(f"{' and '.join(refused)} cannot run under FSDPStrategy (they read whole adapter "
                                 "weights outside the blocks' forward); use DDP, or adapter: lora / spectral_lam: 0")
        if stage == "fit" and self.hparams.adapter == "routed":
            from heal_pl.callbacks.route_ablate import require_router

            require_router(self.trainer.callbacks)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)  # the adapter and the RNG (heal_pl.resume)
        checkpoint[PLAN_KEY] = self.kl_grad_plan.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        self.kl_grad_plan.load_state_dict(checkpoint.get(PLAN_KEY, {}))

    def on_fit_start(self) -> None:
        note = accumulation_note(self.trainer.accumulate_grad_batches, self.barrier.agg)
        if note is not None and self.barrier.active and self.global_rank == 0:
            log.info(note)
        if self.ref_cache is not None and self.ref_cache.spill_dir is None:
            root = self.trainer.log_dir or self.trainer.default_root_dir
            self.ref_cache.spill_dir = os.path.join(root, "ref_cache", f"rank{self.global_rank}")

    def on_train_epoch_start(self) -> None:
        self._check_ref_cache()

    def on_validation_epoch_start(self) -> None:
        self._check_ref_cache()

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss, scalars, _ = self.loss_terms(batch, f"train step {self.global_step} (batch {batch_idx})")
        bs = batch["input_ids"].shape[0]
        loss_value = scalars.pop("loss")
        self.log_dict({f"train/{k}": v for k, v in scalars.items()}, batch_size=bs)
        self.log("train/loss", loss_value, batch_size=bs, prog_bar=True)
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        _, scalars, kl = self.loss_terms(batch, f"validation at step {self.global_step} (batch {batch_idx})")
        self.val_kl.update(kl)
        if self.barrier.active:
            self.drift.update(kl, batch)
        per_batch = {f"val/{k}": v for k, v in scalars.items() if not k.startswith("kl_")}
        self.log_dict(per_batch, batch_size=batch["input_ids"].shape[0], sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        # exact pooled statistics of every validation token (gathered across ranks, not averaged)
        # (already equal on every rank; sync_dist only tells Lightning so, averaging identical values)
        self.log_dict({f"val/{k}": v for k, v in self.val_kl.compute().items()}, sync_dist=True)
        self.val_kl.reset()
        if self.barrier.active and not self.trainer.sanity_checking:
            with gathered_root(self.trainer.strategy.model):  # FSDP: the panels' forwards run outside the step
                self.drift.log(self.trainer, self.student, self.__dict__.get("_ref_model"))
        self.drift.reset()

    def on_validation_end(self) -> None:
        # hp_metric (TensorBoard's HParams tab, next to the run's hparams) = val/sft, the held-out completion NLL
        if not self.trainer.sanity_checking and "val/sft" in self.trainer.callback_metrics:
            sft = float(self.trainer.callback_metrics["val/sft"])
            for logger in self.loggers:
                logger.log_metrics({"hp_metric": sft}, step=logged_step(self.trainer))
            self.final_validation = final_validation(self.trainer.callback_metrics, self.global_step)  # adapter card

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        _, scalars, _ = self.loss_terms(batch, f"test batch {batch_idx}")
        self.log_dict({f"test/{k}": v for k, v in scalars.items()}, batch_size=batch["input_ids"].shape[0])

    # ------------------------------------------------------------------ optimisation

    def configure_optimizers(self) -> dict[str, Any]:
        params: Any = [p for p in self.parameters() if p.requires_grad]
        if self.hparams.adapter == "routed":
            params = hack_decay_groups(params, self.routed_adapter.hack_params(), self.hparams.weight_decay)
        opt = torch.optim.AdamW(params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        total = int(self.trainer.estimated_stepping_batches)
        h = self.hparams
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: warmup_cosine(s, h.warmup_steps, total, h.min_lr_ratio)
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_train_end(self) -> None:
        root = self.trainer.log_dir or self.trainer.default_root_dir  # log_dir is a collective under DDP
        path = self.hparams.adapter_dir or os.path.join(root, "adapter")
        model = self.trainer.strategy.model
        routed = self.hparams.adapter == "routed"  # refused under FSDP: it saves its own tensors
        names = set() if routed else self.trainable_names()
        tensors = adapter_tensors(model if is_sharded(model) else self, names)  # FSDP: collective, every rank
        if not self.trainer.is_global_zero:
            return
        if routed:
            os.makedirs(path, exist_ok=True)
            self.routed_adapter.save(os.path.join(path, "routed.safetensors"))
            rank_zero_info(f"heal_pl: routed adapter saved to {path}/routed.safetensors")
        else:
            save_lora(self.student, {k.removeprefix("student."): v for k, v in tensors.items()}, path)
            rank_zero_info(f"heal_pl: adapter saved in peft format to {path}")
        write_card(path, self.hparams, self.final_validation, self.global_step)  # heal_pl.json: barrier, final KL
