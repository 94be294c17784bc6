"""Forks on every cache: the fast path (reads on the rollout's own cache) equals the recompute on every family.

The recompute (:func:`fork_probe_recompute`) shares no cache code with the fast path: tokens from
``heal_pl.models.generate.greedy_generate``, one full cache-free forward per fork through ``model(...).logits``. The
tiny Gemma-3 has sliding window 8, shorter than prompt + w (the rollout cache must keep positions transformers would
drop); the tiny Qwen3.5 alternates linear-attention (gated delta net: recurrent state snapshots) and full layers.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import pytest
import torch
import transformers.cache_utils as cache_utils

import heal_pl.survival.fork_cache as fork_cache
from heal_pl.models.families import FAMILIES
from heal_pl.survival.fork_cache import fork_plan
from heal_pl.survival.forks import fork_probe, fork_probe_recompute, probe_forks, probe_forks_recompute, rollout
from heal_pl.survival.probes import answer_token_ids
from tests.helpers import lively
from tests.survival.test_forks import COEFF, PROMPT, SPLICE, assert_same, random_vector

W, STEP = 24, 3
MODES = {"qwen3_5": "batched"}  # every other family: packed


def keys_held(cache: cache_utils.Cache) -> int:
    """Positions held by every attention layer of ``cache`` (read off the keys; all layers must agree)."""
    held = {x.keys.shape[-2] for x in cache.layers if getattr(x, "keys", None) is not None}
    assert len(held) == 1, held
    return held.pop()


@pytest.mark.parametrize("family", FAMILIES)
def test_fast_forks_equal_the_recompute(family: str, tokenizer) -> None:
    model = lively(family)
    ids = answer_token_ids(tokenizer)
    vec = random_vector()
    plan = fork_plan(model)
    assert plan is not None and plan.mode == MODES.get(family, "packed")
    fast = fork_probe(model, tokenizer, PROMPT, vec, COEFF, W, STEP, SPLICE, ids, eos_token_id=[], fork_batch=4)
    ref = fork_probe_recompute(model, tokenizer, PROMPT, vec, COEFF, W, STEP, SPLICE, ids, eos_token_id=[])
    assert_same(fast, ref)
    assert fast.gen_len == W and np.isfinite(fast.pmass).all()
    # the tolerance discriminates: neighbouring forks differ by more than twice the 1e-4 relative tolerance
    # (Granite's logits_scaling 8 flattens a random model's answer mass most: 4e-4 apart at the closest)
    assert np.min(np.abs(np.diff(fast.pmass)) / fast.pmass[1:]) > 2e-4
    # the same forks on given tokens: a prefill (per stretch between forks with recurrent layers), all in one forward
    tokens = ref.tokens[:17]
    given = probe_forks(model, tokenizer, PROMPT, tokens, vec, COEFF, W, STEP, SPLICE, ids)
    assert_same(given, probe_forks_recompute(model, tokenizer, PROMPT, tokens, vec, COEFF, W, STEP, SPLICE, ids))
    # and on the rollout's own cache, which leaves as it came
    prompt_ids = tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    with vec.steering(model, COEFF), torch.no_grad():
        gen, cache = rollout(model, prompt_ids, W, torch.tensor([], dtype=torch.long), forks=range(0, W + 1, STEP))
    assert keys_held(cache) == len(prompt_ids) + W - 1
    on_cache = probe_forks(model, tokenizer, PROMPT, gen, vec, COEFF, W, STEP, SPLICE, ids, cache=cache, fork_batch=5)
    assert keys_held(cache) == len(prompt_ids) + W - 1
    assert_same(on_cache, ref)


@pytest.mark.parametrize("count", ["int", "tensor"])
@pytest.mark.parametrize("family", FAMILIES)
def test_the_fork_at_the_last_token_reads_the_whole_cache(family: str, count: str, tokenizer, monkeypatch) -> None:
    """The fork at ``t = g`` keeps every cached position (``k = C``), on both fork readers.

    transformers 5.25 counts a linear-attention layer's tokens in a 0-d tensor, and ``Cache.get_seq_length()`` reads
    layer 0: on Qwen3.5 (layer 0 linear) the count arrives as a tensor. ``tensor`` makes every family's cache count
    so (as a later transformers may for any layer), ``int`` leaves the cache as transformers builds it.
    """
    if count == "tensor":
        own = cache_utils.Cache.get_seq_length
        monkeypatch.setattr(cache_utils.Cache, "get_seq_length",
                            lambda self, layer_idx=0: torch.as_tensor(own(self, layer_idx)))  # fmt: skip
    model, w = lively(family), 12
    ids, vec = answer_token_ids(tokenizer), random_vector()
    ref = fork_probe_recompute(model, tokenizer, PROMPT, vec, COEFF, w, STEP, SPLICE, ids, eos_token_id=[])
    assert ref.gen_len == w and ref.fork_points[-1] == w  # the last fork sits on the last generated token
    assert_same(fork_probe(model, tokenizer, PROMPT, vec, COEFF, w, STEP, SPLICE, ids, eos_token_id=[]), ref)
    assert_same(probe_forks(model, tokenizer, PROMPT, ref.tokens, vec, COEFF, w, STEP, SPLICE, ids), ref)  # prefill
    prompt_ids = tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    with vec.steering(model, COEFF), torch.no_grad():
        gen, cache = rollout(model, prompt_ids, w, torch.tensor([], dtype=torch.long), forks=range(0, w + 1, STEP))
    C = len(prompt_ids) + w - 1
    assert keys_held(cache) == C
    assert all(type(k) is int for k in cache.states) and (C in cache.states) == (fork_plan(model).mode == "batched")
    on_cache = probe_forks(model, tokenizer, PROMPT, gen, vec, COEFF, w, STEP, SPLICE, ids, cache=cache, fork_batch=2)
    assert keys_held(cache) == C  # the cache leaves as it came
    assert_same(on_cache, ref)


def test_the_gemma3_window_is_shorter_than_the_rollout_and_matters(tokenizer, monkeypatch) -> None:
    model = lively("gemma3")
    prompt_len = len(tokenizer(PROMPT, add_special_tokens=False)["input_ids"])
    plan = fork_plan(model)
    assert plan.window == 8 < prompt_len + W and plan.mapping
    assert set(plan.kinds) == {"sliding_attention", "full_attention"}
    ids, vec = answer_token_ids(tokenizer), random_vector()
    ref = fork_probe_recompute(model, tokenizer, PROMPT, vec, COEFF, W, STEP, SPLICE, ids, eos_token_id=[])
    # read without the window (as if every layer were full attention): the numbers move, so the tests above see it
    no_window = dataclasses.replace(plan, window=10**6)
    monkeypatch.setattr("heal_pl.survival.forks.fork_plan", lambda m: no_window)
    monkeypatch.setattr("heal_pl.survival.fork_cache.fork_plan", lambda m: no_window)  # the rollout's cache
    wrong = fork_probe(model, tokenizer, PROMPT, vec, COEFF, W, STEP, SPLICE, ids, eos_token_id=[])
    assert np.nanmax(np.abs(wrong.pmass - ref.pmass) / ref.pmass) > 1e-2


def test_qwen3_5_snapshots_are_needed(tokenizer) -> None:
    model = lively("qwen3_5")
    plan = fork_plan(model)
    assert plan.mode == "batched" and {"linear_attention", "full_attention"} == set(plan.kinds)
    prompt_ids = tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        _, cache = rollout(model, prompt_ids, 8, torch.tensor([], dtype=torch.long), forks=[0, 4])
    P = len(prompt_ids)
    assert sorted(cache.states) == [P, P + 4, P + 7]  # the forks and the last step (the fork at t = g)
    linear = [i for i, k in enumerate(plan.kinds) if k == "linear_attention"]
    for i in linear:  # the recurrent state moves between forks: one state could not serve them all
        assert not torch.allclose(cache.states[P][i][0][1], cache.states[P + 4][i][0][1])
    ids = answer_token_ids(tokenizer)
    with pytest.raises(ValueError, match=rf"no recurrent-state snapshot at positions \[{P + 2}\]"):
        probe_forks(model, tokenizer, PROMPT, list(range(5, 13)), random_vector(), 0.0, 8, [0, 2], SPLICE, ids,
                    cache=cache)  # fmt: skip


def test_a_cache_that_cannot_be_forked_falls_back_with_one_log_line(tokenizer, monkeypatch, caplog) -> None:
    class OddLayer(cache_utils.DynamicLayer):
        """A cache layer class heal_pl does not know (as a future transformers might add)."""

    monkeypatch.setitem(cache_utils.DYNAMIC_LAYER_TYPE_MAPPING, "full_attention", OddLayer)
    monkeypatch.setattr(fork_cache, "_LOGGED", set())
    model = lively("qwen3")  # its cache is built from config.layer_types, hence from the mapping
    ids, vec = answer_token_ids(tokenizer), random_vector()
    with caplog.at_level(logging.INFO, logger="heal_pl"):
        assert fork_plan(model) is None
        fast = fork_probe(model, tokenizer, PROMPT, vec, COEFF, 12, 4, SPLICE, ids, eos_token_id=[])
        again = probe_forks(model, tokenizer, PROMPT, fast.tokens, vec, COEFF, 12, 4, SPLICE, ids)
    lines = [r.getMessage() for r in caplog.records if "recomputing every fork" in r.getMessage()]
    assert len(lines) == 1 and "Qwen3ForCausalLM" in lines[0] and "OddLayer" in lines[0]
    ref = fork_probe_recompute(model, tokenizer, PROMPT, vec, COEFF, 12, 4, SPLICE, ids, eos_token_id=[])
    assert_same(fast, ref)
    assert_same(again, ref)
    with pytest.raises(ValueError, match="cannot be forked exactly.*use fork_probe_recompute"):
        rollout(model, [5, 6], 3, torch.tensor([], dtype=torch.long))
