"""Forced-choice probes at fork points along one steered rollout, reusing its KV cache (docs/maths.md §4.3).

For one prompt ``x`` (``P`` tokens, encoded without special tokens), a steering ``method`` at ``coeff``, a
window ``w`` and fork points ``0 ≤ t_0 < t_1 < … ≤ w``:

1. greedy-roll out ``y_1 … y_g`` under the steering context, ``g ≤ w`` (``gen_len``), stopping at the first
   end-of-sequence token (kept, like :mod:`heal_pl.steering.trajectory`); the cache of ``x ⊕ y_<g`` is kept
   (``C = P + g − 1`` positions; what each layer kind keeps: :mod:`heal_pl.survival.fork_cache`);
2. at each fork ``t_j ≤ g`` (``t = 0``: right after the prompt; ``t = g``: after the last generated token, the
   EOS included) fork ``j`` feeds ONLY ``f_j = y_{k_j − P + 1} … y_t ⊕ s_t`` (the splice ``s_t``, plus ``y_g`` at
   ``t = g``, whose key/values the rollout never computed) at positions ``k_j, k_j + 1, …``, ``k_j = min(P + t_j,
   C)``, on the cache "cropped to ``k_j``" by a mask (at most ``fork_batch`` forks per forward;
   :mod:`heal_pl.survival.fork_mask`); the cache leaves as it came;
3. with ``z`` the next-token logits at the end of the splice (:func:`heal_pl.survival.probes.probe_from_logits`)

       pmass_t  = Σ_k p(A_k | c_t ⊕ s_t)          p_true_t = p(A_true | c_t ⊕ s_t) / pmass_t

   and ``pmass = p_true = NaN`` at forks ``t_j > g`` (past the end: right-censored in
   :mod:`heal_pl.survival.table`).

The splice is tokenised on its own and appended token-wise (the context is never re-tokenised); when the
tokenizer has thinking tokens and ``c_t`` has an open ``<think>`` block, the splice first closes it
(:func:`heal_pl.survival.probes.splice_text`).

Steering during the probe: the probe is read UNDER THE SAME STEERING as the rollout (``method`` at
``coeff``). Survival asks whether the steered model can still answer; the cached keys/values were computed
steered anyway, so a base read on top of them would mix two models.

:func:`fork_probe_recompute` is the reference: tokens from :func:`heal_pl.steering.trajectory.greedy_generate` and
one full cache-free forward of ``c_t ⊕ s_t`` per fork through the model's own ``logits``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from heal_pl.data.prompts import encode_text
from heal_pl.models.context import checked_context
from heal_pl.models.generate import eos_ids, greedy_generate
from heal_pl.steering.hooks import LayerSpec, SteeringMethod
from heal_pl.survival.fork_cache import ForkCache, cached_positions, fork_plan, prefill, rollout
from heal_pl.survival.fork_mask import packed_fork_mask, read_forks
from heal_pl.survival.probes import THINK_OPEN, has_thinking_tokens, probe_from_logits, splice_text
from heal_pl.survival.table import fork_schedule

__all__ = ["ForkResult", "check_window", "fork_probe", "fork_probe_recompute", "packed_fork_mask", "probe_forks",
           "probe_forks_recompute", "rollout"]


@dataclass
class ForkResult:
    """The result of :func:`fork_probe` / :func:`fork_probe_recompute` for one prompt.

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
class _Setup:
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


def _setup(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, prompt: str, method: SteeringMethod, coeff: float, w: int,
    fork_points: int | Sequence[int] | np.ndarray, splice: str, eos_token_id: int | Sequence[int] | None,
) -> _Setup:
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
    return _Setup(prompt_ids, forks, eos_ids(tokenizer, model, eos_token_id), thinking)


def _splice_ids(
    tokenizer: PreTrainedTokenizerBase, setup: _Setup, prompt: str, gen: list[int], splice: str
) -> list[int]:
    """Splice tokens for the context ``prompt ⊕ gen``: closes an open thinking block first (if the tokenizer can)."""
    if not setup.thinking:
        return encode_text(tokenizer, splice)
    context = prompt + tokenizer.decode(gen, skip_special_tokens=False)
    return encode_text(tokenizer, splice_text(context, splice))


