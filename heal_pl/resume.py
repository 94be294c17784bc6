"""Exact resume of ``heal fit``: what a checkpoint must carry beyond Lightning's own loop, optimizer and
LR-scheduler state so that a run killed at any step and resumed with ``--ckpt_path`` trains on.

Lightning restores the step and batch counters but not the data order: it asks the train DataLoader to
resume only if the loader has ``state_dict``/``load_state_dict``, and otherwise restarts the epoch's
iteration from its first batch. Two more things decide the rest of the run:

* the data position — which epoch's permutation, and how many of its batches are done. The data module
  saves it (:func:`data_state`, :func:`resume_point`) and its :class:`~heal_pl.data.datamodule.EpochShuffleSampler`
  skips those batches' indices (``skip = batches_done · batch_size``) in that epoch only;
* the global RNG (LoRA dropout). :func:`rng_state` is saved with the checkpoint and :func:`set_rng_state`
  puts it back right before the first training batch after the resume, so no RNG draw made while resuming
  (sanity validation, model init) reaches the masks. DataLoaders carry their own generator, so creating an
  iterator (every epoch, every validation) draws nothing from the global RNG in either run.

One device only: under DDP Lightning wraps the sampler in its own distributed sampler, and a mid-epoch
position is then not restored (a warning says so; the epoch restarts).

:class:`AdapterCheckpoint` is the part a LightningModule carries: its checkpoints hold the adapter alone (the frozen
base is the model's own files), checked on load against the adapter it built, under FSDP too.
"""

from __future__ import annotations

import logging
import random
import warnings
from typing import Any

import numpy as np
import torch

from heal_pl.models.fsdp import clean_name

RNG_KEY = "heal_pl_rng"
log = logging.getLogger("heal_pl")


def rng_state() -> dict[str, Any]:
    """The global RNG states of torch (CPU and every CUDA device), numpy and Python's ``random``."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, py_gauss = random.getstate()
    return {  # tensors and plain numbers only: loadable with torch.load(weights_only=True)
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": {"version": version, "state": list(internal), "gauss": py_gauss},
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned (CUDA states only when the device count matches)."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))


def data_state(trainer: Any, sampler: Any, settings: dict[str, int]) -> dict[str, int]:
    """What a checkpoint written now needs to resume the data order: ``{"epoch", "batches_done", **settings}``
    (``{}`` when not fitting). ``settings`` are the values the order depends on (seed, batch size, row count).

    ``batches_done`` = train batches processed in the current epoch: after a train step (``on_train_batch_end``)
    its batch is processed; at an epoch end all are. Lightning restores its own counters from the same numbers.
    """
    if trainer is None or trainer.state.fn != "fit" or sampler is None:
        return {}
    done = int(trainer.fit_loop.epoch_loop.batch_progress.current.processed)
    return {"epoch": int(sampler.epoch), "batches_done": done, **settings}


def resume_point(state: dict[str, int], settings: dict[str, int], world_size: int = 1) -> tuple[int, int] | None:
    """``(epoch, indices to skip)`` for :class:`~heal_pl.data.datamodule.EpochShuffleSampler` from :func:`data_state`'s
    checkpoint entry, or None when the checkpoint is at an epoch boundary (nothing to skip).

    Raises:
        ValueError: the checkpoint stopped mid-epoch and a setting differs from this run's; the message names it.
    """
    if not state:
        return None
    n_batches = -(-state["n_train"] // state["batch_size"])
    if not 0 < state["batches_done"] < n_batches:
        return None
    if world_size > 1:
        log.warning("resume under DDP: the mid-epoch data position is not restored; epoch %d restarts", state["epoch"])
        return None
    changed = [f"data.{k}={state[k]} in the checkpoint, {v} now" for k, v in settings.items() if state.get(k) != v]
    if changed:
        raise ValueError("resuming mid-epoch needs the checkpoint's data settings (" + "; ".join(changed)
                         + "): restore them, or resume from a checkpoint written at an epoch end")
    log.info("resume: epoch %d, skipping its %d finished batches", state["epoch"], state["batches_done"])
    # Lightning warns that a plain DataLoader cannot resume mid-epoch; this one does (the sampler skips)
    warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")
    return state["epoch"], state["batches_done"] * state["batch_size"]


class AdapterCheckpoint:
    """Adapter-only checkpoints for a LightningModule with a frozen base (mixed into ``HealModule``).

    ``on_save_checkpoint`` keeps the :meth:`trainable_names` entries of the state dict (and the RNG state);
    ``on_load_checkpoint`` refuses a checkpoint of another model, one that lacks an adapter tensor, or one of other
    shapes, against the shapes recorded by :meth:`record_adapter_shapes` before any sharding. Names are those of a
    state dict: FSDP's wrapper segments dropped (:func:`heal_pl.models.fsdp.clean_name`).
    """

    def trainable_names(self) -> set[str]:
        """The adapter's parameter names: the trainable ones, and a routed adapter's ``delta_hack``."""
        routed = getattr(self, "routed_adapter", None)
        hack = {id(p) for p in routed.hack_params()} if routed is not None else set()
        return {clean_name(n) for n, p in self.named_parameters() if p.requires_grad or id(p) in hack}

    def record_adapter_shapes(self) -> None:
        self.__dict__["_adapter_shapes"] = {clean_name(n): tuple(p.shape) for n, p in self.named_parameters()}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        keep = self.trainable_names()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        checkpoint[RNG_KEY] = rng_state()  # the dropout masks of the steps after a resume

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        source = f"checkpoint {self.trainer.ckpt_path}" if self._trainer is not None else "checkpoint"
        trained_on = checkpoint.get("hyper_parameters", {}).get("model", self.hparams.model)
        if trained_on != self.hparams.model:
            raise ValueError(f"{source} was trained with model={trained_on!r}, but this run has "
                             f"model={self.hparams.model!r}")  # fmt: skip
        missing = self.trainable_names() - set(checkpoint["state_dict"])
        if missing:
            raise KeyError(f"{source} lacks {len(missing)} adapter tensors, e.g. {sorted(missing)[:3]}")
        shapes = self.__dict__["_adapter_shapes"]
        wrong = [f"{k} is {tuple(v.shape)} there, {shapes[k]} here"
                 for k, v in checkpoint["state_dict"].items() if shapes.get(k, tuple(v.shape)) != tuple(v.shape)]
        if wrong:
            raise ValueError(f"{source} holds an adapter of another shape (model.lora / model.routed differ?): "
                             f"{wrong[0]} ({len(wrong)} tensors differ)")  # fmt: skip
        self.__dict__["_resume_rng"] = checkpoint.get(RNG_KEY)  # put back before the next train batch

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if (state := self.__dict__.pop("_resume_rng", None)) is not None:
            set_rng_state(state)
