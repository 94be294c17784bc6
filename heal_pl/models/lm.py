"""The backbone and the head of any Hugging Face causal LM, plain or peft-wrapped.

heal_pl never asks a model for its full ``[B, T, V]`` logits in training: it runs the decoder backbone to get
hidden states (:func:`last_hidden`), picks the counted positions, and applies the LM head to those rows only
(:func:`heal_pl.barrier.kl.token_stats`). :func:`base_lm` finds the ``*ForCausalLM`` inside a peft wrapper,
:func:`find_blocks` its decoder blocks,
:func:`cache_kwargs` / :func:`output_cache` the KV cache a forward takes and returns.

**The head contract.** ``LMHead(lm)(last_hidden(lm, ids))`` equals ``lm(ids).logits`` (as float32) for every
family: the projection (bias and tied weights included) followed by the family's own logit transform
(:func:`head_transform`: Cohere ``logit_scale``, Granite ``logits_scaling``, Falcon-H1 ``lm_head_multiplier``,
Gemma-2/3 soft-cap). :func:`check_head` verifies it once per model on a short probe and raises, naming the class,
when a model does something else to its logits — a KL read from the wrong logits is never reported.
Switching adapters off for the ref is :mod:`heal_pl.adapters.switch`.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import weakref
from collections.abc import Iterator
from typing import Any

import torch
from peft import PeftModel
from torch import Tensor, nn
from transformers import PretrainedConfig, PreTrainedModel

from heal_pl.barrier.fused_head import HeadTransform, linear_f32

# config field -> how the family's forward applies it to lm_head's output (read from each modeling_*.py of
# transformers 5: cohere*/falcon_h1/muse_* multiply, granite* divide; hyperclovax multiplies by logits_scaling)
_MULTIPLIERS = ("logit_scale", "lm_head_multiplier", "output_multiplier")
_DIVISORS = ("logits_scaling",)
_MULTIPLY_INSTEAD = {"hyperclovax": ("logits_scaling",)}


def base_lm(model: nn.Module) -> PreTrainedModel:
    """The underlying ``*ForCausalLM`` of a plain or peft-wrapped model."""
    return model.get_base_model() if isinstance(model, PeftModel) else model


def head_transform(config: PretrainedConfig) -> HeadTransform:
    """The logit transform a model's forward applies after ``lm_head`` (see ``_MULTIPLIERS``), from its config."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    multiply_instead = _MULTIPLY_INSTEAD.get(getattr(text, "model_type", ""), ())
    multiplier = divisor = None
    for name in (*_MULTIPLIERS, *_DIVISORS):
        value = getattr(text, name, None)
        if value is None:
            continue
        if name in _MULTIPLIERS or name in multiply_instead:
            multiplier = float(value) if multiplier is None else multiplier * float(value)
        else:
            divisor = float(value)
    softcap = getattr(text, "final_logit_softcapping", None)
    return HeadTransform(multiplier, divisor, float(softcap) if softcap else None)


class LMHead(nn.Module):
    """The output projection followed by the model's own logit transform (:func:`head_transform`), float32 out.

    ``token_stats`` fuses it (``proj`` + ``transform``) when ``proj`` is a frozen ``nn.Linear``.
    """

    def __init__(self, lm: PreTrainedModel) -> None:
        super().__init__()
        head = lm.get_output_embeddings()
        if head is None:
            raise ValueError(f"{type(lm).__name__} has no output embeddings: it is not a causal LM")
        self.proj = head
        self.transform = head_transform(lm.config)

    def forward(self, hidden: Tensor) -> Tensor:
        if type(self.proj) is nn.Linear:
            return self.transform(linear_f32(hidden, self.proj.weight, self.proj.bias))
        return self.transform(self.proj(hidden).float())


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Every module of ``model`` in eval mode (no dropout), each one's own mode restored on exit."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


_HEAD_CHECKED: weakref.WeakKeyDictionary[nn.Module, float] = weakref.WeakKeyDictionary()
PROBE_LEN = 8


