"""Decoder-block discovery and residual-stream edits by forward hooks (docs/maths.md §3.1–§3.2).

A steering edit replaces the output ``y`` (``[B, T, H]``) of chosen decoder blocks, at every position:

    additive   (mean_diff, pca, a raw vector):   y ← y + α · v
    ablation   (directional_ablation):           y ← y − (y · v̂) v̂ + α · v̂       (v̂ = v / ‖v‖)

A block returns either the hidden-state tensor or a tuple whose first element is it; both are handled
and the rest of a tuple is passed through untouched. Hooks live only inside the :func:`steer` /
:func:`add_to_blocks` context and are removed on exit, also when the body raises.

Any object with a ``steering(model, coeff, layers=None)`` method returning a context manager (a
:class:`~heal_pl.steering.vectors.SteeringVector`, or an adapter scaled by α) is a steering method for
:func:`steer`, so calibration treats every method alike.
"""

from __future__ import annotations

import contextlib
import math
import numbers
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from heal_pl.models.lm import BLOCK_PATHS, base_lm, find_blocks  # noqa: F401 BLOCK_PATHS re-exported

LayerSpec = int | float | Sequence[int | float]


@runtime_checkable
class SteeringMethod(Protocol):
    """Anything that can steer ``model`` by a coefficient inside a ``with`` block."""

    def steering(
        self, model: nn.Module, coeff: float, layers: LayerSpec | None = None
    ) -> AbstractContextManager[None]: ...


def layers_from(spec: LayerSpec, n_layers: int) -> list[int]:
    """Resolve a layer spec into sorted, distinct block indices in ``0 .. n_layers − 1``.

    ``spec`` is one item or a sequence of items; an ``int`` is a block index, a ``float`` in ``[0, 1]`` a
    depth fraction ``f`` mapped to ``min(floor(f · n_layers), n_layers − 1)`` (0 → first block, 0.5 → the
    middle one, 1 → the last one).

    Example:
        >>> layers_from([0.5, 0, 1.0], 30)
        [0, 15, 29]

    Raises:
        ValueError: an index outside ``0 .. n_layers − 1``, a fraction outside ``[0, 1]``, a bool or other
            type, an empty spec, or ``n_layers < 1``.
    """
    if isinstance(n_layers, bool) or not isinstance(n_layers, int) or n_layers < 1:
        raise ValueError(f"layers_from: n_layers={n_layers!r} must be an integer >= 1")
    items = list(spec) if isinstance(spec, Sequence) and not isinstance(spec, str) else [spec]
    if not items:
        raise ValueError("layers=[] is empty: give block indices (ints) or depth fractions (floats in [0, 1])")
    out: set[int] = set()
    for item in items:
        if isinstance(item, bool) or not isinstance(item, numbers.Real):
            raise ValueError(
                f"layers item {item!r} ({type(item).__name__}) is neither a block index (int) "
                "nor a depth fraction (float in [0, 1])"
            )
        if isinstance(item, numbers.Integral):
            if not 0 <= item < n_layers:
                raise ValueError(f"layer index {item} is out of range: valid indices are 0..{n_layers - 1}")
            out.add(int(item))
        else:
            item = float(item)
            if not (math.isfinite(item) and 0.0 <= item <= 1.0):
                raise ValueError(
                    f"layer fraction {item!r} is outside [0, 1]; pass an int for a block index (0..{n_layers - 1})"
                )
            out.add(min(math.floor(item * n_layers), n_layers - 1))
    return sorted(out)


