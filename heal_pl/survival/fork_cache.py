"""Which caches the fork reads can reuse exactly, and the caches they read on (docs/maths.md §4.3,
:mod:`heal_pl.survival.forks`).

A fork ``j`` reads on "the rollout's cache cropped to its first ``k_j`` positions". Per layer kind:

* ``full_attention``: every key/value is kept; cropping is a mask (:mod:`heal_pl.survival.fork_mask`).
* ``sliding_attention`` (Gemma-2/3, Mistral/Qwen2 with a window ``W``): transformers keeps only the last ``W − 1``
  positions, which is exact only while ``W`` covers prompt + ``w``. The fork cache keeps EVERY position instead
  (the memory of a full-attention layer), and the mask adds the window: a query at position ``p`` sees the keys at
  positions ``p − W < q ≤ p``, as the model's own sliding mask does.
* ``linear_attention`` (Qwen3.5's gated delta net, and the other layers on transformers' linear-attention cache):
  the state after ``k`` positions (a conv window and a recurrent state of fixed size) cannot be recovered from a
  later one, so it is snapshotted at each fork point while the rollout (or a prefill) passes ``k``, and the
  fork's feed starts from the snapshot. A recurrent layer has no mask to crop with, so those forks are read one
  per row (``batched``) instead of packed into one row.

Positions are Python ints throughout: :func:`cached_positions` counts the attention layers' keys, and every fork
point is passed through ``operator.index`` before it keys a snapshot. transformers' own ``Cache.get_seq_length()``
reads layer 0, which from 5.25 on counts a linear-attention layer's tokens in a 0-d tensor (a tensor hashes by
identity, so it could never match a snapshot's key).

Anything else (another cache layer class, chunked attention, an attention kernel that takes no 4-D mask) gets no
plan: the forks are recomputed (:func:`heal_pl.survival.forks.fork_probe_recompute`), with one log line.

:func:`rollout` (greedy, snapshotting at the forks) and :func:`prefill` (from given tokens) build the cache.
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn
from transformers import DynamicCache

from heal_pl.models.lm import base_lm, cache_kwargs

try:  # the layer classes of transformers' per-layer caches; older versions lack some (then: no plan)
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer
except ImportError:  # pragma: no cover - transformers < 4.56
    DynamicLayer = DynamicSlidingWindowLayer = None  # type: ignore[assignment,misc]
try:
    from transformers.cache_utils import (
        LinearAttentionAndFullAttentionLayer,
        LinearAttentionAndSlidingWindowAttentionLayer,
        LinearAttentionCacheLayerMixin,
        LinearAttentionLayer,
    )
except ImportError:  # pragma: no cover - transformers without linear-attention caches
    LinearAttentionLayer = LinearAttentionAndFullAttentionLayer = None  # type: ignore[assignment,misc]
    LinearAttentionAndSlidingWindowAttentionLayer = LinearAttentionCacheLayerMixin = None  # type: ignore[assignment,misc]

log = logging.getLogger("heal_pl")

KINDS = ("full_attention", "sliding_attention", "linear_attention")
MASKED_ATTENTION = ("eager", "sdpa")  # kernels that take an arbitrary additive 4-D mask


@dataclass(frozen=True)
class ForkPlan:
    """How the forks of one model are read on its cache.

    Attributes:
        mode: ``packed`` (every fork of a batch in one row, attention-only caches) or ``batched`` (one row per
            fork, each starting from its snapshot: caches with recurrent layers).
        kinds: the layer kind of each decoder layer (in :data:`KINDS`).
        window: the sliding window ``W`` of the ``sliding_attention`` layers (``None``: there are none).
        mapping: the model takes ``{kind: mask}`` (mixed kinds); otherwise one mask for every layer.
    """

    mode: Literal["packed", "batched"]
    kinds: tuple[str, ...]
    window: int | None
    mapping: bool

    def masks(self, build: Callable[[int | None], Tensor]) -> Tensor | dict[str, Tensor | None]:
        """The attention mask argument: ``build(window)`` per attention kind, ``None`` for recurrent layers."""
        made = {"full_attention": lambda: build(None), "sliding_attention": lambda: build(self.window),
                "linear_attention": lambda: None}  # fmt: skip
        kinds = sorted(set(self.kinds))
        if not self.mapping:
            return made[kinds[0]]()
        return {k: made[k]() for k in kinds}


class ForkCache(DynamicCache):
    """A ``DynamicCache`` whose sliding-window layers keep every position, with the recurrent layers' snapshots.

    ``states[k]``: the fixed-size state of every linear-attention layer after ``k`` positions (``{}`` for an
    attention-only cache); filled by :func:`snapshot`.
    """

    plan: ForkPlan
    states: dict[int, list[list[tuple[Tensor | None, Tensor | None]] | None]]


def cached_positions(cache: DynamicCache) -> int:
    """The number of positions ``C`` a cache holds, as a Python int: the keys of its first attention layer.

    Not ``cache.get_seq_length()``: that reads layer 0 whatever its kind, and a linear-attention layer counts its
    tokens in a 0-d tensor (transformers ≥ 5.25), one that its decode kernel moves on in place. A cache with no
    attention layer (or none filled yet) falls back to that count, converted.
    """
    for layer in cache.layers:
        if getattr(layer, "keys", None) is not None and layer.is_initialized:
            return int(layer.keys.shape[-2])
    return operator.index(cache.get_seq_length())


def _layer_classes() -> dict[type, type]:
    """transformers' layer class -> the class the fork cache uses instead (sliding layers keep every position)."""
    if DynamicLayer is None:
        return {}
    same: dict[type, type] = {DynamicLayer: DynamicLayer, DynamicSlidingWindowLayer: DynamicLayer}
    if LinearAttentionLayer is not None:
        same |= {LinearAttentionLayer: LinearAttentionLayer,
                 LinearAttentionAndFullAttentionLayer: LinearAttentionAndFullAttentionLayer,
                 LinearAttentionAndSlidingWindowAttentionLayer: LinearAttentionAndFullAttentionLayer}  # fmt: skip
    return same