def _result(
    setup: _Setup, gen: list[int], coeff: float, w: int, pmass: Sequence[float], p_true: Sequence[float]
) -> ForkResult:
    """The :class:`ForkResult`: ``pmass`` / ``p_true`` hold the reached forks (a prefix), NaN after them."""
    m, n = len(setup.forks), len(pmass)
    return ForkResult(setup.forks, np.concatenate([pmass, np.full(m - n, np.nan)]).astype(np.float64),
                      np.concatenate([p_true, np.full(m - n, np.nan)]).astype(np.float64), len(gen),
                      torch.tensor(gen, dtype=torch.long), float(coeff), int(w))


@contextmanager
def _steered_eval(model: nn.Module, method: SteeringMethod, coeff: float, layers: LayerSpec | None) -> Iterator[None]:
    """Eval mode under ``method`` at ``coeff``; the model's training mode is restored afterwards."""
    was_training = model.training
    try:
        model.eval()
        with method.steering(model, coeff, layers):
            yield
    finally:
        model.train(was_training)


def _read_cached(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, setup: _Setup, prompt: str, splice: str,
    gen: list[int], cache: ForkCache, answer_ids: Mapping[str, Sequence[int]], true_name: str, fork_batch: int,
) -> tuple[np.ndarray, np.ndarray]:
    """``(pmass, p_true)`` at the reached forks, read on ``cache`` (module docstring, step 2)."""
    P, cached = len(setup.prompt_ids), cached_positions(cache)  # cached = P + g − 1
    ts = [t for t in setup.forks.tolist() if t <= len(gen)]
    keeps = _keeps(setup, gen, cached)
    feeds = [gen[k - P : t] + _splice_ids(tokenizer, setup, prompt, gen[:t], splice)
             for k, t in zip(keeps, ts, strict=True)]  # fmt: skip
    return read_forks(model, cache, keeps, feeds, answer_ids, true_name, fork_batch)


def _keeps(setup: _Setup, gen: list[int], cached: int) -> list[int]:
    """``k_j = min(P + t_j, C)`` for the reached forks."""
    return [min(len(setup.prompt_ids) + t, cached) for t in setup.forks.tolist() if t <= len(gen)]


def _check_fork_batch(fork_batch: int) -> None:
    if isinstance(fork_batch, bool) or not isinstance(fork_batch, (int, np.integer)) or fork_batch < 1:
        raise ValueError(f"fork_batch={fork_batch!r} must be an integer >= 1 (forks packed per forward)")


def _check_tokens(tokens: Sequence[int] | Tensor, w: int) -> list[int]:
    gen = [int(i) for i in (tokens.tolist() if isinstance(tokens, Tensor) else tokens)]
    if not 1 <= len(gen) <= w:
        raise ValueError(f"tokens holds {len(gen)} generated ids; need 1 <= len(tokens) <= w={w}")
    return gen


