"""Switching adapters off and on: the frozen base ("ref") is the same weights with every adapter off.

heal_pl never keeps a second copy of the model for the ref. :func:`adapter_off` switches every peft (or routed)
adapter of a model off for the duration of a ``with`` block; :func:`ref_rows` runs the base that way, in eval mode
(no dropout, whatever mode the caller is in) and without gradient, and keeps the hidden rows at the counted
positions only. :func:`head_has_adapter` tells whether the LM head itself carries an adapter (then the ref must
read the head with the adapter off too: :func:`base_head`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import ModulesToSaveWrapper
from torch import Tensor, nn

from heal_pl.adapters.routed import RoutedLinear, routed_modules
from heal_pl.adapters.routed import adapter_off as routed_adapter_off
from heal_pl.barrier.positions import Counted, gather_rows
from heal_pl.models.lm import base_lm, eval_mode, last_hidden

_ADAPTER_LAYERS = (BaseTunerLayer, ModulesToSaveWrapper, RoutedLinear)


@contextlib.contextmanager
def adapter_off(model: nn.Module) -> Iterator[None]:
    """Run the frozen base: every peft (or routed) adapter in ``model`` switched off, restored on exit."""
    if isinstance(model, PeftModel):
        with keep_trainable(model), model.disable_adapter():
            yield
    elif routed_modules(model):
        with routed_adapter_off(model):
            yield
    else:
        raise TypeError(f"ref = base needs a peft-wrapped or routed model, got {type(model).__name__}")


@contextlib.contextmanager
def keep_trainable(model: nn.Module) -> Iterator[None]:
    """Every parameter's ``requires_grad`` as it was, on exit. peft's adapter switches (``disable_adapter``,
    ``set_adapter``) mark every *active* adapter trainable on the way back, frozen ones of a stack included."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def ref_rows(model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None, counted: Counted) -> Tensor:
    """Hidden rows ``[N, H]`` of the frozen base (adapter off, eval mode: no dropout) at the counted positions,
    no gradient."""
    with torch.no_grad(), adapter_off(model), eval_mode(model):
        return gather_rows(last_hidden(model, input_ids, attention_mask), counted)


def find_peft_model(module: nn.Module) -> PeftModel:
    """The (single) ``PeftModel`` inside a LightningModule, or a clear error listing what is there."""
    found = [m for m in module.modules() if isinstance(m, PeftModel)]
    if len(found) != 1:
        children = ", ".join(f"{n}: {type(c).__name__}" for n, c in module.named_children()) or "none"
        raise ValueError(
            f"expected exactly one peft-wrapped model (peft.PeftModel) inside {type(module).__name__}, "
            f"found {len(found)}; its children are [{children}]"
        )
    return found[0]


def head_has_adapter(model: nn.Module) -> bool:
    """Whether the LM head is (or holds) an adapter layer: peft LoRA / ``modules_to_save`` or a routed layer."""
    head = base_lm(model).get_output_embeddings()
    return head is not None and any(isinstance(m, _ADAPTER_LAYERS) for m in head.modules())


def base_head(model: nn.Module, head: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    """The ref's head: ``head`` itself, or, when ``model``'s LM head carries an adapter (a LoRA or
    ``modules_to_save`` on ``lm_head``), ``head`` run with every adapter of ``model`` off."""
    if not head_has_adapter(model):
        return head

    def off(rows: Tensor) -> Tensor:
        with adapter_off(model):
            return head(rows)

    return off


def base_dropout_off(model: nn.Module) -> None:
    """Every module of ``model`` in eval mode except the peft LoRA dropout layers, which train."""
    model.eval()
    for m in model.modules():
        if isinstance(m, LoraLayer):
            m.lora_dropout.train()
