"""The LoRA student: a peft adapter on chosen linear layers (default: every linear layer of the decoder blocks,
see ``heal_pl.adapters.targets``), optionally on a depth range.

``ΔW = (alpha / r) · B A`` per adapted layer; ``B`` starts at zero, so the student starts equal to
the base. The base ("ref") is the same model with the adapter switched off (``heal_pl.adapters.switch.adapter_off``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import save_file
from torch import Tensor
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D

from heal_pl.adapters.targets import (
    DEFAULT_TARGETS,
    as_targets,
    check_targets,
    depth_range,
    refuse_head,
    resolve_targets,
)

FRESH = "default"  # the name of the adapter wrap_lora adds (peft's default name)
__all__ = ["DEFAULT_TARGETS", "FRESH", "LoRASpec", "depth_range", "refuse_head", "spectral_norms", "wrap_lora"]


@dataclass(frozen=True)
class LoRASpec:
    """Which layers get a LoRA adapter, and its shape.

    Args:
        r: rank.
        alpha: scale numerator; the update is ``(alpha / r) · B A``.
        dropout: dropout on the adapter's input.
        target_modules: ``("all-linear",)`` (default: every linear / Conv1D layer inside the decoder blocks,
            never the LM head or the embeddings) or names (suffixes) of the linear layers to adapt.
        layers: optional depth range ``[lo, hi]`` as fractions of the decoder depth: blocks
            ``floor(lo · L) ≤ i < ceil(hi · L)`` are adapted; ``None`` adapts every block.
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = DEFAULT_TARGETS
    layers: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "target_modules", as_targets(self.target_modules))
        if self.r < 1:
            raise ValueError(f"lora.r={self.r} must be >= 1")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout={self.dropout} must lie in [0, 1)")
        check_targets("lora.target_modules", self.target_modules)
        if self.layers is not None:
            lo, hi = self.layers
            if not 0.0 <= lo < hi <= 1.0:
                raise ValueError(f"lora.layers={list(self.layers)} must satisfy 0 <= lo < hi <= 1 (depth fractions)")

    def layer_indices(self, num_layers: int) -> list[int] | None:
        return depth_range(self.layers, num_layers)


def wrap_lora(model: PreTrainedModel | PeftModel, spec: LoRASpec) -> PeftModel:
    """Wrap ``model`` in a fresh peft LoRA adapter on the layers ``spec`` selects; base weights are frozen by peft.

    ``model`` may already be a ``PeftModel`` holding earlier adapters (a stack, e.g. the steer → heal rounds'
    student): the fresh adapter is then added to it as ``"default"`` and made active *together* with the
    adapters active before (every layer computes ``W x + Σ_k s_k B_k A_k x``), and only the fresh adapter is
    trainable (peft's ``set_adapter`` would unfreeze them all; they are frozen again here).

    The LM head is refused as a target (the ref reads the base's rows through it).

    Raises:
        ValueError: a target that matches no linear layer (listing the model's linear layers), a depth
            range that selects nothing (see :func:`heal_pl.adapters.targets.resolve_targets`), or a stack that
            already has an adapter named ``"default"``.
    """
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    chosen = resolve_targets(base, spec.target_modules, spec.layers, "lora")
    config = LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=chosen,  # qualified names: exactly the resolved layers, depth range applied
        fan_in_fan_out=all(isinstance(_unwrapped(base.get_submodule(n)), Conv1D) for n in chosen),  # GPT-2's [in, out]
        task_type="CAUSAL_LM",
    )
    if not isinstance(model, PeftModel):
        return get_peft_model(model, config)
    if FRESH in model.peft_config:
        raise ValueError(f"wrap_lora: the stack already has an adapter named {FRESH!r} ({list(model.peft_config)})")
    frozen = [a for a in model.active_adapters if a != FRESH]
    model.add_adapter(FRESH, config)
    model.base_model.set_adapter([*frozen, FRESH])
    for layer in model.modules():
        if isinstance(layer, BaseTunerLayer):
            for attr in layer.adapter_layer_names:
                for name, part in getattr(layer, attr).items():
                    part.requires_grad_(name == FRESH)
    return model


def _unwrapped(module: torch.nn.Module) -> torch.nn.Module:
    return module.get_base_layer() if isinstance(module, BaseTunerLayer) else module


def spectral_norms(model: PeftModel, n_iter: int = 8) -> Tensor:
    r"""σ_max(ΔW) of every adapted layer, differentiable: shape ``[n_layers]``.

    ``ΔW = s · B A`` is never formed. ``n_iter`` no-grad power iterations on the low-rank product
    find the top singular pair ``(u, v)``; then :math:`\sigma = u^\top (\Delta W v)` carries the
    gradient (:math:`\partial\sigma/\partial\Delta W = u v^\top`). An all-zero ΔW (the start) gives 0.
    """
    sigmas = []
    for module in model.modules():
        if not isinstance(module, LoraLayer):
            continue
        for name in module.active_adapters:
            if name not in module.lora_A:
                continue
            A, B = module.lora_A[name].weight, module.lora_B[name].weight  # [r, in], [out, r]
            s = module.scaling[name]
            with torch.no_grad():
                gen = torch.Generator(device="cpu").manual_seed(0)
                v = torch.randn(A.shape[1], generator=gen).to(A)
                for _ in range(n_iter):
                    u = torch.nn.functional.normalize(B @ (A @ v), dim=0)
                    v = torch.nn.functional.normalize(A.T @ (B.T @ u), dim=0)
                u = torch.nn.functional.normalize(B @ (A @ v), dim=0)
            sigmas.append(s * (u @ (B @ (A @ v))))
    if not sigmas:
        raise ValueError("spectral penalty: the model has no LoRA layers")
    return torch.stack(sigmas)


def save_lora(model: PeftModel, tensors: dict[str, Tensor], folder: str | os.PathLike) -> None:
    """Write ``folder`` in peft's format (``adapter_config.json``, ``adapter_model.safetensors``; load it with
    ``PeftModel.from_pretrained``) from the adapter ``tensors`` keyed as in ``model.state_dict()``.

    The model itself is never read: under FSDP its modules are wrapped (peft's own ``save_pretrained`` finds no
    adapter there) and its weights sharded; the caller gathers ``tensors``
    (:func:`heal_pl.models.fsdp.adapter_tensors`).
    """
    active = model.active_adapters  # a stack: the adapter whose tensors these are (the trained one)
    name = active[0] if len(active) == 1 else next(a for a in active if any(f".{a}." in k for k in tensors))
    weights = {k.replace(f".{name}.", "."): v.detach().cpu().contiguous() for k, v in tensors.items()}
    os.makedirs(folder, exist_ok=True)
    model.peft_config[name].save_pretrained(folder)
    save_file(weights, os.path.join(folder, "adapter_model.safetensors"), metadata={"format": "pt"})