def _kind(layer: object, config_kind: str | None) -> str:
    if LinearAttentionCacheLayerMixin is not None and isinstance(layer, LinearAttentionCacheLayerMixin):
        return "linear_attention" if config_kind in (None, "linear_attention") else f"linear+{config_kind}"
    if getattr(layer, "is_sliding", False):
        return "sliding_attention" if config_kind in (None, "sliding_attention") else str(config_kind)
    return config_kind or "full_attention"


def _plan_or_reason(model: nn.Module) -> ForkPlan | str:
    lm = base_lm(model)
    config = lm.config.get_text_config(decoder=True) if hasattr(lm.config, "get_text_config") else lm.config
    attn = getattr(config, "_attn_implementation", None)  # the decoder's: a wrapper's top level may name another
    if attn not in MASKED_ATTENTION:
        return f"its attention kernel {attn!r} takes no 4-D fork mask (the fast path needs one of {MASKED_ATTENTION})"
    if getattr(config, "attention_chunk_size", None) is not None:
        return "it has chunked-attention layers"
    try:
        layers = DynamicCache(config=config).layers
    except Exception as err:  # noqa: BLE001 (any failure here means: no plan, recompute)
        return f"its cache cannot be built from the config ({type(err).__name__}: {err})"
    classes = _layer_classes()
    odd = sorted({type(x).__name__ for x in layers if type(x) not in classes})
    if odd:
        return f"its cache has layers of class {', '.join(odd)}, which cannot be cropped back exactly"
    config_kinds = getattr(config, "layer_types", None)
    kinds = tuple(_kind(x, config_kinds[i] if config_kinds else None) for i, x in enumerate(layers))
    if set(kinds) - set(KINDS):
        return f"its layer kinds {sorted(set(kinds) - set(KINDS))} are not among {KINDS}"
    windows = {int(x.sliding_window) for x in layers if getattr(x, "is_sliding", False)}
    if len(windows) > 1:
        return f"its sliding-window layers have several windows {sorted(windows)}"
    mapping = len(set(kinds)) > 1
    if mapping and not config_kinds:
        return "it mixes layer kinds without config.layer_types (no per-kind mask)"
    mode = "batched" if "linear_attention" in kinds else "packed"
    return ForkPlan(mode, kinds, windows.pop() if windows else None, mapping)


