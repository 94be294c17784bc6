"""KL(steered ‖ base) along the steered model's own greedy trajectory (docs/maths.md §3.3).

For each prompt ``x`` (text already chat-formatted, tokenized with ``add_special_tokens=False``):

1. greedy-generate ``y_1 … y_n`` under the steering context (``method``, ``coeff``), ``n ≤ T``, stopping at
   the first end-of-sequence token (which is kept: it is a position like any other);
2. score those same tokens with one steered forward and one base forward over ``x ⊕ y``;
3. per generated position ``t``, in float32,

       KL_t = Σ_v p_s(v | x, y_<t) · (log p_s(v | x, y_<t) − log p_b(v | x, y_<t))

   with ``p_s`` steered and ``p_b`` base; ``y_t = argmax p_s(· | x, y_<t)`` (greedy), so the steered
   forward of step 2 recomputes the distributions that produced the tokens (and at α = 0 the two forwards are
   the same computation: KL exactly 0);
4. pool every prompt's ``KL_1 … KL_n`` (positions after its EOS are never counted) and report
   mean, p50, p90, p95, p99, max and rms = ``sqrt(mean KL²)``. Quantiles interpolate linearly (numpy's
   default, :func:`heal_pl.barrier.kl.quantile`).

**Memory.** No ``[B, n, V]`` tensor is built: each forward keeps only its final hidden rows at the counted
positions (``[N, H]``, ``N ≤ B · n``), and step 3 applies the LM head and the log-softmax ``chunk_size`` rows at a
time (:func:`heal_pl.barrier.kl.token_stats`; a plain linear head runs the fused kernel of
:mod:`heal_pl.barrier.fused_head`, one ``[3 · chunk_size, V]`` float32 workspace), so the KL step's peak grows
with ``chunk_size · V``, not with ``batch_size · max_new_tokens · V``. The result does not depend on ``chunk_size``
beyond float32 rounding.

Prompts are batched with LEFT padding (the real tokens of every row end at the same column, so the next
token is always read from the last column); position ids count real tokens only, so a prompt's numbers
do not depend on the batch it is in (up to float rounding).

"Base" is the model outside any steering context, except for a method that defines its own
``base(model)`` context (an adapter: the base is α = 0, while outside the context the adapter is on).

With ``base_prompts`` the base scores the same generated tokens after another prefix: ``p_b(v | x', y_<t)``
with ``x'`` the base prompt (the prompt baseline of :mod:`heal_pl.steering.prompt_baseline`: ``x`` holds a system
prompt, ``x'`` does not). Each side is left-padded on its own, so the generated tokens sit in the same last
columns of both and their position ids count each side's own real tokens.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from heal_pl import shards
from heal_pl.barrier.kl import Head, quantile, token_stats
from heal_pl.data.prompts import encode_prompts
from heal_pl.models.context import checked_context
from heal_pl.models.generate import eos_ids, greedy_generate, left_pad, positions
from heal_pl.models.lm import LMHead, base_lm, cache_kwargs, check_head
from heal_pl.steering.hooks import LayerSpec, SteeringMethod

Stat = Literal["mean", "p50", "p90", "p95", "p99", "max", "rms"]  # a trajectory statistic of the per-token KL
STATS: tuple[str, ...] = get_args(Stat)


@dataclass
class TrajectoryKL:
    """The result of :func:`measure_kl`.

    Attributes:
        kl: per prompt, float32 ``[n_i]``: KL_t(steered ‖ base) at each generated position (EOS included).
        tokens: per prompt, the generated token ids ``[n_i]`` (long), ending at the EOS if one was produced.
        stats: mean, p50, p90, p95, p99, max, rms over all pooled (prompt × position) values.
        coeff: the coefficient the trajectories were generated at.
    """

    kl: list[Tensor]
    tokens: list[Tensor]
    stats: dict[str, float] = field(default_factory=dict)
    coeff: float = float("nan")

    @property
    def pooled(self) -> Tensor:
        """Every counted position's KL, prompt after prompt: float32 ``[Σ n_i]``."""
        return torch.cat(self.kl)


@dataclass(frozen=True)
class Rollout:
    """One batch of :func:`measure_kl`'s greedy rollouts, as :func:`measure_kl`'s ``on_rollout`` sees it.

    Attributes:
        start: the index of the batch's first prompt.
        ids, mask: the left-padded prompts ``[B, P]``.
        new_ids, new_mask: the generated tokens ``[B, n]`` and their mask (1 up to and including each row's EOS).
        cache: the cache of the steered scoring forward (``measure_kl``'s ``cache()``): the prompts and the
            generated tokens, ``P + n`` columns (a row's columns after its EOS hold padding); ``None`` without
            ``cache``.
    """

    start: int
    ids: Tensor
    mask: Tensor
    new_ids: Tensor
    new_mask: Tensor
    cache: Any


