"""Which layers an adapter (LoRA or routed) adapts: target names and a depth range → qualified module names.

The default, ``("all-linear",)`` (peft's ``all-linear`` idea), is every linear layer inside the decoder blocks:
attention, MLP and linear-attention projections alike (``q_proj … down_proj`` on Llama-style models, ``qkv_proj`` /
``gate_up_proj`` on Phi-3, ``in_proj_qkv`` / ``in_proj_z`` / ``in_proj_a`` / ``in_proj_b`` / ``out_proj`` on
Qwen3.5's linear-attention layers, the Conv1D ``c_attn`` / ``c_proj`` / ``c_fc`` on GPT-2). It never includes
the LM head or the embeddings: they are not inside a block. Other names are suffixes of qualified names, matched
anywhere in the model (``q_proj`` adapts every ``….q_proj``); a name that selects the LM head is refused.

A depth range ``[lo, hi]`` (fractions of the ``L = num_hidden_layers`` decoder blocks) keeps the blocks
``floor(lo · L) ≤ i < ceil(hi · L)`` (at least one); a layer outside every block is then dropped.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from transformers.pytorch_utils import Conv1D

ALL_LINEAR = "all-linear"
DEFAULT_TARGETS: tuple[str, ...] = (ALL_LINEAR,)
LINEAR_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, Conv1D)
_BLOCK_INDEX = re.compile(r"\.(?:layers|h|blocks|layer)\.(\d+)\.")


def as_targets(target_modules: str | Sequence[str]) -> tuple[str, ...]:
    """A target list as a tuple: a lone string (``"all-linear"`` from YAML, say) is one name, not its letters."""
    return (target_modules,) if isinstance(target_modules, str) else tuple(target_modules)


def check_targets(field: str, target_modules: tuple[str, ...]) -> None:
    """``ValueError`` for an empty list, or ``all-linear`` mixed with other names (it already means all of them)."""
    if not target_modules:
        raise ValueError(f"{field} is empty; name at least one linear layer (e.g. q_proj) or use {ALL_LINEAR!r}")
    if ALL_LINEAR in target_modules and len(target_modules) > 1:
        raise ValueError(f"{field}={list(target_modules)}: {ALL_LINEAR!r} stands alone (it is every block linear)")


def depth_range(layers: tuple[float, float] | None, num_layers: int) -> list[int] | None:
    """Blocks ``floor(lo · L) ≤ i < ceil(hi · L)`` (at least one) of a depth-fraction range; ``None`` = all."""
    if layers is None:
        return None
    first = math.floor(layers[0] * num_layers)
    last = max(math.ceil(layers[1] * num_layers), first + 1)
    return list(range(first, min(last, num_layers)))


def block_index(name: str) -> int | None:
    """The decoder-block index in a qualified module name (``model.layers.3.mlp.up_proj`` → 3), else ``None``."""
    match = _BLOCK_INDEX.search(f".{name}.")
    return None if match is None else int(match.group(1))


def linear_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every ``nn.Linear`` and transformers ``Conv1D`` of ``model`` by qualified name, in module order. A peft adapter
    layer already there (a stack of adapters, e.g. the steer → heal rounds' student) stands for the layer it wraps,
    under that layer's own name; its ``base_layer`` and its adapters' ``lora_A`` / ``lora_B`` are not targets."""
    found: dict[str, nn.Module] = {}
    inside = None  # the adapter layer whose submodules are being skipped (named_modules is pre-order)
    for n, m in model.named_modules():
        if inside is not None and n.startswith(inside):
            continue
        if isinstance(m, BaseTunerLayer):
            found[n], inside = m.get_base_layer(), f"{n}."
        elif isinstance(m, LINEAR_TYPES):
            found[n] = m
    return found


def _decoder_prefix(model: nn.Module) -> str:
    """The qualified name of the decoder (``get_decoder()``) followed by a dot; ``""`` when there is none."""
    get_decoder = getattr(model, "get_decoder", None)
    decoder = get_decoder() if callable(get_decoder) else None
    if decoder is None or decoder is model:
        return ""
    for name, module in model.named_modules():
        if module is decoder:
            return f"{name}."
    return ""


def refuse_head(model: nn.Module, chosen: list[str], field: str) -> None:
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


def _num_layers(model: nn.Module, field: str) -> int:
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    n = getattr(config, "num_hidden_layers", None)
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"{field} (a depth range) needs config.num_hidden_layers, which {type(model).__name__} lacks")
    return n


def resolve_targets(
    model: nn.Module, target_modules: Sequence[str], layers: tuple[float, float] | None, field: str
) -> list[str]:
    """The qualified names of the linear layers an adapter with these targets and depth range adapts.

    Args:
        model: the (unwrapped) causal LM.
        target_modules: ``("all-linear",)`` or suffixes of qualified names (see the module docstring).
        layers: depth range ``[lo, hi]`` or ``None`` (every block).
        field: the config prefix for messages (``lora`` or ``routed``).

    Raises:
        ValueError: a name matches no linear layer (the message lists the model's linear layers), the model has
            no linear layer in its decoder blocks, a name selects the LM head (refused), the depth range needs
            a ``num_hidden_layers`` the config lacks, or nothing is selected.
    """
    targets = as_targets(target_modules)
    check_targets(f"{field}.target_modules", targets)
    linear = linear_layers(model)
    suffixes = sorted({n.rsplit(".", 1)[-1] for n in linear})
    if targets == DEFAULT_TARGETS:
        prefix = _decoder_prefix(model)
        chosen = [n for n in linear if n.startswith(prefix) and block_index(n[len(prefix) :]) is not None]
        if not chosen:
            raise ValueError(
                f"{field}.target_modules={ALL_LINEAR!r}: {type(model).__name__} has no linear layer inside numbered "
                f"decoder blocks; name the layers to adapt (linear layers: {suffixes})"
            )
    else:
        missing = [t for t in targets if t not in suffixes]
        if missing:
            raise ValueError(
                f"{field}.target_modules {missing} not found in {type(model).__name__}; linear layers: {suffixes}"
            )
        chosen = [n for n in linear if n.rsplit(".", 1)[-1] in targets]
        refuse_head(model, chosen, f"{field}.target_modules")
    if layers is not None:
        n_layers = _num_layers(model, f"{field}.layers")
        keep = set(depth_range(layers, n_layers) or [])
        chosen = [n for n in chosen if block_index(n) in keep]
        if not chosen:
            raise ValueError(f"{field}.layers={list(layers)} selects no block of {n_layers}")
    return chosen
