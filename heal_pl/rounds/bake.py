"""Baking LoRA adapters into a model's weights: the history of the steer → heal rounds as a plain model
(docs/maths.md §5.5). The rounds themselves keep the history unmerged, on one copy of the base weights
(:mod:`heal_pl.rounds.stack`); baking is the export, and the reference the stack is tested against.

For every adapted linear layer, baking round r's adapter is

    W ← W + (alpha / r) · B A            (peft's ``merge_and_unload``)

so after rounds 0 … r−1 the weights are ``W_0 + Σ_k ΔW_k``, added in round order. The result is a plain
``PreTrainedModel`` (no adapter layers left); switching round r's fresh adapter off on top of it gives
exactly the model the previous round ended with (up to the float rounding of one addition per weight).
Re-baking the saved adapters in the same order repeats the same additions, so a resumed run holds the
same weights bit for bit.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from peft import PeftModel
from transformers import PreTrainedModel


def bake_adapter(model: PreTrainedModel, adapter_dir: str | os.PathLike) -> PreTrainedModel:
    """Merge the peft adapter saved in ``adapter_dir`` into ``model`` (in place) and return the plain model.

    Raises:
        FileNotFoundError: ``adapter_dir`` has no ``adapter_config.json``.
        TypeError: ``model`` is already peft-wrapped (bake into the plain model).
    """
    if isinstance(model, PeftModel):
        raise TypeError("bake_adapter needs the plain model, got a PeftModel; merge or unwrap it first")
    if not (Path(adapter_dir) / "adapter_config.json").is_file():
        raise FileNotFoundError(f"adapter_dir={os.fspath(adapter_dir)!r} has no adapter_config.json (peft format)")
    peft_model = PeftModel.from_pretrained(model, os.fspath(adapter_dir))
    return peft_model.merge_and_unload()


def bake_history(model: PreTrainedModel, adapter_dirs: Sequence[str | os.PathLike]) -> PreTrainedModel:
    """``model`` with every adapter of ``adapter_dirs`` baked in, in order (in place)."""
    for adapter_dir in adapter_dirs:
        model = bake_adapter(model, adapter_dir)
    return model
