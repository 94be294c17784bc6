"""Tests of heal_pl.steering.prompt_baseline: KL(with a system prompt ‖ without) along the prompted rollout.

The reference is independent of the code under test: one question at a time, no padding, tokens from
transformers' own greedy ``generate`` on the prompt WITH the system message, then the model's full
``forward().logits`` on the two whole sequences (system prompt ⊕ tokens, no system prompt ⊕ tokens), KL summed in
float64 by hand. Left padding of two prefixes of different lengths and their position ids are what this checks
(gpt2's absolute position embeddings would shift under a wrong position id).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from heal_pl.data.prompts import PIRATE, chat_prompt
from heal_pl.steering.prompt_baseline import SystemPrompt, prompt_kl
from heal_pl.steering.trajectory import STATS, measure_kl
from tests.helpers import lively

QUESTIONS = ["Is the sun cold?", "Hi", "Please tell me a short story about a small fox that lives in a wood.",
             "What is the capital of France?", "Do fish swim?"]  # fmt: skip
T = 10


def reference(
    model: torch.nn.Module, tokenizer, question: str, system: str, max_new_tokens: int = T
) -> tuple[torch.Tensor, torch.Tensor]:
    """(generated ids, float64 KL per position) for one question, from whole unpadded sequences."""
    with_s = torch.tensor([tokenizer(chat_prompt(tokenizer, question, system), add_special_tokens=False)["input_ids"]])
    without = torch.tensor([tokenizer(chat_prompt(tokenizer, question, None), add_special_tokens=False)["input_ids"]])
    eos = tokenizer.eos_token_id
    with torch.no_grad():
        out = model.generate(with_s, attention_mask=torch.ones_like(with_s), max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
        gen = out[0, with_s.shape[1] :]
        hit = (gen == eos).nonzero()
        gen = gen[: int(hit[0]) + 1] if len(hit) else gen
        ls = model(input_ids=torch.cat([with_s[0], gen])[None]).logits[0, with_s.shape[1] - 1 : -1]
        lb = model(input_ids=torch.cat([without[0], gen])[None]).logits[0, without.shape[1] - 1 : -1]
    ls, lb = ls.double().log_softmax(-1), lb.double().log_softmax(-1)
    return gen, (ls.exp() * (ls - lb)).sum(-1)


@pytest.mark.parametrize("style", ["llama", "qwen2", "gpt2"])
def test_prompt_kl_equals_the_models_own_forward_on_both_full_sequences(style: str, tokenizer) -> None:
    model = lively(style)
    result = prompt_kl(model, tokenizer, QUESTIONS, PIRATE, max_new_tokens=T, batch_size=3)
    assert len(result.kl) == len(QUESTIONS) and result.coeff == 1.0
    for i, q in enumerate(QUESTIONS):
        gen, kl_ref = reference(model, tokenizer, q, PIRATE)
        assert torch.equal(result.tokens[i], gen)  # the rollout is the one WITH the system prompt
        np.testing.assert_allclose(result.kl[i].numpy(), kl_ref.numpy(), rtol=1e-4, atol=1e-5)
    pooled = np.concatenate([k.double().numpy() for k in result.kl])
    assert result.stats["p95"] == pytest.approx(np.percentile(pooled, 95), rel=1e-6)
    assert result.stats["max"] == pytest.approx(pooled.max(), rel=1e-6) and result.stats["max"] > 0.1
    assert list(result.stats) == list(STATS)


def test_kl_is_zero_exactly_when_both_sides_have_the_same_prefix(tokenizer) -> None:
    model = lively()
    steered, _ = SystemPrompt(PIRATE).prompts(tokenizer, QUESTIONS)
    result = measure_kl(model, tokenizer, steered, SystemPrompt(PIRATE), 1.0, max_new_tokens=T, batch_size=2,
                        base_prompts=list(steered))  # fmt: skip
    assert all(k.numel() > 0 and torch.equal(k, torch.zeros_like(k)) for k in result.kl)
    assert result.stats == dict.fromkeys(STATS, 0.0)


def test_the_method_leaves_the_model_untouched(tokenizer) -> None:
    model = lively()
    ids = torch.tensor([tokenizer("Is the sun cold?", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        before = model(input_ids=ids).logits
        with SystemPrompt(PIRATE).steering(model, 7.0):
            inside = model(input_ids=ids).logits
    assert torch.equal(before, inside)
    steered, base = SystemPrompt("Be brief.").prompts(tokenizer, ["Hi"])
    assert steered == [chat_prompt(tokenizer, "Hi", "Be brief.")] and base == [chat_prompt(tokenizer, "Hi", None)]
    assert "Be brief." in steered[0] and "Be brief." not in base[0]


@pytest.mark.parametrize("system", ["", "   \n", None])
def test_an_empty_system_prompt_is_refused(system: object, tokenizer) -> None:
    with pytest.raises(ValueError, match=r"system=.* is empty: the prompt baseline compares a system prompt"):
        prompt_kl(lively(), tokenizer, QUESTIONS, system, max_new_tokens=2)  # type: ignore[arg-type]


def test_base_prompts_of_another_length_are_refused(tokenizer) -> None:
    with pytest.raises(ValueError, match="base_prompts holds 1 prompts, prompts 2"):
        measure_kl(lively(), tokenizer, ["a", "b"], SystemPrompt(PIRATE), 1.0, max_new_tokens=2, base_prompts=["a"])
