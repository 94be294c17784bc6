"""The forks of a whole batch of rollouts, read on the cache of the KL's own steered forward (docs/maths.md §4.3).

:func:`heal_pl.survival.sweep.measure_alpha` measures one α: the KL along each prompt's greedy steered rollout
(:func:`heal_pl.steering.trajectory.measure_kl`, a batch of left-padded prompts at a time) and the probe at the
forks of each rollout. The KL's steered scoring forward over ``x ⊕ y`` already computes every steered key/value
the forks read on, so :func:`batch_fork_reader` has it fill a fork cache (:func:`heal_pl.survival.fork_cache.new_cache`)
and reads the forks of every prompt of the batch on it: no per-prompt prefill, and the forks of all the batch's
prompts in a few forwards instead of one per prompt.

Row ``b`` of the batch holds its ``P_b`` prompt tokens in columns ``o_b … o_b + P_b − 1`` (``o_b`` the left
padding), then its ``g_b`` generated tokens. Its forks are those of :func:`heal_pl.survival.forks.probe_forks`:
fork ``j`` keeps the first ``k_j = min(P_b + t_j, P_b + g_b − 1)`` positions and feeds ``f_j`` (the generated
tokens from ``k_j`` to ``t_j``, then the splice) at positions ``k_j, k_j + 1, …``. The feeds of a row are packed
into that row, each under the mask of :func:`heal_pl.survival.fork_mask.packed_fork_mask` shifted by ``o_b`` (the
window of sliding layers included); rows are padded to the longest. The probe is read from the rows at the feeds'
ends through the model's own head (:class:`heal_pl.models.lm.LMHead`, the contract :func:`check_head` checks).

Only attention-only caches (``ForkPlan.mode == "packed"``) take this path; :func:`batch_fork_reader` returns
``None`` for any other model, whose forks :func:`probe_forks` reads one prompt at a time. The pmass equals the
per-prompt path's up to float rounding (the keys/values come from a batched forward instead of a per-prompt one).
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from heal_pl.models.lm import LMHead, base_lm, cache_kwargs
from heal_pl.steering.hooks import SteeringMethod
from heal_pl.steering.trajectory import Rollout
from heal_pl.survival.fork_cache import ForkCache, cached_positions, fork_plan, new_cache
from heal_pl.survival.fork_mask import packed_fork_mask
from heal_pl.survival.fork_setup import ForkResult, ForkSetup, fork_keeps, fork_result, fork_setup, splice_ids
from heal_pl.survival.probes import probe_from_logits


def batch_fork_reader(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], method: SteeringMethod,
    coeff: float, w: int, forks: np.ndarray, splice: str, answer_ids: Mapping[str, Sequence[int]], fork_batch: int,
) -> tuple[Callable[[], ForkCache], Callable[[Rollout], None], list[ForkResult | None]] | None:
    """``(cache, on_rollout, results)`` for :func:`heal_pl.steering.trajectory.measure_kl`: its steered forwards fill
    ``cache()``, ``on_rollout`` reads each batch's forks on it (under the steering context ``measure_kl`` holds), and
    ``results[i]`` is prompt ``i``'s :class:`ForkResult` once its batch is read. ``None`` when the model's cache is
    not attention-only (module docstring)."""
    plan = fork_plan(model)
    if plan is None or plan.mode != "packed":
        return None
    setups = [fork_setup(model, tokenizer, p, method, coeff, w, forks, splice, None) for p in prompts]
    results: list[ForkResult | None] = [None] * len(prompts)

    def on_rollout(batch: Rollout) -> None:
        rows = range(batch.start, batch.start + batch.ids.shape[0])
        gens = [batch.new_ids[b, : int(batch.new_mask[b].sum())].tolist() for b in range(len(rows))]
        read = read_batch(model, tokenizer, batch, [setups[i] for i in rows], [prompts[i] for i in rows], gens,
                          splice, answer_ids, fork_batch)  # fmt: skip
        for i, gen, (pmass, p_true) in zip(rows, gens, read, strict=True):
            results[i] = fork_result(setups[i], gen, coeff, w, pmass, p_true)

    return (lambda: new_cache(model, plan)), on_rollout, results


def read_batch(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, batch: Rollout, setups: Sequence[ForkSetup],
    prompts: Sequence[str], gens: Sequence[list[int]], splice: str, answer_ids: Mapping[str, Sequence[int]],
    fork_batch: int,
) -> list[tuple[list[float], list[float]]]:
    """``(pmass, p_true)`` at the reached forks of every row of ``batch``, read on ``batch.cache`` (left as it came);
    about ``fork_batch`` forks per forward, each row's forks split evenly over the forwards."""
    cache, width = batch.cache, batch.ids.shape[1]
    plan, cached = cache.plan, cached_positions(cache)
    segments = []  # per row: [(keep, feed)] of its reached forks
    for setup, prompt, gen, n_prompt in zip(setups, prompts, gens, batch.mask.sum(1).tolist(), strict=True):
        keeps = fork_keeps(setup, gen, n_prompt + len(gen) - 1)
        ts = [t for t in setup.forks.tolist() if t <= len(gen)]
        segments.append([(k, gen[k - n_prompt : t] + splice_ids(tokenizer, setup, prompt, gen[:t], splice))
                         for k, t in zip(keeps, ts, strict=True)])  # fmt: skip
    most = max(len(s) for s in segments)
    passes = -(-most * len(segments) // fork_batch)
    per_pass = -(-most // passes)
    offsets = [width - int(n) for n in batch.mask.sum(1).tolist()]
    out: list[tuple[list[float], list[float]]] = [([], []) for _ in segments]
    for start in range(0, most, per_pass):
        part = [s[start : start + per_pass] for s in segments]
        for b, (pm, pt) in enumerate(_read_pass(model, cache, plan, cached, offsets, part, answer_ids)):
            out[b][0].extend(pm)
            out[b][1].extend(pt)
    return out


def _read_pass(
    model: nn.Module, cache: ForkCache, plan: Any, cached: int, offsets: Sequence[int],
    part: Sequence[Sequence[tuple[int, list[int]]]], answer_ids: Mapping[str, Sequence[int]],
) -> list[tuple[list[float], list[float]]]:
    """One forward: row ``b`` feeds the packed segments ``part[b]`` on its cache row; the cache is cropped back."""
    device = next(model.parameters()).device
    dtype = base_lm(model).get_input_embeddings().weight.dtype
    lens = [[len(feed) for _, feed in segs] for segs in part]
    width = max(1, max(sum(n) for n in lens))
    ids = torch.zeros((len(part), width), dtype=torch.long)
    pos = torch.zeros((len(part), width), dtype=torch.long)
    ends: list[tuple[int, int]] = []  # (row, column) of each feed's last token, row-major
    for b, segs in enumerate(part):
        col = 0
        for keep, feed in segs:
            ids[b, col : col + len(feed)] = torch.tensor(feed)
            pos[b, col : col + len(feed)] = torch.arange(keep, keep + len(feed))
            col += len(feed)
            ends.append((b, col - 1))

    def mask(window: int | None) -> torch.Tensor:
        return torch.cat([packed_fork_mask([operator.index(k) for k, _ in segs], n, cached, dtype, window,
                                           offset=o, width=width)
                          for segs, n, o in zip(part, lens, offsets, strict=True)]).to(device)  # fmt: skip

    decoder = base_lm(model).get_decoder()
    try:
        hidden = decoder(input_ids=ids.to(device), position_ids=pos.to(device), attention_mask=plan.masks(mask),
                         use_cache=True, **cache_kwargs(decoder, cache)).last_hidden_state  # fmt: skip
    finally:
        cache.crop(cached - cached_positions(cache))  # crop(−k) drops the k packed positions
    if not ends:
        return [([], []) for _ in part]
    rows, cols = (torch.tensor(x, device=device) for x in zip(*ends, strict=True))
    pmass, p_true = probe_from_logits(LMHead(base_lm(model))(hidden[rows, cols]), answer_ids, "true")
    out: list[tuple[list[float], list[float]]] = [([], []) for _ in part]
    for (b, _), pm, pt in zip(ends, pmass.tolist(), p_true.tolist(), strict=True):
        out[b][0].append(pm)
        out[b][1].append(pt)
    return out