def trajectory_stats(kl: Tensor) -> dict[str, float]:
    """mean, p50, p90, p95, p99, max and rms (``sqrt(mean KL²)``, no epsilon) of a 1-D float tensor.

    Example:
        >>> trajectory_stats(torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0]))["p90"]
        3.6
    """
    if kl.dim() != 1 or kl.numel() == 0:
        raise ValueError(f"trajectory_stats needs a non-empty 1-D tensor, got shape {tuple(kl.shape)}")
    x = kl.double()
    out = {"mean": x.mean(), "max": x.max(), "rms": x.square().mean().sqrt()}
    out |= {f"p{q}": quantile(x, q / 100) for q in (50, 90, 95, 99)}
    return {k: float(out[k]) for k in STATS}


def base_context(method: SteeringMethod, model: nn.Module) -> AbstractContextManager[None]:
    """The unsteered model for ``method``: its ``base(model)`` context if it has one, else no change."""
    base = getattr(method, "base", None)
    return base(model) if callable(base) else contextlib.nullcontext()


@dataclass(frozen=True)
class Unsteered:
    """The unsteered model as a steering method, at any coefficient: ``method``'s base (:func:`base_context`; an
    adapter at α = 0), or no edit when ``method`` is ``None`` (the survival probe check before any calibration)."""

    method: SteeringMethod | None = None

    def steering(self, model: nn.Module, coeff: float, layers: LayerSpec | None = None) -> AbstractContextManager[None]:
        return contextlib.nullcontext() if self.method is None else base_context(self.method, model)


def _generated_rows(model: nn.Module, ids: Tensor, mask: Tensor, counted: Tensor, cache: Any = None) -> Tensor:
    """Final hidden rows ``[N, H]`` that predict the generated tokens where ``counted`` (bool ``[B, n]``) is set.

    Row ``t`` predicts token ``t + 1``, so the rows are the ``n`` columns before the last; they come batch-major,
    in the order of ``new_ids[counted]``. Only ``[N, H]`` outlives the call, never ``[B, n, V]``. With an (empty)
    ``cache``, the forward fills it.
    """
    n_new = counted.shape[1]
    decoder = base_lm(model).get_decoder()
    hidden = decoder(input_ids=ids, attention_mask=mask, position_ids=positions(mask), use_cache=cache is not None,
                     **(cache_kwargs(decoder, cache) if cache is not None else {})).last_hidden_state  # fmt: skip
    return hidden[:, -n_new - 1 : -1][counted]


def _heads(model: nn.Module, method: SteeringMethod, coeff: float, layers: LayerSpec | None) -> tuple[Head, Head]:
    """``(steered head, base head)`` for :func:`heal_pl.barrier.kl.token_stats`.

    A plain ``nn.Linear`` projection is read from its weights (``LMHead``), which no steering context changes: one
    head serves both sides and ``token_stats`` runs it fused. Any other head (a LoRA layer on ``lm_head``, ...) may
    depend on the context, so each side applies it, one chunk at a time, inside its own context.
    """
    head = LMHead(base_lm(model))
    if type(head.proj) is nn.Linear:
        return head, head

    def steered(rows: Tensor) -> Tensor:
        with method.steering(model, coeff, layers):
            return head(rows)

    def base(rows: Tensor) -> Tensor:
        with base_context(method, model):
            return head(rows)

    return steered, base


