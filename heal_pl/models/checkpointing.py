"""Activation checkpointing of the decoder blocks while the rest of the base stays in eval mode (no dropout).

transformers recomputes a block in backward only when the block's own ``training`` flag is on (and it was built as
a ``GradientCheckpointingLayer``). heal_pl keeps every base module in eval mode, so that the student and the ref
share one dropout-free base and a zero adapter reads KL 0 (``HealModule.train``). :func:`checkpoint_blocks` turns on
the flag of each checkpointed block *alone*: the modules inside a block (its dropout, its attention, whose
``attention_dropout`` reads their own flag) stay in eval mode, so the recompute in backward runs exactly the
operations of the forward, and the loss and the adapter's gradients equal those of a run without checkpointing.

Under ``torch.no_grad`` (the ref's forward with the adapter off, the shared prefix, validation) transformers runs a
block as is: nothing is recomputed, nothing is saved.
"""

from __future__ import annotations

from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer

from heal_pl.models.lm import base_lm


def enable_checkpointing(model: nn.Module) -> int:
    """Turn on activation checkpointing (non-reentrant ``torch.utils.checkpoint``) in every decoder block of
    ``model`` (plain or peft-wrapped); returns the number of checkpointed blocks.

    Raises:
        ValueError: the model class does not support it (``supports_gradient_checkpointing`` is false), or none
            of its modules is a ``GradientCheckpointingLayer`` (nothing would be recomputed).
    """
    lm = base_lm(model)
    name = type(lm).__name__
    if not getattr(lm, "supports_gradient_checkpointing", False):
        raise ValueError(f"gradient_checkpointing=True: {name} does not support activation checkpointing "
                         "(its supports_gradient_checkpointing is False); set gradient_checkpointing: false")
    kwargs = {"use_reentrant": False}  # frozen inputs need no requires_grad hook with the non-reentrant variant
    if hasattr(lm, "activation_checkpointing_enable"):  # transformers >= 5.25; the older name warns there
        lm.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    # transformers hooks the embeddings so that their output requires grad (for the reentrant variant): that would
    # make the frozen blocks below the first adapter save activations and run a useless backward
    if getattr(lm, "_require_grads_hooks", None) or getattr(lm, "_require_grads_hook", None) is not None:
        lm.disable_input_require_grads()
    n = len(checkpointed_blocks(model))
    if n == 0:
        raise ValueError(f"gradient_checkpointing=True: {name} has no GradientCheckpointingLayer whose checkpointing "
                         "could be turned on; set gradient_checkpointing: false")  # fmt: skip
    return n


def checkpointed_blocks(model: nn.Module) -> list[nn.Module]:
    """The blocks of ``model`` that recompute in backward when their own ``training`` flag is on."""
    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing]


def checkpoint_blocks(model: nn.Module, on: bool = True) -> None:
    """Set the ``training`` flag of each checkpointed block alone (not of its children): ``on`` recomputes them
    in backward; the modules inside keep their own mode (eval: no dropout)."""
    for block in checkpointed_blocks(model):
        block.training = on
