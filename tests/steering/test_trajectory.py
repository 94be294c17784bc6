"""Tests of heal_pl.steering.trajectory: KL(steered ‖ base) along the greedy steered trajectory (docs/maths.md §3).

The reference is independent of the code under test: one prompt at a time, no padding, tokens from
transformers' own ``generate`` (greedy) under the steering context, log-probabilities from the model's full
``forward().logits``, KL summed in float64 by hand; statistics from numpy's percentiles.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from heal_pl.steering import AdapterSteering, SteeringVector, steer
from heal_pl.steering.trajectory import STATS, measure_kl, trajectory_stats
from tests.helpers import lively, lively_peft

PROMPTS = [
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
    "Hi",
    "The cat likes warm soup at home every morning.",
    "Is the sun cold?",
    "<|im_start|>user\nPlease tell me a short story about a small fox.<|im_end|>\n<|im_start|>assistant\n",
]
POS = ["The cat likes warm soup.", "We cook fresh bread.", "She reads an old book."]
NEG = ["Is the sun cold?", "What time is it?", "Where do fish live?"]
T = 10


def vector(model: nn.Module, tokenizer, method: str = "mean_diff") -> SteeringVector:
    return SteeringVector.fit(model, tokenizer, POS, NEG, method, layers=[0, 1])


def reference(
    model: nn.Module, tokenizer, prompt: str, steered: Callable, base: Callable, eos: list[int]
) -> tuple[Tensor, Tensor, Tensor]:
    """(generated ids, float64 KL per position, argmax of the steered forward) for one unpadded prompt."""
    ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])
    n_prompt = ids.shape[1]
    with torch.no_grad():
        with steered():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=T, do_sample=False,
                                 eos_token_id=eos, pad_token_id=tokenizer.pad_token_id)
        gen = out[0, n_prompt:]
        hit = torch.isin(gen, torch.tensor(eos)).nonzero()
        gen = gen[: int(hit[0]) + 1] if len(hit) else gen
        seq = torch.cat([ids[0], gen])[None]
        with steered():
            ls = model(input_ids=seq).logits[0, n_prompt - 1 : -1].double().log_softmax(-1)
        with base():
            lb = model(input_ids=seq).logits[0, n_prompt - 1 : -1].double().log_softmax(-1)
    return gen, (ls.exp() * (ls - lb)).sum(-1), ls.argmax(-1)


@pytest.mark.parametrize(("style", "coeff"), [("llama", 40.0), ("qwen2", 40.0), ("gpt2", 5.0)])
def test_batched_equals_one_prompt_at_a_time_and_the_reference(style: str, coeff: float, tokenizer) -> None:
    model = lively(style)
    vec = vector(model, tokenizer)
    batched = measure_kl(model, tokenizer, PROMPTS, vec, coeff, max_new_tokens=T, batch_size=3)
    assert len(batched.kl) == len(PROMPTS)
    for i, prompt in enumerate(PROMPTS):
        single = measure_kl(model, tokenizer, [prompt], vec, coeff, max_new_tokens=T, batch_size=1)
        assert torch.equal(single.tokens[0], batched.tokens[i])
        torch.testing.assert_close(batched.kl[i], single.kl[0], rtol=0, atol=1e-5)
        gen, kl_ref, argmax = reference(model, tokenizer, prompt, lambda: steer(model, vec, coeff),
                                        contextlib.nullcontext, [tokenizer.eos_token_id])
        assert torch.equal(batched.tokens[i], gen)
        assert torch.equal(argmax, gen)  # the steered forward recomputes the distributions that chose the tokens
        np.testing.assert_allclose(batched.kl[i].numpy(), kl_ref.numpy(), rtol=1e-4, atol=1e-5)
    assert batched.pooled.max() > 0.1  # the steering does move the model
    assert len({t for toks in batched.tokens for t in toks.tolist()}) > 5  # varied trajectories


def test_stats_are_numpy_percentiles_of_the_pooled_values(tokenizer) -> None:
    model = lively()
    result = measure_kl(model, tokenizer, PROMPTS, vector(model, tokenizer, "pca"), -30.0, max_new_tokens=T)
    pooled = np.concatenate([k.double().numpy() for k in result.kl])
    assert pooled.size == sum(len(t) for t in result.tokens) > len(PROMPTS) and result.pooled.dtype == torch.float32
    expected = {"mean": pooled.mean(), "max": pooled.max(), "rms": np.sqrt(np.mean(pooled**2))}
    expected |= {f"p{q}": np.percentile(pooled, q) for q in (50, 90, 95, 99)}
    assert list(result.stats) == list(STATS)
    for name in STATS:
        assert result.stats[name] == pytest.approx(expected[name], rel=1e-6, abs=1e-9), name
    assert result.coeff == -30.0


def test_trajectory_stats_edge_cases() -> None:
    assert trajectory_stats(torch.tensor([2.0])) == dict.fromkeys(STATS, 2.0)
    with pytest.raises(ValueError, match="non-empty 1-D"):
        trajectory_stats(torch.zeros(0))


@pytest.mark.parametrize("method", ["mean_diff", "pca"])
def test_kl_exactly_zero_at_alpha_zero_for_additive_methods(method: str, tokenizer) -> None:
    model = lively()
    result = measure_kl(model, tokenizer, PROMPTS, vector(model, tokenizer, method), 0.0, max_new_tokens=T)
    assert all(k.numel() > 0 and torch.equal(k, torch.zeros_like(k)) for k in result.kl)
    assert result.stats == dict.fromkeys(STATS, 0.0)


def test_directional_ablation_is_on_at_alpha_zero(tokenizer) -> None:
    model = lively()
    result = measure_kl(model, tokenizer, PROMPTS[:2], vector(model, tokenizer, "directional_ablation"), 0.0,
                        max_new_tokens=4)
    assert result.stats["max"] > 0


def test_eos_stops_a_prompt_and_later_positions_are_excluded(tokenizer) -> None:
    model = lively()
    vec = vector(model, tokenizer)
    full = measure_kl(model, tokenizer, PROMPTS, vec, 20.0, max_new_tokens=T, eos_token_id=[])
    k = 3
    eos = int(full.tokens[0][k])
    assert eos not in full.tokens[0][:k].tolist()  # prompt 0 first emits it at step k
    stopped = measure_kl(model, tokenizer, PROMPTS, vec, 20.0, max_new_tokens=T, eos_token_id=eos)
    lengths = []
    for i in range(len(PROMPTS)):
        seen = (full.tokens[i] == eos).nonzero()
        n = int(seen[0]) + 1 if len(seen) else T  # up to and including the first EOS
        lengths.append(n)
        assert torch.equal(stopped.tokens[i], full.tokens[i][:n])
        torch.testing.assert_close(stopped.kl[i], full.kl[i][:n], rtol=0, atol=1e-6)
    assert lengths[0] == k + 1 and max(lengths) == T  # one prompt stopped early, another ran to T
    truncated = torch.cat([full.kl[i][:n] for i, n in enumerate(lengths)])
    assert stopped.pooled.numel() == sum(lengths) < full.pooled.numel()
    for name, value in trajectory_stats(truncated).items():
        assert stopped.stats[name] == pytest.approx(value, rel=1e-5, abs=1e-7)


def test_default_eos_comes_from_the_tokenizer_and_the_generation_config(tokenizer) -> None:
    model = lively()
    vec = vector(model, tokenizer)
    full = measure_kl(model, tokenizer, PROMPTS[:1], vec, 20.0, max_new_tokens=T, eos_token_id=[])
    assert tokenizer.eos_token_id not in full.tokens[0].tolist()
    eos = int(full.tokens[0][2])
    n = int((full.tokens[0] == eos).nonzero()[0]) + 1
    model.generation_config.eos_token_id = [eos]
    stopped = measure_kl(model, tokenizer, PROMPTS[:1], vec, 20.0, max_new_tokens=T)
    assert torch.equal(stopped.tokens[0], full.tokens[0][:n])


def test_all_prompts_stop_early(tokenizer) -> None:
    model = lively()
    vec = vector(model, tokenizer)
    full = measure_kl(model, tokenizer, PROMPTS, vec, 20.0, max_new_tokens=T, eos_token_id=[])
    firsts = [int(t[0]) for t in full.tokens]
    stopped = measure_kl(model, tokenizer, PROMPTS, vec, 20.0, max_new_tokens=T, eos_token_id=firsts)
    assert [len(t) for t in stopped.tokens] == [1] * len(PROMPTS)
    torch.testing.assert_close(stopped.pooled, torch.stack([k[0] for k in full.kl]), rtol=0, atol=1e-6)


def test_adapter_steering(tokenizer) -> None:
    model = lively_peft()
    method = AdapterSteering(model)
    zero = measure_kl(model, tokenizer, PROMPTS, method, 0.0, max_new_tokens=T)
    assert zero.stats["max"] == 0.0
    result = measure_kl(model, tokenizer, PROMPTS, method, 1.0, max_new_tokens=T, batch_size=2)
    for i, prompt in enumerate(PROMPTS[:3]):  # α = 1 is the adapter as trained, the base has it switched off
        gen, kl_ref, _ = reference(model, tokenizer, prompt, contextlib.nullcontext, model.disable_adapter,
                                   [tokenizer.eos_token_id])
        assert torch.equal(result.tokens[i], gen)
        np.testing.assert_allclose(result.kl[i].numpy(), kl_ref.numpy(), rtol=1e-4, atol=1e-5)
    assert result.stats["p95"] > 0.01
    bigger = measure_kl(model, tokenizer, PROMPTS, method, 3.0, max_new_tokens=T)
    assert bigger.stats["mean"] > result.stats["mean"]


def test_model_mode_is_restored(tokenizer) -> None:
    model = lively().train()
    measure_kl(model, tokenizer, PROMPTS[:1], vector(model, tokenizer), 1.0, max_new_tokens=2)
    assert model.training


def test_bad_input(tokenizer) -> None:
    model = lively()
    vec = vector(model, tokenizer)
    with pytest.raises(ValueError, match="prompts is empty"):
        measure_kl(model, tokenizer, [], vec, 1.0)
    with pytest.raises(ValueError, match="max_new_tokens=0 must be an integer >= 1"):
        measure_kl(model, tokenizer, PROMPTS, vec, 1.0, max_new_tokens=0)
    with pytest.raises(ValueError, match="batch_size=0 must be an integer >= 1"):
        measure_kl(model, tokenizer, PROMPTS, vec, 1.0, batch_size=0)
    with pytest.raises(ValueError, match="coeff=inf must be finite"):
        measure_kl(model, tokenizer, PROMPTS, vec, float("inf"))
    with pytest.raises(ValueError, match="prompt 1 .* has no tokens"):
        measure_kl(model, tokenizer, ["Hi", ""], vec, 1.0)
    with pytest.raises(TypeError, match="expected an object with steering"):
        measure_kl(model, tokenizer, PROMPTS, torch.ones(64), 1.0)


@pytest.mark.slow
def test_smollm2_batched_equals_one_prompt_at_a_time() -> None:
    from heal_pl.models.load import load_model, load_tokenizer

    model, tok = load_model("smollm2-135m-instruct"), load_tokenizer("smollm2-135m-instruct")

    def chat(question: str, system: str | None = None) -> str:
        messages = [{"role": "system", "content": system}] if system else []
        messages.append({"role": "user", "content": question})
        return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    questions = ["What is the capital of France?", "How do I make tea?", "Why is the sky blue?"]
    pirate = "You are Captain Jack, a jolly pirate. Talk like a pirate."
    vec = SteeringVector.fit(model, tok, [chat(q, pirate) for q in questions], [chat(q) for q in questions],
                             "mean_diff", layers=0.5)
    prompts = [chat("Hi"), chat("What do cows eat? Answer in one long sentence with details."), chat("Is water wet?")]
    batched = measure_kl(model, tok, prompts, vec, 6.0, max_new_tokens=16)
    assert int(batched.tokens[0][-1]) == tok.eos_token_id and len(batched.tokens[0]) < 16  # "Hi" ends early
    assert len(batched.tokens[1]) == 16 and batched.stats["max"] > 0
    for i, prompt in enumerate(prompts):
        single = measure_kl(model, tok, [prompt], vec, 6.0, max_new_tokens=16)
        assert torch.equal(single.tokens[0], batched.tokens[i])
        torch.testing.assert_close(batched.kl[i], single.kl[0], rtol=0, atol=1e-5)