@torch.no_grad()
def measure_kl(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    method: SteeringMethod,
    coeff: float,
    max_new_tokens: int = 64,
    batch_size: int = 8,
    layers: LayerSpec | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    base_prompts: Sequence[str] | None = None,
    chunk_size: int = 256,
    cache: Callable[[], Any] | None = None,
    on_rollout: Callable[[Rollout], None] | None = None,
) -> TrajectoryKL:
    """Per-token KL(steered ‖ base) along each prompt's greedy steered trajectory (see the module docstring).

    Args:
        model: a plain or peft-wrapped causal LM; run in eval mode (its mode is restored afterwards).
        tokenizer: encodes ``prompts`` with ``add_special_tokens=False``; its pad id fills the left padding.
        prompts: chat-formatted prompt strings, at least one.
        method: a steering method (``SteeringVector``, ``AdapterSteering``, ...).
        coeff: the coefficient α the trajectories are generated and scored at.
        max_new_tokens: ``T``, the most generated tokens per prompt, ``≥ 1``.
        batch_size: prompts per batch, ``≥ 1``; results do not depend on it beyond float rounding.
        layers: passed to ``method.steering`` (``None``: the method's own layers).
        eos_token_id: the id(s) that end a trajectory; default the tokenizer's eos and the model's
            ``generation_config.eos_token_id``.
        base_prompts: the prefix the base scores the trajectory after, one per prompt (``None``: the same
            prompts).
        chunk_size: rows whose ``[chunk_size, V]`` log-probabilities are alive at once in the KL step, ``≥ 1``;
            the peak memory of that step grows with ``chunk_size · V`` (not with the batch or ``T``), and the
            result does not depend on it beyond float32 rounding.
        cache: makes the empty cache the steered scoring forward of each batch fills (default: none is kept).
        on_rollout: called with each batch's :class:`Rollout` right after its steered scoring forward, still
            under the steering context (the survival sweep reads its forks on that cache there).

    Returns:
        a :class:`TrajectoryKL` with per-prompt KL and tokens (in prompt order) and the pooled statistics.

    Raises:
        ValueError: no prompt, an empty prompt, ``base_prompts`` of another length,
            ``max_new_tokens < 1``, ``batch_size < 1``, ``chunk_size < 1``, a non-finite
            ``coeff``, a prompt + ``max_new_tokens`` longer than the model's context length
            (:func:`heal_pl.models.context.context_length`; not checked, with a warning, when the model declares none),
            or no end-of-sequence id at all (:func:`heal_pl.models.generate.eos_ids`).
        TypeError: ``method`` has no ``steering(model, coeff, layers)`` method.
    """
    if len(prompts) == 0:
        raise ValueError("measure_kl: prompts is empty; give at least one prompt")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be an integer >= 1")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be an integer >= 1")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size!r} must be an integer >= 1 (rows of [chunk_size, vocab] "
                         "log-probabilities alive at once)")
    if not math.isfinite(coeff):
        raise ValueError(f"coeff={coeff!r} must be finite")
    if not isinstance(method, SteeringMethod):
        raise TypeError(f"method is a {type(method).__name__}; expected an object with steering(model, coeff, layers)")
    check_head(model, "measure_kl")  # the KL is read through heal_pl's head: it must be the model's own
    encoded = encode_prompts(tokenizer, prompts)
    if base_prompts is not None and len(base_prompts) != len(prompts):
        raise ValueError(f"measure_kl: base_prompts holds {len(base_prompts)} prompts, prompts {len(prompts)}")
    encoded_base = encoded if base_prompts is None else encode_prompts(tokenizer, base_prompts)
    longest = max(len(t) for t in encoded + encoded_base)
    n_ctx = checked_context(model, "measure_kl's max_new_tokens")
    if n_ctx is not None and longest + max_new_tokens > n_ctx:
        raise ValueError(f"max_new_tokens={max_new_tokens}: the longest prompt ({longest}) + max_new_tokens tokens "
                         f"exceed max_position_embeddings={n_ctx}; use max_new_tokens <= {n_ctx - longest}")
    pad_id = next(i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if i is not None)
    eos = eos_ids(tokenizer, model, eos_token_id)
    device = next(model.parameters()).device
    head_s, head_b = _heads(model, method, coeff, layers)
    kls: list[Tensor] = []
    tokens: list[Tensor] = []
    own = shards.block(len(encoded))  # under heal_pl.shards.sharded(): this process's prompts, else all
    was_training = model.training
    try:
        model.eval()
        for start in range(own.start, own.stop, batch_size):
            stop = min(start + batch_size, own.stop)
            ids, mask = (t.to(device) for t in left_pad(encoded[start:stop], pad_id))
            with method.steering(model, coeff, layers):
                new_ids, new_mask = greedy_generate(model, ids, mask, max_new_tokens, eos, pad_id)
            full_ids, full_mask = torch.cat([ids, new_ids], 1), torch.cat([mask, new_mask], 1)
            counted = new_mask.bool()  # 1 up to and including each row's first EOS
            with method.steering(model, coeff, layers):
                kept = cache() if cache is not None else None
                rows_s = _generated_rows(model, full_ids, full_mask, counted, kept)  # [N, H]
                if on_rollout is not None:
                    on_rollout(Rollout(start, ids, mask, new_ids, new_mask, kept))
            del kept
            if base_prompts is not None:  # the same tokens after the base prompts (left-padded on their own)
                ids_b, mask_b = (t.to(device) for t in left_pad(encoded_base[start:stop], pad_id))
                full_ids, full_mask = torch.cat([ids_b, new_ids], 1), torch.cat([mask_b, new_mask], 1)
            with base_context(method, model):
                rows_b = _generated_rows(model, full_ids, full_mask, counted)
            kl = token_stats(rows_s, rows_b, new_ids[counted], head=head_s, ref_head=head_b, reg="kl_rev",
                             chunk_size=chunk_size).kl.cpu()  # [N] float32, KL(steered ‖ base)
            counts = new_mask.sum(1).tolist()
            kls += list(kl.split(counts))
            tokens += [new_ids[b, :n].cpu() for b, n in enumerate(counts)]
    finally:
        model.train(was_training)
    kls, tokens = shards.gather(kls), shards.gather(tokens)  # every prompt's, in order, on every process
    return TrajectoryKL(kls, tokens, trajectory_stats(torch.cat(kls)), float(coeff))