@torch.no_grad()
def fork_probe(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    method: SteeringMethod,
    coeff: float,
    w: int,
    fork_points: int | Sequence[int] | np.ndarray,
    splice: str,
    answer_ids: Mapping[str, Sequence[int]],
    true_name: str = "true",
    layers: LayerSpec | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    fork_batch: int = 64,
) -> ForkResult:
    """Probe ``pmass`` / ``p_true`` at the forks of one greedy steered rollout, reusing its KV cache.

    See the module docstring for the formulae and why the probe is read under the rollout's steering.

    Args:
        model: a plain or peft-wrapped causal LM (run in eval mode; its mode is restored afterwards). A cache
            that cannot be forked exactly (:func:`heal_pl.survival.fork_cache.fork_plan`) gets
            :func:`fork_probe_recompute` instead, with one log line.
        tokenizer: encodes ``prompt`` and ``splice`` with ``add_special_tokens=False``.
        prompt: one chat-formatted prompt string.
        method: a steering method (``SteeringVector``, ``AdapterSteering``, ...).
        coeff: the coefficient α of the rollout and of the probe.
        w: the most generated tokens, ``≥ 1``; ``P + w + len(splice)`` must fit ``max_position_embeddings``.
        fork_points: a fork step ``s`` (forks ``0, s, 2s, …, w``) or increasing integers in ``[0, w]``.
        splice: the probe's answer prefix text (e.g. ``"\\nAnswer (true or false):"``), non-empty in tokens.
        answer_ids: ``{name: token ids}`` from :func:`heal_pl.survival.probes.answer_token_ids`.
        true_name: the answer set whose share is ``p_true``.
        layers: passed to ``method.steering`` (``None``: the method's own layers).
        eos_token_id: the id(s) that end the rollout; default the tokenizer's eos and the generation config's.
        fork_batch: forks read in one forward (memory ``∝ fork_batch · |splice| · (P + w)`` per layer; with
            recurrent layers, one row and one copy of the attention cache per fork).

    Raises:
        ValueError: ``w < 1`` or too long for the model's context (message names ``w``), bad ``fork_points`` or
            fork step, a ``splice`` or ``prompt`` that tokenizes to nothing, a non-finite ``coeff``,
            ``fork_batch < 1``.
        TypeError: ``method`` has no ``steering(model, coeff, layers)``.
    """
    setup = _setup(model, tokenizer, prompt, method, coeff, w, fork_points, splice, eos_token_id)
    _check_fork_batch(fork_batch)
    if fork_plan(model) is None:
        return fork_probe_recompute(model, tokenizer, prompt, method, coeff, w, fork_points, splice, answer_ids,
                                    true_name, layers, eos_token_id)  # fmt: skip
    with _steered_eval(model, method, coeff, layers):
        gen, cache = rollout(model, setup.prompt_ids, int(w), setup.eos, setup.forks.tolist())
        pmass, p_true = _read_cached(model, tokenizer, setup, prompt, splice, gen, cache, answer_ids, true_name,
                                     int(fork_batch))  # fmt: skip
    return _result(setup, gen, coeff, w, pmass, p_true)


@torch.no_grad()
def probe_forks(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, prompt: str, tokens: Sequence[int] | Tensor,
    method: SteeringMethod, coeff: float, w: int, fork_points: int | Sequence[int] | np.ndarray, splice: str,
    answer_ids: Mapping[str, Sequence[int]], true_name: str = "true", layers: LayerSpec | None = None,
    fork_batch: int = 64, cache: ForkCache | None = None,
) -> ForkResult:
    """:func:`fork_probe` on a trajectory generated elsewhere (e.g. by :func:`heal_pl.steering.trajectory.measure_kl`).

    ``tokens`` are the generated ids ``y_1 … y_g`` (``1 ≤ g ≤ w``; ``g < w`` means the rollout ended there).
    ``cache``: the steered cache of ``x ⊕ y_<g`` (``P + g − 1`` positions) from :func:`rollout` (left as it came);
    ``None`` = a steered prefill of ``x ⊕ y_<g`` builds it (one forward; one per stretch between forks on a cache
    with recurrent layers). Then the forks are read as in :func:`fork_probe` (a cache that cannot be forked
    exactly: :func:`probe_forks_recompute`, with one log line). Other arguments and errors as there, plus a
    ``cache`` not from :func:`rollout`, of the wrong length, or without the recurrent state at a fork.
    """
    setup = _setup(model, tokenizer, prompt, method, coeff, w, fork_points, splice, None)
    _check_fork_batch(fork_batch)
    gen = _check_tokens(tokens, int(w))
    if cache is not None and not isinstance(cache, ForkCache):
        raise ValueError(f"cache is a {type(cache).__name__}; pass the cache from rollout() or none")
    cached = len(setup.prompt_ids) + len(gen) - 1
    if cache is not None and cached_positions(cache) != cached:
        raise ValueError(f"cache holds {cached_positions(cache)} positions; prompt ⊕ tokens[:-1] needs {cached}")
    plan = fork_plan(model)
    if plan is None:
        return probe_forks_recompute(model, tokenizer, prompt, tokens, method, coeff, w, fork_points, splice,
                                     answer_ids, true_name, layers)  # fmt: skip
    with _steered_eval(model, method, coeff, layers):
        if cache is None:
            cache = prefill(model, plan, setup.prompt_ids, gen, _keeps(setup, gen, cached))
        pmass, p_true = _read_cached(model, tokenizer, setup, prompt, splice, gen, cache, answer_ids, true_name,
                                     int(fork_batch))  # fmt: skip
    return _result(setup, gen, coeff, w, pmass, p_true)


