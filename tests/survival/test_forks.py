"""Tests of heal_pl.survival.forks: probes at fork points reusing the rollout's KV cache (docs/maths.md §4).

The reference (:func:`fork_probe_recompute`) shares no cache code with :func:`fork_probe`: its tokens come from
``heal_pl.models.generate.greedy_generate`` and each fork is one full cache-free forward through ``model(...).logits``.
Random tiny models put little mass on the answers, so pmass is compared relatively (rtol 1e-4) as well as to
1e-4 absolutely, and the forks are checked to differ from each other by far more than that tolerance.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from heal_pl.models.load import tiny_tokenizer
from heal_pl.steering import AdapterSteering, SteeringVector
from heal_pl.survival.fork_cache import fork_plan
from heal_pl.survival.forks import (
    ForkResult,
    fork_probe,
    fork_probe_recompute,
    packed_fork_mask,
    probe_forks,
    probe_forks_recompute,
    rollout,
)
from heal_pl.survival.probes import answer_token_ids, probe_from_logits
from tests.helpers import lively, lively_peft

PROMPT = "<|im_start|>user\nIs the sun cold?<|im_end|>\n<|im_start|>assistant\n"
SPLICE = "\nAnswer (true or false):"
W, STEP, COEFF = 30, 4, 8.0


def random_vector(seed: int = 0) -> SteeringVector:
    """A mean_diff-style vector with random unit directions at blocks 0 and 1."""
    g = torch.Generator().manual_seed(seed)
    return SteeringVector("mean_diff", {0: torch.randn(64, generator=g), 1: torch.randn(64, generator=g)})


def assert_same(a: ForkResult, b: ForkResult) -> None:
    assert torch.equal(a.tokens, b.tokens) and a.gen_len == b.gen_len
    np.testing.assert_array_equal(a.fork_points, b.fork_points)
    np.testing.assert_array_equal(np.isnan(a.pmass), np.isnan(b.pmass))
    np.testing.assert_allclose(a.pmass, b.pmass, rtol=1e-4, atol=0)
    np.testing.assert_allclose(a.pmass, b.pmass, rtol=0, atol=1e-4)
    np.testing.assert_allclose(a.p_true, b.p_true, rtol=0, atol=1e-4)


@pytest.mark.parametrize("style", ["llama", "qwen2"])
def test_cached_forks_equal_recomputed_forks(style: str, tokenizer) -> None:
    model = lively(style)
    ids = answer_token_ids(tokenizer)
    vec = random_vector()
    cached = fork_probe(model, tokenizer, PROMPT, vec, COEFF, W, STEP, SPLICE, ids, eos_token_id=[])
    ref = fork_probe_recompute(model, tokenizer, PROMPT, vec, COEFF, W, STEP, SPLICE, ids, eos_token_id=[])
    assert_same(cached, ref)
    assert cached.gen_len == W and cached.fork_points.tolist() == [0, 4, 8, 12, 16, 20, 24, 28, 30]
    assert cached.reached.all() and np.isfinite(cached.pmass).all() and cached.pmass.dtype == np.float64
    assert ((cached.p_true > 0) & (cached.p_true < 1)).all()
    # the tolerance discriminates: neighbouring forks (one cropping step off) differ by far more than 1e-4 rel
    assert np.min(np.abs(np.diff(cached.pmass)) / cached.pmass[1:]) > 1e-2
    # the steering does change the rollout
    plain = fork_probe(model, tokenizer, PROMPT, vec, 0.0, W, STEP, SPLICE, ids, eos_token_id=[])
    assert not torch.equal(plain.tokens, cached.tokens)


def test_explicit_forks_and_the_fork_at_the_last_token(tokenizer) -> None:
    model = lively()
    ids = answer_token_ids(tokenizer)
    vec = random_vector(1)
    forks = [0, 1, 2, 7, 19, 29, 30]
    cached = fork_probe(model, tokenizer, PROMPT, vec, -COEFF, W, forks, SPLICE, ids, eos_token_id=[])
    assert_same(cached, fork_probe_recompute(model, tokenizer, PROMPT, vec, -COEFF, W, forks, SPLICE, ids,
                                             eos_token_id=[]))
    # the last fork by hand: prompt + every generated token + splice, one plain forward
    seq = tokenizer(PROMPT, add_special_tokens=False)["input_ids"] + cached.tokens.tolist()
    seq += tokenizer(SPLICE, add_special_tokens=False)["input_ids"]
    with vec.steering(model, -COEFF), torch.no_grad():
        pmass, p_true = probe_from_logits(model(input_ids=torch.tensor([seq])).logits[:, -1], ids)
    assert cached.pmass[-1] == pytest.approx(float(pmass[0]), rel=1e-4)
    assert cached.p_true[-1] == pytest.approx(float(p_true[0]), abs=1e-4)


def test_eos_ends_the_rollout_and_later_forks_are_nan(tokenizer) -> None:
    model = lively()
    ids = answer_token_ids(tokenizer)
    vec = random_vector()
    full = fork_probe(model, tokenizer, PROMPT, vec, COEFF, W, STEP, SPLICE, ids, eos_token_id=[])
    toks = full.tokens.tolist()
    k = next(i for i in range(9, W) if toks[i] not in toks[:i])  # a token first produced at step k ≥ 9
    eos, g = toks[k], k + 1
    forks = sorted({*range(0, W + 1, STEP), g})  # includes the fork at the EOS itself
    stopped = fork_probe(model, tokenizer, PROMPT, vec, COEFF, W, forks, SPLICE, ids, eos_token_id=eos)
    assert stopped.gen_len == g and stopped.tokens.tolist() == toks[:g]
    reached = np.asarray(forks) <= g
    assert stopped.reached.tolist() == reached.tolist() and 2 < reached.sum() < len(forks)
    assert np.isnan(stopped.pmass[~reached]).all() and np.isnan(stopped.p_true[~reached]).all()
    assert np.isfinite(stopped.pmass[reached]).all()
    # a fork only sees its prefix: reached forks match the rollout that did not stop
    on_both = [j for j, t in enumerate(forks) if t in full.fork_points.tolist() and t <= g]
    same = [full.fork_points.tolist().index(forks[j]) for j in on_both]
    np.testing.assert_allclose(stopped.pmass[on_both], full.pmass[same], rtol=1e-5)
    assert_same(stopped, fork_probe_recompute(model, tokenizer, PROMPT, vec, COEFF, W, forks, SPLICE, ids,
                                              eos_token_id=eos))
    # the default EOS comes from the generation config (as in heal_pl.steering.trajectory)
    model.generation_config.eos_token_id = [eos]
    assert fork_probe(model, tokenizer, PROMPT, vec, COEFF, W, forks, SPLICE, ids).gen_len == g


def test_the_splice_closes_an_open_thinking_block() -> None:
    tok = tiny_tokenizer()
    tok.add_tokens(["<think>", "</think>"], special_tokens=True)
    model = lively(vocab_size=len(tok))
    ids = answer_token_ids(tok)
    prompt = PROMPT + "<think>\n"
    vec = random_vector()
    cached = fork_probe(model, tok, prompt, vec, COEFF, 12, 4, SPLICE, ids, eos_token_id=[])
    assert_same(cached, fork_probe_recompute(model, tok, prompt, vec, COEFF, 12, 4, SPLICE, ids, eos_token_id=[]))
    seq = tok(prompt, add_special_tokens=False)["input_ids"] + tok("</think>\n\n" + SPLICE, add_special_tokens=False)[
        "input_ids"]
    with vec.steering(model, COEFF), torch.no_grad():
        pmass, _ = probe_from_logits(model(input_ids=torch.tensor([seq])).logits[:, -1], ids)
    assert cached.pmass[0] == pytest.approx(float(pmass[0]), rel=1e-4)


def test_model_mode_and_cache_setting_are_left_as_found(tokenizer) -> None:
    model = lively().train()
    use_cache = model.config.use_cache
    ids = answer_token_ids(tokenizer)
    vec = random_vector()
    first = fork_probe(model, tokenizer, PROMPT, vec, COEFF, 10, 3, SPLICE, ids, eos_token_id=[])
    assert model.training and model.config.use_cache == use_cache
    fork_probe_recompute(model, tokenizer, PROMPT, vec, COEFF, 10, 3, SPLICE, ids, eos_token_id=[])
    assert model.training and model.config.use_cache == use_cache
    again = fork_probe(model, tokenizer, PROMPT, vec, COEFF, 10, 3, SPLICE, ids, eos_token_id=[])
    np.testing.assert_array_equal(first.pmass, again.pmass)  # no state carried between calls


def test_bad_input(tokenizer) -> None:
    model = lively()
    ids = answer_token_ids(tokenizer)
    vec = random_vector()

    def run(**kw: object) -> ForkResult:
        args = dict(prompt=PROMPT, method=vec, coeff=COEFF, w=8, fork_points=2, splice=SPLICE, answer_ids=ids)
        return fork_probe(model, tokenizer, **(args | kw))

    n_prompt = len(tokenizer(PROMPT, add_special_tokens=False)["input_ids"])
    n_splice = len(tokenizer(SPLICE, add_special_tokens=False)["input_ids"])
    with pytest.raises(ValueError, match=r"w=600 is longer than the model's context.*max_position_embeddings=512"):
        run(w=600)
    most = 512 - n_prompt - n_splice
    with pytest.raises(ValueError, match=rf"w={most + 1} is longer.*use w <= {most}"):
        run(w=most + 1, fork_points=[0])
    with pytest.raises(ValueError, match=rf"w={most + 1} is longer"):
        fork_probe_recompute(model, tokenizer, PROMPT, vec, COEFF, most + 1, [0], SPLICE, ids)
    with pytest.raises(ValueError, match="w=0 must be an integer >= 1"):
        run(w=0)
    with pytest.raises(ValueError, match="fork step=0 must be an integer > 0"):
        run(fork_points=0)
    with pytest.raises(ValueError, match="strictly increasing"):
        run(fork_points=[0, 4, 2])
    with pytest.raises(ValueError, match=r"must lie in \[0, w=8\]"):
        run(fork_points=[0, 9])
    with pytest.raises(ValueError, match=r"must lie in \[0, w=8\]"):
        run(fork_points=[-1, 2])
    with pytest.raises(ValueError, match="fork_points must be integers"):
        run(fork_points=[0.5, 2])
    with pytest.raises(ValueError, match="non-empty 1-D"):
        run(fork_points=[])
    with pytest.raises(ValueError, match="splice='' tokenizes to nothing"):
        run(splice="")
    with pytest.raises(ValueError, match="prompt='' has no tokens"):
        run(prompt="")
    with pytest.raises(ValueError, match="coeff=nan must be finite"):
        run(coeff=float("nan"))
    with pytest.raises(TypeError, match="expected an object with steering"):
        run(method=torch.ones(64))


def test_an_all_sliding_window_cache_forks_exactly(tokenizer) -> None:
    """Every layer sliding (one mask for all layers, no per-kind mapping), window 8 < prompt + w."""
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, use_sliding_window=True, sliding_window=8,
                         max_window_layers=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(10)
    ids = answer_token_ids(tokenizer)
    plan = fork_plan(model)
    assert plan is not None and plan.mode == "packed" and plan.window == 8 and not plan.mapping
    cached = fork_probe(model, tokenizer, PROMPT, random_vector(), COEFF, 20, 2, SPLICE, ids, eos_token_id=[])
    assert_same(cached, fork_probe_recompute(model, tokenizer, PROMPT, random_vector(), COEFF, 20, 2, SPLICE, ids,
                                             eos_token_id=[]))  # fmt: skip


def test_adapter_steering_cached_equals_recomputed(tokenizer) -> None:
    model = lively_peft()
    ids = answer_token_ids(tokenizer)
    method = AdapterSteering(model)
    cached = fork_probe(model, tokenizer, PROMPT, method, 2.0, 16, 5, SPLICE, ids, eos_token_id=[])
    assert_same(cached, fork_probe_recompute(model, tokenizer, PROMPT, method, 2.0, 16, 5, SPLICE, ids,
                                             eos_token_id=[]))
    assert cached.fork_points.tolist() == [0, 5, 10, 15, 16] and np.isfinite(cached.pmass).all()


def test_packed_mask_matches_a_loop_reference() -> None:
    keeps, lens, cached = [3, 5, 5, 1], [2, 3, 1, 2], 6
    mask = packed_fork_mask(keeps, lens, cached, torch.float32)
    Q = sum(lens)
    assert mask.shape == (1, 1, Q, cached + Q)
    ref = np.zeros((Q, cached + Q), dtype=bool)
    q = 0
    for j, (k, n) in enumerate(zip(keeps, lens, strict=True)):
        start = sum(lens[:j])
        for i in range(n):
            ref[q, :k] = True  # the cache cropped to k positions
            ref[q, cached + start : cached + start + i + 1] = True  # own segment, causal
            q += 1
    allowed = (mask[0, 0] == 0).numpy()
    np.testing.assert_array_equal(allowed, ref)
    assert torch.all(mask[0, 0][~torch.from_numpy(ref)] == torch.finfo(torch.float32).min)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_probe_forks_on_given_tokens_equals_recompute(attn: str, tokenizer) -> None:
    model = lively()
    model.set_attn_implementation(attn)
    ids = answer_token_ids(tokenizer)
    vec = random_vector(2)
    ref = fork_probe_recompute(model, tokenizer, PROMPT, vec, COEFF, W, STEP, SPLICE, ids, eos_token_id=[])
    tokens = ref.tokens[:23]  # a trajectory that "ended" at 23 tokens: forks 24, 28, 30 are past its end
    given = probe_forks(model, tokenizer, PROMPT, tokens, vec, COEFF, W, STEP, SPLICE, ids)
    assert given.gen_len == 23 and np.isnan(given.pmass[given.fork_points > 23]).all()
    assert_same(given, probe_forks_recompute(model, tokenizer, PROMPT, tokens, vec, COEFF, W, STEP, SPLICE, ids))
    # forks packed two per forward, and on the rollout's own cache, give the same numbers
    assert_same(given, probe_forks(model, tokenizer, PROMPT, tokens, vec, COEFF, W, STEP, SPLICE, ids, fork_batch=2))
    prompt_ids = tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    with vec.steering(model, COEFF), torch.no_grad():
        gen, cache = rollout(model, prompt_ids, W, torch.tensor([], dtype=torch.long))
    n_cache = cache.get_seq_length()
    on_cache = probe_forks(model, tokenizer, PROMPT, gen, vec, COEFF, W, STEP, SPLICE, ids, cache=cache)
    assert cache.get_seq_length() == n_cache == len(prompt_ids) + W - 1  # left as it came
    assert_same(on_cache, ref)


def test_probe_forks_bad_input(tokenizer) -> None:
    model = lively()
    ids = answer_token_ids(tokenizer)
    vec = random_vector()
    args = (vec, COEFF, 8, 2, SPLICE, ids)
    with pytest.raises(ValueError, match="tokens holds 0 generated ids; need 1 <= len"):
        probe_forks(model, tokenizer, PROMPT, [], *args)
    with pytest.raises(ValueError, match="tokens holds 9 generated ids.*w=8"):
        probe_forks(model, tokenizer, PROMPT, list(range(5, 14)), *args)
    with pytest.raises(ValueError, match="fork_batch=0 must be an integer >= 1"):
        probe_forks(model, tokenizer, PROMPT, [5, 6], *args, fork_batch=0)
    prompt_ids = tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        _, cache = rollout(model, prompt_ids, 4, torch.tensor([], dtype=torch.long))
    with pytest.raises(ValueError, match=rf"cache holds {len(prompt_ids) + 3} positions.*needs {len(prompt_ids) + 1}"):
        probe_forks(model, tokenizer, PROMPT, [5, 6], *args, cache=cache)
