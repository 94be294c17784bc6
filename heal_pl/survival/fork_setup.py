"""What one prompt's fork probes share, cached or recomputed, one prompt or a batch (docs/maths.md §4.3): the checked
arguments (:func:`fork_setup`), the splice tokens after a context (:func:`splice_ids`), the cache position each
fork keeps (:func:`fork_keeps`) and the :class:`ForkResult` they give. :mod:`heal_pl.survival.forks` reads one
prompt's forks, :mod:`heal_pl.survival.batch_forks` a batch's."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from heal_pl.data.prompts import encode_text
from heal_pl.models.context import checked_context
from heal_pl.models.generate import eos_ids
from heal_pl.steering.hooks import SteeringMethod
from heal_pl.survival.probes import THINK_OPEN, has_thinking_tokens, splice_text
from heal_pl.survival.table import fork_schedule


@dataclass
class ForkResult:
    """One prompt's fork probes (:func:`heal_pl.survival.forks.fork_probe` and its kin).

    Attributes:
        fork_points: int64 ``[m]``, the forks ``t_j`` (generated tokens before the splice), increasing.
        pmass: float64 ``[m]``, probe mass at each fork; NaN where ``t_j > gen_len``.
        p_true: float64 ``[m]``, share of the ``true_name`` set at each fork; NaN where ``t_j > gen_len``.
        gen_len: ``g``, the number of generated tokens (``< w`` only when the rollout hit an EOS).
        tokens: long ``[g]``, the generated ids (ending at the EOS if one was produced).
        coeff: the steering coefficient of the rollout and of the probe.
        w: the window (most generated tokens).
    """

    fork_points: np.ndarray
    pmass: np.ndarray
    p_true: np.ndarray
    gen_len: int
    tokens: Tensor
    coeff: float
    w: int

    @property
    def reached(self) -> np.ndarray:
        """bool ``[m]``: fork ``t_j`` is at or before the end of the rollout (``t_j ≤ gen_len``)."""
        return self.fork_points <= self.gen_len


@dataclass(frozen=True)
class ForkSetup:
    prompt_ids: list[int]
    forks: np.ndarray
    eos: Tensor
    thinking: bool


def _check_forks(fork_points: int | Sequence[int] | np.ndarray, w: int) -> np.ndarray:
    """``fork_points`` as int64 ``[m]``: an int is a step ``s`` (:func:`heal_pl.survival.table.fork_schedule`)."""
    if isinstance(fork_points, (int, np.integer)) and not isinstance(fork_points, bool):
        return fork_schedule(w, step=int(fork_points))
    arr = np.asarray(fork_points)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"fork_points must be a fork step (int > 0) or a non-empty 1-D sequence, got {fork_points!r}")
    if arr.dtype == bool or not (np.issubdtype(arr.dtype, np.integer)
                                 or (np.issubdtype(arr.dtype, np.floating) and np.all(arr == np.round(arr)))):
        raise ValueError(f"fork_points must be integers, got {arr.tolist()!r}")
    arr = arr.astype(np.int64)
    if arr[0] < 0 or arr[-1] > w:
        raise ValueError(f"fork_points must lie in [0, w={w}], got {arr.tolist()}")
    if np.any(np.diff(arr) <= 0):
        raise ValueError(f"fork_points must be strictly increasing, got {arr.tolist()}")
    return arr


def check_window(model: nn.Module, n_prompt: int, w: int, n_splice: int) -> None:
    """Raise ``ValueError`` (naming ``w``) when ``n_prompt + w + n_splice`` exceeds the model's context length.

    The context length is :func:`heal_pl.models.context.context_length` (``max_position_embeddings`` or its aliases); a
    model that declares none is not checked (logged once).
    """
    n_ctx = checked_context(model, "the fork window w")
    if n_ctx is not None and n_prompt + w + n_splice > n_ctx:
        raise ValueError(
            f"w={w} is longer than the model's context: prompt ({n_prompt}) + w + splice ({n_splice}) "
            f"tokens exceed max_position_embeddings={n_ctx}; use w <= {n_ctx - n_prompt - n_splice}")


def fork_setup(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, prompt: str, method: SteeringMethod, coeff: float, w: int,
    fork_points: int | Sequence[int] | np.ndarray, splice: str, eos_token_id: int | Sequence[int] | None,
) -> ForkSetup:
    """Validate the arguments shared by all four entry points (errors name the offending field)."""
    if isinstance(w, bool) or not isinstance(w, (int, np.integer)) or w < 1:
        raise ValueError(f"w={w!r} must be an integer >= 1 (the rollout window in tokens)")
    w = int(w)
    if not math.isfinite(coeff):
        raise ValueError(f"coeff={coeff!r} must be finite")
    if not isinstance(method, SteeringMethod):
        raise TypeError(f"method is a {type(method).__name__}; expected an object with steering(model, coeff, layers)")
    prompt_ids = encode_text(tokenizer, prompt)
    if not prompt_ids:
        raise ValueError(f"prompt={prompt!r} has no tokens")
    if not isinstance(splice, str) or not encode_text(tokenizer, splice):
        raise ValueError(f"splice={splice!r} tokenizes to nothing; give the probe's answer prefix text")
    forks = _check_forks(fork_points, w)
    thinking = has_thinking_tokens(tokenizer)
    # the longest splice: with a thinking tokenizer it may have to close an open block first
    longest = encode_text(tokenizer, splice_text(THINK_OPEN, splice) if thinking else splice)
    check_window(model, len(prompt_ids), w, len(longest))
    return ForkSetup(prompt_ids, forks, eos_ids(tokenizer, model, eos_token_id), thinking)


def splice_ids(
    tokenizer: PreTrainedTokenizerBase, setup: ForkSetup, prompt: str, gen: list[int], splice: str
) -> list[int]:
    """Splice tokens for the context ``prompt ⊕ gen``: closes an open thinking block first (if the tokenizer can)."""
    if not setup.thinking:
        return encode_text(tokenizer, splice)
    context = prompt + tokenizer.decode(gen, skip_special_tokens=False)
    return encode_text(tokenizer, splice_text(context, splice))


def fork_result(
    setup: ForkSetup, gen: list[int], coeff: float, w: int, pmass: Sequence[float], p_true: Sequence[float]
) -> ForkResult:
    """The :class:`ForkResult`: ``pmass`` / ``p_true`` hold the reached forks (a prefix), NaN after them."""
    m, n = len(setup.forks), len(pmass)
    return ForkResult(setup.forks, np.concatenate([pmass, np.full(m - n, np.nan)]).astype(np.float64),
                      np.concatenate([p_true, np.full(m - n, np.nan)]).astype(np.float64), len(gen),
                      torch.tensor(gen, dtype=torch.long), float(coeff), int(w))


def fork_keeps(setup: ForkSetup, gen: list[int], cached: int) -> list[int]:
    """``k_j = min(P + t_j, C)`` for the reached forks."""
    return [min(len(setup.prompt_ids) + t, cached) for t in setup.forks.tolist() if t <= len(gen)]


def check_fork_batch(fork_batch: int) -> None:
    if isinstance(fork_batch, bool) or not isinstance(fork_batch, (int, np.integer)) or fork_batch < 1:
        raise ValueError(f"fork_batch={fork_batch!r} must be an integer >= 1 (forks packed per forward)")


def check_tokens(tokens: Sequence[int] | Tensor, w: int) -> list[int]:
    gen = [int(i) for i in (tokens.tolist() if isinstance(tokens, Tensor) else tokens)]
    if not 1 <= len(gen) <= w:
        raise ValueError(f"tokens holds {len(gen)} generated ids; need 1 <= len(tokens) <= w={w}")
    return gen
