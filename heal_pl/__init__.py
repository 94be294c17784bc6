"""heal_pl: KL-budgeted fine-tuning of LLM students for PyTorch Lightning.

The public names below are imported lazily, so ``import heal_pl.barrier.kl`` stays a pure-torch import.
"""

from __future__ import annotations

import importlib
import logging
from typing import Any

__version__ = "0.1.0"

# bitsandbytes (heal_pl[quant]), imported by peft, logs on a CPU without network that it could not fetch an optional
# faster CPU kernel from the Hub (two warnings, from bitsandbytes and from the kernels package): noise on every command
for _noisy in ("bitsandbytes.backends.cpu.ops", "kernels._internals.hf_hub"):
    logging.getLogger(_noisy).setLevel(logging.ERROR)

_PUBLIC = {
    "per_token_kl": "heal_pl.barrier.kl",
    "aggregate": "heal_pl.barrier.kl",
    "KLBarrier": "heal_pl.barrier.kl",
    "token_stats": "heal_pl.barrier.kl",
    "HealModule": "heal_pl.module",
    "HealDataModule": "heal_pl.data.datamodule",
    "KLBarrierCallback": "heal_pl.callbacks",
    "IsoKLCalibrationCallback": "heal_pl.callbacks",
    "RouteAblateEvalCallback": "heal_pl.callbacks",
    "ProgressLog": "heal_pl.callbacks",
    "read_card": "heal_pl.adapters.card",
    "LoRASpec": "heal_pl.adapters",
    "load_model": "heal_pl.models.load",
    "load_tokenizer": "heal_pl.models.load",
    "resolve_model": "heal_pl.models.load",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'heal_pl' has no attribute {name!r}")
