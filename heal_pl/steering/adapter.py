"""A trained LoRA adapter as a steering method: its delta scaled by a coefficient α (docs/maths.md §3.2).

A peft LoRA layer computes ``y = W x + s · B A x`` with ``s = scaling[adapter] = lora_alpha / r``. Inside
:meth:`AdapterSteering.steering` every LoRA layer of the adapter gets ``s ← α · s`` (restored on exit, also
when the body raises), so each adapted layer's output is

    y(α) = W x + α · s · B A x          α = 0: the base exactly,  α = 1: the adapter as trained,
                                        α = 2: twice the delta,   α < 0: the delta reversed.

The edit is linear in α per layer (not for the whole network). Outside the context the model is left as
it was: with the adapter active, that is the adapter as trained (α = 1), so the *base* of this method is
:meth:`AdapterSteering.base`, the α = 0 context, not "no context" (``heal_pl.steering.trajectory`` asks for it).

Only vanilla LoRA is supported: variants (DoRA, aLoRA, ...) are not linear in ``s``, and a merged
adapter no longer reads ``s``; both are refused with an error.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from contextlib import AbstractContextManager

from peft import PeftModel
from peft.tuners.lora import LoraLayer
from torch import nn

from heal_pl.steering.hooks import LayerSpec, find_blocks, layers_from


def _lora_layers(root: nn.Module, adapter_name: str) -> list[tuple[str, LoraLayer]]:
    return [(n, m) for n, m in root.named_modules() if isinstance(m, LoraLayer) and adapter_name in m.scaling]


def _variant(layer: LoraLayer, adapter_name: str) -> str | None:
    """The LoRA variant of ``adapter_name`` on ``layer`` (``None``: vanilla LoRA). peft ≥ 0.16 keeps variants in
    ``lora_variant``; before, DoRA was the only one, flagged in ``use_dora``."""
    if adapter_name in getattr(layer, "lora_variant", {}):
        return type(layer.lora_variant[adapter_name]).__name__
    return "DoRA" if getattr(layer, "use_dora", {}).get(adapter_name) else None


class AdapterSteering:
    """Steer by a peft LoRA adapter's delta scaled by α; a :class:`~heal_pl.steering.hooks.SteeringMethod`.

    Args:
        model: the ``PeftModel`` holding the adapter (already wrapped). :meth:`steering` may be given this
            model or any module containing its LoRA layers (e.g. ``model.get_base_model()``).
        adapter_name: which adapter to scale (peft's default is ``"default"``).

    Raises:
        TypeError: ``model`` is not a ``PeftModel``.
        ValueError: the adapter has no LoRA layer, is not active, uses a LoRA variant (DoRA, ...), or is merged.

    Example:
        >>> from heal_pl.adapters.lora import LoRASpec, wrap_lora
        >>> from heal_pl.models import tiny_model, tiny_tokenizer
        >>> from heal_pl.steering import measure_kl
        >>> peft_model, tok = wrap_lora(tiny_model("llama"), LoRASpec(r=4)), tiny_tokenizer()
        >>> method = AdapterSteering(peft_model)
        >>> ids = tok("Is ice cold?", return_tensors="pt").input_ids
        >>> with method.steering(peft_model, 2.0):  # twice the adapter's delta
        ...     logits = peft_model(ids).logits
        >>> kl = measure_kl(peft_model, tok, ["Is ice cold?"], method, 0.5, max_new_tokens=4)
        >>> len(kl.tokens[0]), kl.stats["max"]  # a fresh adapter (B = 0) has not moved the model yet
        (4, 0.0)
    """

    def __init__(self, model: PeftModel, adapter_name: str = "default") -> None:
        if not isinstance(model, PeftModel):
            raise TypeError(
                f"AdapterSteering needs a peft.PeftModel, got {type(model).__name__}; wrap the model first or use "
                "AdapterSteering.from_pretrained(base_model, adapter_dir)"
            )
        self.model = model
        self.adapter_name = adapter_name
        self._check(model)

    @classmethod
    def from_pretrained(
        cls, base_model: nn.Module, adapter_dir: str | os.PathLike, adapter_name: str = "default"
    ) -> AdapterSteering:
        """Load an adapter folder (peft's ``save_pretrained`` format) onto ``base_model``.

        The LoRA layers are injected into ``base_model`` in place (peft's ``PeftModel.from_pretrained``); the
        wrapped model is ``.model``. Raises ``FileNotFoundError`` when ``adapter_dir`` has no adapter config.
        """
        config = os.path.join(os.fspath(adapter_dir), "adapter_config.json")
        if not os.path.isfile(config):
            raise FileNotFoundError(f"adapter_dir={os.fspath(adapter_dir)!r} has no adapter_config.json (peft format)")
        peft_model = PeftModel.from_pretrained(base_model, os.fspath(adapter_dir), adapter_name=adapter_name)
        return cls(peft_model, adapter_name)

    def _check(self, root: nn.Module) -> list[tuple[str, LoraLayer]]:
        layers = _lora_layers(root, self.adapter_name)
        if not layers:
            present = sorted({a for m in root.modules() if isinstance(m, LoraLayer) for a in m.scaling})
            raise ValueError(
                f"adapter_name={self.adapter_name!r} has no LoRA layer in {type(root).__name__}; "
                f"adapters present: {present or 'none'}"
            )
        for name, layer in layers:
            if layer.disable_adapters or self.adapter_name not in layer.active_adapters:
                raise ValueError(
                    f"{name}: adapter {self.adapter_name!r} is not active (active: {list(layer.active_adapters)}, "
                    f"disabled: {layer.disable_adapters}); scaling it would change nothing"
                )
            variant = _variant(layer, self.adapter_name)
            if variant is not None:
                raise ValueError(
                    f"{name}: adapter {self.adapter_name!r} is a LoRA variant ({variant}), whose output is not "
                    "linear in its scaling; AdapterSteering supports vanilla LoRA only"
                )
            if self.adapter_name in getattr(layer, "merged_adapters", []):
                raise ValueError(
                    f"{name}: adapter {self.adapter_name!r} is merged into the base weights; unmerge it "
                    "(model.unmerge_adapter()) before steering with it"
                )
        return layers

    def _blocks_of(self, model: nn.Module, layers: LayerSpec) -> set[int]:
        """ids of the LoRA modules inside the chosen decoder blocks."""
        blocks = find_blocks(model)
        chosen = layers_from(layers, len(blocks))
        return {id(m) for i in chosen for m in blocks[i].modules() if isinstance(m, LoraLayer)}

    def steering(self, model: nn.Module, coeff: float, layers: LayerSpec | None = None) -> AbstractContextManager[None]:
        """Context manager scaling the adapter's delta by ``coeff`` (see the module docstring).

        Args:
            model: the ``PeftModel`` (or a module containing its LoRA layers).
            coeff: α, any finite sign; 0 is the base, 1 the adapter as trained.
            layers: decoder blocks (indices / depth fractions, :func:`~heal_pl.steering.hooks.layers_from`) whose
                LoRA layers get ``α``; the adapter's other LoRA layers get 0 (base). ``None``: every layer gets α.

        Raises:
            ValueError: a non-finite ``coeff``, a bad layer, or an unusable adapter (see the class).
        """
        if not math.isfinite(coeff):
            raise ValueError(f"coeff={coeff!r} must be finite")
        lora = self._check(model)
        inside = None if layers is None else self._blocks_of(model, layers)
        factors = [(layer, float(coeff) if inside is None or id(layer) in inside else 0.0) for _, layer in lora]
        return self._scaled(factors)

    def base(self, model: nn.Module) -> AbstractContextManager[None]:
        """The unsteered model for this method: the adapter at α = 0 (exactly the base's outputs)."""
        return self.steering(model, 0.0)

    @contextlib.contextmanager
    def _scaled(self, factors: list[tuple[LoraLayer, float]]) -> Iterator[None]:
        name = self.adapter_name
        saved = [(layer, layer.scaling[name]) for layer, _ in factors]
        try:
            for layer, factor in factors:
                layer.scaling[name] = factor * layer.scaling[name]
            yield
        finally:
            for layer, value in saved:
                layer.scaling[name] = value

    def __repr__(self) -> str:
        n = len(_lora_layers(self.model, self.adapter_name))
        return f"AdapterSteering(adapter_name={self.adapter_name!r}, lora_layers={n})"
