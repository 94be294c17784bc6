"""Which forward of a foreign training step is the student, and the ref run on exactly the same call.

``KLBarrierCallback`` hooks the causal LM and records every forward a step makes (:class:`Forward`: the call's
arguments and its logits). The student is chosen by one rule (:func:`pick_student`):

1. candidates are the forwards whose logits are ``[B, T, V]`` with ``[B, T]`` the batch's ``labels`` shape;
2. in training, only grad-enabled candidates count (a no-grad metric or logging pass never is the student);
   with several, the ones whose logits the returned loss depends on (found by walking the loss's autograd
   graph); exactly one must remain;
3. in validation (no gradient anywhere) the candidates must agree (equal logits), else it cannot tell;
4. otherwise a ``ValueError`` says what was seen and what to change.

The ref replays **every argument** of that call (``position_ids`` of packed sequences, ``token_type_ids``,
``inputs_embeds``, ...) to the same model with the adapter off, in eval mode (no dropout), without gradient, and
stops at the LM head's input (:func:`head_input`): the ref rows are what the model's own head would see.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from heal_pl.adapters.switch import adapter_off
from heal_pl.models.lm import base_lm, eval_mode


class Forward(NamedTuple):
    """One recorded forward of the causal LM: its positional and keyword arguments and its logits."""

    args: tuple
    kwargs: dict[str, Any]
    logits: Tensor


def logits_of(output: Any) -> Tensor | None:
    """The ``logits`` of a model output (a ``ModelOutput``, a mapping, or anything with ``.logits``)."""
    return output["logits"] if isinstance(output, Mapping) else getattr(output, "logits", None)


def _reaches(loss: Tensor, target: Tensor) -> bool:
    """Whether ``loss``'s autograd graph contains ``target``'s ``grad_fn`` (breadth-first over the graph)."""
    goal, start = target.grad_fn, loss.grad_fn
    if goal is None or start is None:
        return False
    seen, todo = {start}, [start]
    while todo:
        node = todo.pop()
        if node is goal:
            return True
        for nxt, _ in node.next_functions:
            if nxt is not None and nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return False


def pick_student(captured: list[Forward], shape: tuple[int, ...], loss: Tensor | None, where: str) -> Forward:
    """The student forward among ``captured`` by the module docstring's rule; ``loss=None`` in validation."""
    seen = [tuple(f.logits.shape) + (("grad",) if f.logits.requires_grad else ()) for f in captured]
    candidates = [f for f in captured if f.logits.dim() == 3 and tuple(f.logits.shape[:2]) == shape]
    if not candidates:
        raise ValueError(
            f"{where}: KLBarrierCallback saw no forward of the peft model on this batch (labels {shape}); "
            f"forwards seen: {seen}. Call the model on batch['input_ids'] inside the step."
        )
    if loss is None:
        if all(torch.equal(f.logits, candidates[0].logits) for f in candidates[1:]):
            return candidates[0]
        raise ValueError(
            f"{where}: KLBarrierCallback cannot tell the student forward: {len(candidates)} forwards on this batch "
            f"give different logits (forwards seen: {seen}); run the model once on the batch in validation_step"
        )
    grad = [f for f in candidates if f.logits.requires_grad]
    if not grad:
        raise ValueError(
            f"{where}: no grad-enabled forward of the peft model on this batch (forwards seen: {seen}); the "
            "barrier needs the student's logits with their graph: call the model outside torch.no_grad()"
        )
    if len(grad) == 1:
        return grad[0]
    feeding = [f for f in grad if _reaches(loss, f.logits)]
    if len(feeding) == 1:
        return feeding[0]
    raise ValueError(
        f"{where}: KLBarrierCallback cannot tell the student forward: {len(grad)} grad-enabled forwards on this "
        f"batch, {len(feeding)} of them feeding the returned loss (forwards seen: {seen}). Make exactly one "
        "grad-enabled forward on the batch carry the loss (run metric passes under torch.no_grad())"
    )


class _HeadInput(Exception):
    """Raised by the LM head's pre-hook to stop a ref forward once the head's input is known."""

    def __init__(self, hidden: Tensor) -> None:
        super().__init__("LM head input")
        self.hidden = hidden


def head_input(model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> Tensor:
    """The input of the LM head (final hidden states ``[B, T, H]``) in the base model's forward on ``args``,
    ``kwargs`` — adapter off, eval mode, no gradient; the head itself and the loss are never computed."""
    lm = base_lm(model)
    head = lm.get_output_embeddings()

    def stop(module: nn.Module, inputs: tuple) -> None:
        raise _HeadInput(inputs[0])

    handle = head.register_forward_pre_hook(stop)
    try:
        with torch.no_grad(), adapter_off(model), eval_mode(lm):
            lm(*args, **kwargs)
    except _HeadInput as found:
        return found.hidden
    finally:
        handle.remove()
    raise ValueError(f"{type(lm).__name__}'s forward never called its LM head ({type(head).__name__})")