_LOGGED: set[tuple[str, str]] = set()


def fork_plan(model: nn.Module) -> ForkPlan | None:
    """The :class:`ForkPlan` of ``model``, or ``None`` (forks are recomputed; logged once per model class)."""
    plan = _plan_or_reason(model)
    if isinstance(plan, ForkPlan):
        return plan
    key = (type(base_lm(model)).__name__, plan)
    if key not in _LOGGED:
        _LOGGED.add(key)
        log.info("survival forks: %s cannot reuse its rollout cache exactly (%s); recomputing every fork instead",
                 key[0], plan)
    return None


def new_cache(model: nn.Module, plan: ForkPlan) -> ForkCache:
    """An empty :class:`ForkCache` for ``model`` (its own layer classes, sliding ones keeping every position)."""
    lm = base_lm(model)
    config = lm.config.get_text_config(decoder=True) if hasattr(lm.config, "get_text_config") else lm.config
    cache = ForkCache(config=config)
    classes = _layer_classes()
    cache.layers = [_fresh(classes[type(x)], x) for x in cache.layers]
    cache.plan, cache.states = plan, {}
    return cache


def _fresh(cls: type, old: object) -> object:
    if LinearAttentionCacheLayerMixin is not None and issubclass(cls, LinearAttentionCacheLayerMixin):
        return cls(number_of_states=old.number_of_states)
    return cls()


def snapshot(cache: ForkCache, k: int) -> None:
    """Store (clones of) every linear-attention layer's conv and recurrent states as ``cache.states[k]``."""
    if cache.plan.mode != "batched":
        return
    k = operator.index(k)  # an int key: a 0-d tensor would hash by identity and never be found again
    states = []
    for layer in cache.layers:
        if LinearAttentionCacheLayerMixin is None or not isinstance(layer, LinearAttentionCacheLayerMixin):
            states.append(None)
            continue
        states.append([(layer.conv_states[s].clone() if layer.is_conv_states_initialized[s] else None,
                        layer.recurrent_states[s].clone() if layer.is_recurrent_states_initialized[s] else None)
                       for s in range(layer.number_of_states)])  # fmt: skip
    cache.states[k] = states


def read_cache(model: nn.Module, cache: ForkCache, keeps: Sequence[int]) -> ForkCache:
    """A fresh cache of ``len(keeps)`` rows: row ``j`` holds the attention keys/values of the first ``max(keeps)``
    positions (the mask hides those past ``keeps[j]``) and the recurrent states snapshotted at ``keeps[j]``."""
    keeps = [operator.index(k) for k in keeps]
    missing = sorted(set(keeps) - set(cache.states))
    if missing:
        raise ValueError(f"cache has no recurrent-state snapshot at positions {missing}; pass the cache from "
                         "rollout(..., forks=...) with these forks, or none")
    m, kmax = len(keeps), max(keeps)
    out = new_cache(model, cache.plan)
    for i, (src, dst) in enumerate(zip(cache.layers, out.layers, strict=True)):
        if getattr(src, "keys", None) is not None and src.is_initialized:
            keys = src.keys[:, :, :kmax].expand(m, -1, -1, -1)
            values = src.values[:, :, :kmax].expand(m, -1, -1, -1)
            dst.lazy_initialization(keys, values)
            dst.keys, dst.values = keys, values
        if LinearAttentionCacheLayerMixin is None or not isinstance(src, LinearAttentionCacheLayerMixin):
            continue
        for s in range(src.number_of_states):
            conv = [cache.states[k][i][s][0] for k in keeps]
            rec = [cache.states[k][i][s][1] for k in keeps]
            if conv[0] is not None:
                dst.lazy_initialization(conv_states=torch.cat(conv), state_idx=s,
                                        conv_kernel_size=src.conv_kernel_size[s])  # fmt: skip
                dst.conv_states[s] = torch.cat(conv)
            if rec[0] is not None:
                dst.lazy_initialization(recurrent_states=torch.cat(rec), state_idx=s)
                dst.recurrent_states[s].copy_(torch.cat(rec))
            dst.has_previous_state[s] = src.has_previous_state[s]
    return out