def _read_recompute(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, setup: _Setup, prompt: str, splice: str, gen: list[int],
    answer_ids: Mapping[str, Sequence[int]], true_name: str,
) -> tuple[list[float], list[float]]:
    """``(pmass, p_true)`` at the reached forks, one full cache-free forward of ``c_t ⊕ s_t`` each."""
    device = next(model.parameters()).device
    pmass, p_true = [], []
    for t in (t for t in setup.forks.tolist() if t <= len(gen)):
        seq = setup.prompt_ids + gen[:t] + _splice_ids(tokenizer, setup, prompt, gen[:t], splice)
        logits = model(input_ids=torch.tensor([seq], device=device), use_cache=False, logits_to_keep=1).logits[:, -1]
        pm, pt = probe_from_logits(logits, answer_ids, true_name)
        pmass.append(float(pm[0]))
        p_true.append(float(pt[0]))
    return pmass, p_true


@torch.no_grad()
def fork_probe_recompute(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, prompt: str, method: SteeringMethod, coeff: float, w: int,
    fork_points: int | Sequence[int] | np.ndarray, splice: str, answer_ids: Mapping[str, Sequence[int]],
    true_name: str = "true", layers: LayerSpec | None = None, eos_token_id: int | Sequence[int] | None = None,
) -> ForkResult:
    """The reference for :func:`fork_probe` (same arguments, same result): no cache reuse.

    Tokens come from :func:`heal_pl.steering.trajectory.greedy_generate`; each fork runs one full forward of
    ``prompt ⊕ y_1 … y_t ⊕ splice`` (``use_cache=False``) and reads ``logits[:, -1]``. Cost ``O(m · (P + w))``
    tokens of forward instead of ``O(m · len(splice))``.
    """
    setup = _setup(model, tokenizer, prompt, method, coeff, w, fork_points, splice, eos_token_id)
    device = next(model.parameters()).device
    pad_id = next(i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if i is not None)
    with _steered_eval(model, method, coeff, layers):
        ids = torch.tensor([setup.prompt_ids], dtype=torch.long, device=device)
        new_ids, new_mask = greedy_generate(model, ids, torch.ones_like(ids), int(w), setup.eos, pad_id)
        gen = new_ids[0, : int(new_mask[0].sum())].tolist()
        pmass, p_true = _read_recompute(model, tokenizer, setup, prompt, splice, gen, answer_ids, true_name)
    return _result(setup, gen, coeff, w, pmass, p_true)


@torch.no_grad()
def probe_forks_recompute(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, prompt: str, tokens: Sequence[int] | Tensor,
    method: SteeringMethod, coeff: float, w: int, fork_points: int | Sequence[int] | np.ndarray, splice: str,
    answer_ids: Mapping[str, Sequence[int]], true_name: str = "true", layers: LayerSpec | None = None,
) -> ForkResult:
    """The reference for :func:`probe_forks`: one full cache-free forward per fork on the given ``tokens``."""
    setup = _setup(model, tokenizer, prompt, method, coeff, w, fork_points, splice, None)
    gen = _check_tokens(tokens, int(w))
    with _steered_eval(model, method, coeff, layers):
        pmass, p_true = _read_recompute(model, tokenizer, setup, prompt, splice, gen, answer_ids, true_name)
    return _result(setup, gen, coeff, w, pmass, p_true)