def check_head(model: nn.Module, where: str = "heal_pl") -> float:
    """Verify the head contract on ``model``: ``LMHead`` on the backbone's rows equals ``model(...).logits``.

    Runs once per model (cached): one no-grad forward of a ``PROBE_LEN``-token probe in eval mode, adapter as
    it is. The tolerance is ``rtol · max|logits|`` with ``rtol = 1e-4`` for a float32 head (the two paths run
    the same float32 operations) and ``4 · eps`` of a bf16/fp16 head (the model rounds its logits, and any
    transform, to that dtype; heal_pl's are float32). Returns the largest absolute difference.

    Raises:
        ValueError: the two differ — names the model class, the difference and what to do.
    """
    lm = base_lm(model)
    if lm in _HEAD_CHECKED:
        return _HEAD_CHECKED[lm]
    head = LMHead(lm)
    weight = head.proj.weight
    device = weight.device
    ids = (torch.arange(PROBE_LEN, device=device) * 7919 + 3) % lm.config.get_text_config().vocab_size
    ids = ids.unsqueeze(0)
    with torch.no_grad(), eval_mode(lm):
        own = lm(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits.float()
        mine = head(last_hidden(lm, ids, torch.ones_like(ids)))
    rtol = 1e-4 if weight.dtype == torch.float32 else 4 * torch.finfo(weight.dtype).eps
    scale = float(own.abs().max())
    diff = float((mine - own).abs().max()) if mine.shape == own.shape else float("inf")
    if not diff <= rtol * max(scale, 1e-6):
        raise ValueError(
            f"{where}: {type(lm).__name__} computes logits heal_pl cannot reproduce: its LM head path "
            f"(projection then {head.transform}) differs from {type(lm).__name__}(...).logits by {diff:.3g} "
            f"(max |logit| {scale:.3g}, tolerance {rtol:.1g} of it) on a {PROBE_LEN}-token probe, so every KL "
            "and NLL heal_pl reports for it would be wrong. The model transforms its logits (or its hidden "
            "states before the head) in a way heal_pl.models.lm.head_transform does not know: add that transform there "
            "(and a row to tests/models/test_families.py), or open an issue naming the model class."
        )
    _HEAD_CHECKED[lm] = diff
    return diff


def last_hidden(model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
    """Final hidden states ``[B, T, H]`` of the decoder backbone (adapter layers included when on)."""
    backbone = base_lm(model).get_decoder()
    out = backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return out.last_hidden_state


@functools.cache
def _cache_name(cls: type) -> str:
    params = inspect.signature(cls.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def cache_kwargs(module: nn.Module, cache: Any) -> dict[str, Any]:
    """``{name: cache}`` for ``module``'s forward: ``cache`` (transformers ≥ 5.2x), else ``past_key_values``.

    ``module`` is a causal LM (plain or peft-wrapped) or its decoder; the name is read off its signature.
    """
    return {_cache_name(type(base_lm(module))): cache}


def output_cache(out: Any) -> Any:
    """The cache a forward returned (``out.cache``, or ``out.past_key_values`` before transformers renamed it)."""
    return out["cache"] if "cache" in out else out["past_key_values"]


# Where the decoder blocks live, relative to the causal LM (first match wins).
BLOCK_PATHS: tuple[str, ...] = (
    "model.layers",  # Llama, Qwen2, Mistral, Gemma, Gemma 2, Phi-3, SmolLM2
    "model.language_model.layers",  # Gemma 3 and other multimodal wrappers
    "transformer.h",  # GPT-2, GPT-J, Falcon, Bloom
    "gpt_neox.layers",  # Pythia / GPT-NeoX
    "model.decoder.layers",  # OPT
    "layers",  # a bare decoder (LlamaModel, ...)
    "h",  # a bare GPT2Model
)


def _get_path(root: nn.Module, path: str) -> Any:
    obj: Any = root
    for name in path.split("."):
        obj = getattr(obj, name, None)
        if obj is None:
            return None
    return obj


def find_blocks(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of a plain or peft-wrapped causal LM, in depth order.

    Looks for the first non-empty ``nn.ModuleList`` at one of :data:`BLOCK_PATHS` (``model.layers`` for
    Llama / Qwen2 / Gemma, ``transformer.h`` for GPT-2, ...) under :func:`heal_pl.models.lm.base_lm` ``(model)``.

    Raises:
        ValueError: no path matches; the message lists the paths tried and the model's children.
    """
    lm = base_lm(model)
    for path in BLOCK_PATHS:
        blocks = _get_path(lm, path)
        if isinstance(blocks, nn.ModuleList) and len(blocks) > 0:
            return blocks
    children = ", ".join(f"{n}: {type(c).__name__}" for n, c in lm.named_children()) or "none"
    raise ValueError(
        f"cannot find the decoder blocks of {type(lm).__name__}: none of {', '.join(BLOCK_PATHS)} is a "
        f"non-empty nn.ModuleList; its children are [{children}]"
    )
