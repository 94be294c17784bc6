"""The LoRA student: a peft adapter on chosen linear layers, optionally on a depth range.

``ΔW = (alpha / r) · B A`` per adapted layer; ``B`` starts at zero, so the student starts equal to
the base. The base ("ref") is the same model with the adapter switched off (``heal_pl.lm.adapter_off``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from torch import Tensor
from transformers import PreTrainedModel

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LoRASpec:
    """Which layers get a LoRA adapter, and its shape.

    Args:
        r: rank.
        alpha: scale numerator; the update is ``(alpha / r) · B A``.
        dropout: dropout on the adapter's input.
        target_modules: names (suffixes) of the linear layers to adapt.
        layers: optional depth range ``[lo, hi]`` as fractions of the decoder depth: blocks
            ``floor(lo · L) ≤ i < ceil(hi · L)`` are adapted; ``None`` adapts every block.
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = DEFAULT_TARGETS
    layers: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"lora.r={self.r} must be >= 1")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout={self.dropout} must lie in [0, 1)")
        if not self.target_modules:
            raise ValueError("lora.target_modules is empty; name at least one linear layer, e.g. q_proj")
        if self.layers is not None:
            lo, hi = self.layers
            if not 0.0 <= lo < hi <= 1.0:
                raise ValueError(f"lora.layers={list(self.layers)} must satisfy 0 <= lo < hi <= 1 (depth fractions)")

    def layer_indices(self, num_layers: int) -> list[int] | None:
        return depth_range(self.layers, num_layers)


def depth_range(layers: tuple[float, float] | None, num_layers: int) -> list[int] | None:
    """Blocks ``floor(lo · L) ≤ i < ceil(hi · L)`` (at least one) of a depth-fraction range; ``None`` = all."""
    if layers is None:
        return None
    first = math.floor(layers[0] * num_layers)
    last = max(math.ceil(layers[1] * num_layers), first + 1)
    return list(range(first, min(last, num_layers)))


def refuse_head(model: torch.nn.Module, chosen: list[str], field: str) -> None:
    """Raise when a chosen (qualified) module name is the LM head: the ref's rows go through the head, so an
    adapter there would leak into the ref and the barrier KL would be wrong (issue 12)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    hit = [n for n in chosen if head is not None and model.get_submodule(n) is head]
    if hit:
        raise ValueError(
            f"{field} selects {hit[0]!r}, the LM head of {type(model).__name__}: heal_pl does not adapt the head "
            "(its ref reads the base's rows through the head, so a head adapter would leak into the ref); "
            "adapt the decoder's linear layers only"
        )


def wrap_lora(model: PreTrainedModel, spec: LoRASpec) -> PeftModel:
    """Wrap ``model`` in a fresh peft LoRA adapter; base weights are frozen by peft. The LM head is refused."""
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in spec.target_modules if t not in present]
    if missing:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise ValueError(f"lora.target_modules {missing} not found in {type(model).__name__}; linear layers: {linear}")
    refuse_head(model, [n for n, _ in model.named_modules() if n.rsplit(".", 1)[-1] in spec.target_modules],
                "lora.target_modules")  # fmt: skip
    config = LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=list(spec.target_modules),
        layers_to_transform=spec.layer_indices(model.config.num_hidden_layers),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


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
