"""The adapter card: ``heal_pl.json`` next to peft's files, so a saved adapter says how far it moved its base.

Written by ``HealModule`` at the end of ``fit`` into the adapter folder (``<log_dir>/adapter`` by default)::

    {
      "format": "heal_pl.adapter_card/1",
      "heal_pl_version": "0.1.0",               # the heal_pl that wrote it
      "base_model": "smollm2-135m-instruct",   # model.model as given (alias, folder or Hub id)
      "adapter": "lora",                        # or "routed"
      "barrier": {"reg": "kl_rev", "agg": "rmse", "tau": 1.0, "lam": 1.0, "lam_round_pow": 0.0, "eps": 1e-08},
      "round": 0, "lam_eff": 1.0, "ref": "base",
      "trained_steps": 36,
      "final_validation": {"step": 36, "kl_mean": ..., "kl_rmse": ..., "kl_p95": ..., "kl_max": ..., "sft": ...,
                           "D": ..., "barrier": ..., "barrier_fired": ...},
      "hparams": {...}                          # every HealModule argument
    }

``final_validation`` is the last validation of the run (null when none ran): ``kl_*`` pooled over every
validation token (exact, all ranks), ``sft`` / ``D`` / ``barrier`` / ``barrier_fired`` the means over its
validation batches (the ``val/*`` scalars of TensorBoard). KL is in nats, in the direction of ``barrier.reg``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from heal_pl import __version__
from heal_pl.barrier.kl import KLBarrier

CARD_NAME = "heal_pl.json"
CARD_FORMAT = "heal_pl.adapter_card/1"
FINAL_KEYS = ("kl_mean", "kl_rmse", "kl_p95", "kl_max", "sft", "D", "barrier", "barrier_fired")


def final_validation(metrics: Mapping[str, Any], step: int, prefix: str = "val/") -> dict[str, float | int]:
    """``{"step": step, name: value}`` for the :data:`FINAL_KEYS` present as ``{prefix}{name}`` in ``metrics``."""
    return {"step": step, **{k: float(metrics[prefix + k]) for k in FINAL_KEYS if prefix + k in metrics}}


def write_card(folder: str | os.PathLike, hparams: Mapping[str, Any], final: Mapping[str, Any] | None,
               trained_steps: int) -> Path:  # fmt: skip
    """Write ``folder/heal_pl.json`` (module docstring) from a ``HealModule``'s hparams; returns its path."""
    barrier = dict(hparams["barrier"])
    spec = KLBarrier(**barrier)
    lam_eff = spec.lam_eff(hparams["round"]) if spec.active else 0.0
    card = {
        "format": CARD_FORMAT,
        "heal_pl_version": __version__,
        "base_model": hparams["model"],
        "adapter": hparams["adapter"],
        "barrier": barrier,
        "round": hparams["round"],
        "lam_eff": lam_eff,
        "ref": hparams["ref"],
        "trained_steps": trained_steps,
        "final_validation": dict(final) if final is not None else None,
        "hparams": dict(hparams),
    }
    path = Path(folder) / CARD_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(card, indent=2, default=str) + "\n", encoding="utf-8")
    return path


def read_card(folder: str | os.PathLike) -> dict[str, Any]:
    """The card of an adapter folder.

    Raises:
        FileNotFoundError: the folder has no ``heal_pl.json`` (not saved by ``HealModule``).
    """
    path = Path(folder) / CARD_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{folder} has no {CARD_NAME}: not an adapter saved by heal_pl's HealModule")
    return json.loads(path.read_text(encoding="utf-8"))
