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

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import numpy as np
import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from heal_pl.models.generate import greedy_generate
from heal_pl.steering.hooks import LayerSpec, SteeringMethod
from heal_pl.survival.fork_cache import ForkCache, cached_positions, fork_plan, prefill, rollout
from heal_pl.survival.fork_mask import packed_fork_mask, read_forks
from heal_pl.survival.fork_setup import (
    ForkResult,
    ForkSetup,
    check_fork_batch,
    check_tokens,
    check_window,
    fork_keeps,
    fork_result,
    fork_setup,
    splice_ids,
)
from heal_pl.survival.probes import probe_from_logits

__all__ = ["ForkResult", "check_window", "fork_probe", "fork_probe_recompute", "packed_fork_mask", "probe_forks",
           "probe_forks_recompute", "rollout"]


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
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, setup: ForkSetup, prompt: str, splice: str,
    gen: list[int], cache: ForkCache, answer_ids: Mapping[str, Sequence[int]], true_name: str, fork_batch: int,
) -> tuple[np.ndarray, np.ndarray]:
    """``(pmass, p_true)`` at the reached forks, read on ``cache`` (module docstring, step 2)."""
    P, cached = len(setup.prompt_ids), cached_positions(cache)  # cached = P + g − 1
    ts = [t for t in setup.forks.tolist() if t <= len(gen)]
    keeps = fork_keeps(setup, gen, cached)
    feeds = [gen[k - P : t] + splice_ids(tokenizer, setup, prompt, gen[:t], splice)
             for k, t in zip(keeps, ts, strict=True)]  # fmt: skip
    return read_forks(model, cache, keeps, feeds, answer_ids, true_name, fork_batch)


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
    setup = fork_setup(model, tokenizer, prompt, method, coeff, w, fork_points, splice, eos_token_id)
    check_fork_batch(fork_batch)
    if fork_plan(model) is None:
        return fork_probe_recompute(model, tokenizer, prompt, method, coeff, w, fork_points, splice, answer_ids,
                                    true_name, layers, eos_token_id)  # fmt: skip
    with _steered_eval(model, method, coeff, layers):
        gen, cache = rollout(model, setup.prompt_ids, int(w), setup.eos, setup.forks.tolist())
        pmass, p_true = _read_cached(model, tokenizer, setup, prompt, splice, gen, cache, answer_ids, true_name,
                                     int(fork_batch))  # fmt: skip
    return fork_result(setup, gen, coeff, w, pmass, p_true)


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
    setup = fork_setup(model, tokenizer, prompt, method, coeff, w, fork_points, splice, None)
    check_fork_batch(fork_batch)
    gen = check_tokens(tokens, int(w))
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
            cache = prefill(model, plan, setup.prompt_ids, gen, fork_keeps(setup, gen, cached))
        pmass, p_true = _read_cached(model, tokenizer, setup, prompt, splice, gen, cache, answer_ids, true_name,
                                     int(fork_batch))  # fmt: skip
    return fork_result(setup, gen, coeff, w, pmass, p_true)


def _read_recompute(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, setup: ForkSetup, prompt: str, splice: str, gen: list[int],
    answer_ids: Mapping[str, Sequence[int]], true_name: str,
) -> tuple[list[float], list[float]]:
    """``(pmass, p_true)`` at the reached forks, one full cache-free forward of ``c_t ⊕ s_t`` each."""
    device = next(model.parameters()).device
    pmass, p_true = [], []
    for t in (t for t in setup.forks.tolist() if t <= len(gen)):
        seq = setup.prompt_ids + gen[:t] + splice_ids(tokenizer, setup, prompt, gen[:t], splice)
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
    setup = fork_setup(model, tokenizer, prompt, method, coeff, w, fork_points, splice, eos_token_id)
    device = next(model.parameters()).device
    pad_id = next(i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if i is not None)
    with _steered_eval(model, method, coeff, layers):
        ids = torch.tensor([setup.prompt_ids], dtype=torch.long, device=device)
        new_ids, new_mask = greedy_generate(model, ids, torch.ones_like(ids), int(w), setup.eos, pad_id)
        gen = new_ids[0, : int(new_mask[0].sum())].tolist()
        pmass, p_true = _read_recompute(model, tokenizer, setup, prompt, splice, gen, answer_ids, true_name)
    return fork_result(setup, gen, coeff, w, pmass, p_true)


@torch.no_grad()
def probe_forks_recompute(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, prompt: str, tokens: Sequence[int] | Tensor,
    method: SteeringMethod, coeff: float, w: int, fork_points: int | Sequence[int] | np.ndarray, splice: str,
    answer_ids: Mapping[str, Sequence[int]], true_name: str = "true", layers: LayerSpec | None = None,
) -> ForkResult:
    """The reference for :func:`probe_forks`: one full cache-free forward per fork on the given ``tokens``."""
    setup = fork_setup(model, tokenizer, prompt, method, coeff, w, fork_points, splice, None)
    gen = check_tokens(tokens, int(w))
    with _steered_eval(model, method, coeff, layers):
        pmass, p_true = _read_recompute(model, tokenizer, setup, prompt, splice, gen, answer_ids, true_name)
    return fork_result(setup, gen, coeff, w, pmass, p_true)