def rollout(
    model: nn.Module, prompt_ids: list[int], w: int, eos: Tensor, forks: Sequence[int] | None = None
) -> tuple[list[int], ForkCache]:
    """Greedy ``y_1 … y_g`` (current context) and the :class:`~heal_pl.survival.fork_cache.ForkCache` of
    ``x ⊕ y_<g`` (``P + g − 1`` positions; sliding-window layers keep every position).

    On a cache with recurrent (linear-attention) layers the fixed-size state is snapshotted after ``P + t``
    positions for each ``t`` in ``forks`` (``None``: after every step) and after the last step.

    Raises:
        ValueError: the model's cache cannot be forked exactly (:func:`~heal_pl.survival.fork_cache.fork_plan`).
    """
    plan = require_plan(model)
    cache = new_cache(model, plan)
    want = None if forks is None else {int(t) for t in forks}
    device = next(model.parameters()).device
    eos_set = set(eos.tolist())
    cur = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    pos = torch.arange(len(prompt_ids), device=device)[None]
    gen: list[int] = []
    for step in range(w):
        logits = model(input_ids=cur, position_ids=pos, use_cache=True, logits_to_keep=1,
                       **cache_kwargs(model, cache)).logits  # fmt: skip
        if want is None or step in want:
            snapshot(cache, len(prompt_ids) + step)
        nxt = int(logits[0, -1].argmax(-1))
        gen.append(nxt)
        if nxt in eos_set or len(gen) == w:
            break
        cur, pos = torch.tensor([[nxt]], device=device), pos[:, -1:] + 1
    if cached_positions(cache) not in cache.states:
        snapshot(cache, cached_positions(cache))  # the fork at t = g starts here
    return gen, cache


def require_plan(model: nn.Module) -> ForkPlan:
    plan = fork_plan(model)
    if plan is None:
        raise ValueError(f"model: the cache of {type(base_lm(model)).__name__} cannot be forked exactly (see the "
                         "log line); use fork_probe_recompute")
    return plan


def prefill(model: nn.Module, plan: ForkPlan, prompt_ids: list[int], gen: list[int], keeps: list[int]) -> ForkCache:
    """The cache of ``x ⊕ y_<g`` (``P + g − 1`` positions) in the current (steering) context: one forward, or one
    per stretch between fork points on a cache with recurrent layers (snapshotted at each ``keeps``)."""
    device = next(model.parameters()).device
    backbone, cache = base_lm(model).get_decoder(), new_cache(model, plan)
    seq = (prompt_ids + gen)[:-1]
    cuts = sorted({k for k in keeps if 0 < k < len(seq)} | {len(seq)}) if plan.mode == "batched" else [len(seq)]
    start = 0
    for end in cuts:
        backbone(input_ids=torch.tensor([seq[start:end]], dtype=torch.long, device=device),
                 position_ids=torch.arange(start, end, device=device)[None], use_cache=True,
                 **cache_kwargs(backbone, cache))  # fmt: skip
        snapshot(cache, end)
        start = end
    return cache