def _hidden_size(model: nn.Module) -> int | None:
    config = getattr(base_lm(model), "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    return getattr(config, "hidden_size", None)


def _edit(h: Tensor, v: Tensor, coeff: float, ablate: bool) -> Tensor:
    """``h + coeff · v`` or, with ``ablate``, ``h − (h · v̂) v̂ + coeff · v̂`` (``v`` is then unit)."""
    if h.shape[-1] != v.shape[0]:  # the check for a model whose config gives no hidden size (no silent broadcast)
        raise ValueError(f"steering direction has {v.shape[0]} entries but the block outputs width {h.shape[-1]}")
    v = v.to(device=h.device, dtype=h.dtype)
    if ablate:
        h = h - (h @ v).unsqueeze(-1) * v
    return h + coeff * v


def _make_hook(v: Tensor, coeff: float, ablate: bool):  # noqa: ANN202 — a forward hook
    def hook(module: nn.Module, args: Any, output: Any) -> Any:
        if not ablate and coeff == 0:
            return None  # y + 0 · v = y exactly: leave the output object untouched
        if isinstance(output, Tensor):
            return _edit(output, v, coeff, ablate)
        if isinstance(output, tuple) and output and isinstance(output[0], Tensor):
            return (_edit(output[0], v, coeff, ablate), *output[1:])
        raise TypeError(
            f"{type(module).__name__} returned {type(output).__name__}; steering expects a tensor or a tuple "
            "whose first element is the hidden state"
        )

    return hook


@contextlib.contextmanager
def _hooked(blocks: nn.ModuleList, directions: dict[int, Tensor], coeff: float, ablate: bool) -> Iterator[None]:
    handles = []
    try:
        for i, v in directions.items():
            handles.append(blocks[i].register_forward_hook(_make_hook(v, coeff, ablate)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def add_to_blocks(
    model: nn.Module, directions: Mapping[int, Tensor], coeff: float, ablate: bool = False
) -> AbstractContextManager[None]:
    """Edit the outputs of the blocks ``directions`` names (see the module docstring) inside the context.

    Arguments are checked when this is called; the hooks exist only inside the ``with`` block.

    Args:
        model: a plain or peft-wrapped causal LM (see :func:`find_blocks`).
        directions: block index → direction ``[H]``. With ``ablate`` it is normalised to ``v̂``; otherwise
            it is added as given, ``coeff · v``.
        coeff: the coefficient α (any sign). At ``coeff = 0`` an additive edit leaves outputs bit-identical.
        ablate: directional ablation (on even at ``coeff = 0``).

    Raises:
        ValueError: an out-of-range block index, a direction that is not ``[H]`` for the model's hidden
            size ``H``, a zero direction to ablate, or a non-finite ``coeff``. ``H`` is the (text) config's
            ``hidden_size``; a model without one (a bare ``nn.Module``) has each direction checked against the
            block output's last dimension when the hook runs, raising there.
    """
    if not math.isfinite(coeff):
        raise ValueError(f"coeff={coeff!r} must be finite")
    blocks = find_blocks(model)
    hidden = _hidden_size(model)
    prepared: dict[int, Tensor] = {}
    for i, v in directions.items():
        if isinstance(i, bool) or not isinstance(i, int):
            raise ValueError(f"directions must be keyed by block index (int), got {i!r}")
        layers_from(i, len(blocks))  # validates the range
        if v.dim() != 1 or (hidden is not None and v.shape[0] != hidden):
            raise ValueError(f"direction for layer {i} has shape {tuple(v.shape)}; expected ({hidden},)")
        v = v.detach()
        if ablate:
            norm = v.float().norm()
            if not torch.isfinite(norm) or norm == 0:
                raise ValueError(f"direction for layer {i} has norm {norm.item()}; ablation needs a unit direction")
            v = v / norm
        prepared[i] = v
    return _hooked(blocks, prepared, float(coeff), ablate)


def steer(
    model: nn.Module, vector_or_method: Tensor | SteeringMethod, coeff: float, layers: LayerSpec | None = None
) -> AbstractContextManager[None]:
    """Steer ``model`` by ``coeff`` inside a ``with`` block; every hook is removed on exit.

    Args:
        model: a plain or peft-wrapped causal LM.
        vector_or_method: a raw direction ``[H]`` (added as ``coeff · v`` at ``layers``, which is then
            required), or a :class:`SteeringMethod` such as a fitted ``SteeringVector``.
        coeff: the coefficient α.
        layers: block indices / depth fractions (see :func:`layers_from`); for a method, a subset of its
            own layers (default: all of them).

    Example:
        >>> from heal_pl.models import tiny_model
        >>> model, ids = tiny_model("llama"), torch.tensor([[1, 2, 3]])
        >>> with steer(model, torch.randn(model.config.hidden_size), 4.0, layers=0.5):  # a raw direction
        ...     steered = model(ids).logits
        >>> torch.equal(steered, model(ids).logits), torch.equal(model(ids).logits, model(ids).logits)
        (False, True)
    """
    if isinstance(vector_or_method, Tensor):
        if layers is None:
            raise ValueError("steer with a raw direction tensor needs layers= (block indices or depth fractions)")
        chosen = layers_from(layers, len(find_blocks(model)))
        return add_to_blocks(model, dict.fromkeys(chosen, vector_or_method), coeff)
    if isinstance(vector_or_method, SteeringMethod):
        return vector_or_method.steering(model, coeff, layers)
    raise TypeError(
        f"steer: vector_or_method is a {type(vector_or_method).__name__}; expected a direction tensor or an "
        "object with a steering(model, coeff, layers) method (e.g. SteeringVector)"
    )
