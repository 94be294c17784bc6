"""The rounds' student as one base model and a stack of frozen LoRA adapters (docs/maths.md §5.5).

S_r = the original model with the adapters of rounds 0 … r−1 kept *unmerged*, as peft adapters named
``round_00`` … ``round_{r−1}``, all active at once; per adapted layer

    y = W_0 x + Σ_{k<r} s_k B_k A_k x          (s_k = alpha / rank of round k's adapter)

One copy of the base weights serves every model a round needs:

* S_r: the stack as it is (probes, the steering vector, sampling);
* the original model: the same object with every adapter off (:func:`original`; the filter's tail perplexity);
* round r's heal adds a fresh trainable adapter (``"default"``, :func:`heal_pl.adapters.lora.wrap_lora`) to the
  stack; HealModule's own ref, every adapter off, is the original model (``heal.ref: base``), and
  :class:`AdaptersView` of the history adapters is S_r (``heal.ref: prev``, given to ``set_ref_model``);
* after the heal, the fresh adapter is replaced by the copy it saved (:func:`push_adapter`), so a resumed run
  (:func:`load_stack` from the saved folders) holds exactly the same stack.

The history adapters are frozen and never drop out (their dropout is replaced by the identity): each is a fixed
weight delta, as if baked in (:func:`heal_pl.rounds.bake.bake_history`, which merges them into a copy of the
weights instead; the two agree up to float rounding).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from torch import nn
from transformers import PreTrainedModel

from heal_pl.adapters.lora import FRESH
from heal_pl.adapters.switch import adapter_off, keep_trainable
from heal_pl.models.lm import base_lm, eval_mode

PREFIX = "round_"


def round_name(r: int) -> str:
    """The name of round ``r``'s adapter in the stack: ``round_03``."""
    return f"{PREFIX}{r:02d}"


def history(model: nn.Module) -> list[str]:
    """The names of the stack's round adapters, in round order (``[]`` for a plain model)."""
    if not isinstance(model, PeftModel):
        return []
    return [n for n in model.peft_config if n.startswith(PREFIX)]  # peft keeps them in the order they were added


def push_adapter(model: PreTrainedModel | PeftModel, adapter_dir: str | os.PathLike, r: int) -> PeftModel:
    """Load the adapter saved in ``adapter_dir`` into ``model`` (in place) as round ``r``'s, frozen, active with the
    earlier ones; a fresh ``"default"`` adapter (the heal's, saved to ``adapter_dir``) is dropped.

    Raises:
        FileNotFoundError: ``adapter_dir`` has no ``adapter_config.json``.
        ValueError: round ``r`` is already in the stack.
    """
    if not (Path(adapter_dir) / "adapter_config.json").is_file():
        raise FileNotFoundError(f"adapter_dir={os.fspath(adapter_dir)!r} has no adapter_config.json (peft format)")
    name = round_name(r)
    if name in history(model):
        raise ValueError(f"push_adapter: {name!r} is already in the stack ({history(model)})")
    if isinstance(model, PeftModel):
        model.load_adapter(os.fspath(adapter_dir), adapter_name=name)
        model.set_adapter(name)  # the PeftModel's own active adapter too (peft 0.15 keeps a deleted one there)
        if FRESH in model.peft_config:
            model.delete_adapter(FRESH)
    else:
        model = PeftModel.from_pretrained(model, os.fspath(adapter_dir), adapter_name=name)
    for layer in model.modules():
        if isinstance(layer, LoraLayer) and name in layer.lora_dropout:
            layer.lora_dropout[name] = nn.Identity()  # a fixed delta: no dropout in the student's history
    model.base_model.set_adapter(history(model))
    model.requires_grad_(False)  # set_adapter makes the active adapters trainable; the whole stack is frozen
    return model


def load_stack(model: PreTrainedModel, adapter_dirs: Sequence[str | os.PathLike]) -> PreTrainedModel | PeftModel:
    """``model`` with the adapters of ``adapter_dirs`` stacked in order as rounds 0, 1, … (in place); ``model`` itself
    when there are none. The weights of ``model`` are not touched (compare :func:`heal_pl.rounds.bake.bake_history`)."""
    for r, adapter_dir in enumerate(adapter_dirs):
        model = push_adapter(model, adapter_dir, r)
    return model


@contextlib.contextmanager
def original(model: nn.Module) -> Iterator[None]:
    """Run the original model: every adapter of the stack off inside the block (a plain model is the original)."""
    if isinstance(model, PeftModel):
        with adapter_off(model):
            yield
    else:
        yield


@contextlib.contextmanager
def only_adapters(model: PeftModel, names: Sequence[str]) -> Iterator[None]:
    """Only the adapters ``names`` active inside the block; which parameters train is left as it was."""
    before = list(model.active_adapters)
    with keep_trainable(model):
        model.base_model.set_adapter(list(names))
        try:
            yield
        finally:
            model.base_model.set_adapter(before)


class AdaptersView(nn.Module):
    """``stack`` with only the adapters ``names`` on, as a frozen model for ``HealModule.set_ref_model``
    (``heal.ref: prev``: the history adapters on, the fresh one off, i.e. S_r), without a second copy.

    It holds no parameters: ``stack`` is not a submodule, so ``set_ref_model``'s ``requires_grad_(False)`` and
    ``eval()`` leave the student as it is. Its decoder runs the stack's in eval mode with ``names`` active.
    """

    def __init__(self, stack: PeftModel, names: Sequence[str]) -> None:
        super().__init__()
        self.__dict__["stack"] = stack  # plain attribute: not registered
        self.names = list(names)

    def get_output_embeddings(self) -> nn.Module | None:
        return base_lm(self.stack).get_output_embeddings()

    def get_decoder(self) -> Callable[..., Any]:
        decoder = base_lm(self.stack).get_decoder()

        def run(**kwargs: Any) -> Any:
            with torch.no_grad(), only_adapters(self.stack, self.names), eval_mode(self.stack):
                return decoder(**kwargs)

        return run

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with torch.no_grad(), only_adapters(self.stack, self.names), eval_mode(self.stack):
            return self.stack(*args, **kwargs)
