"""Bounded memory of heal_pl.steering.trajectory.measure_kl (issue 27): the LM head and the log-softmax run
``chunk_size`` rows at a time, never on a whole ``[B, n, V]`` block, and the KL is unchanged.

The reference is independent of the code under test: one prompt at a time, no padding, the model's OWN
``model(input_ids, attention_mask, position_ids).logits`` on ``prompt ⊕ tokens`` under the steering and the base
context, float64 log-softmax and the KL summed by hand.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import Tensor, nn

from heal_pl.barrier import kl as kl_module
from heal_pl.barrier.fused_head import head_stats
from heal_pl.models.lm import check_head
from heal_pl.steering import AdapterSteering, SteeringVector
from heal_pl.steering.trajectory import measure_kl
from tests.helpers import largest_vocab_rows, lively

PROMPTS = ["Is the sun cold?", "Hi", "<|im_start|>user\nTell me a short story about a fox.<|im_end|>\n"]
POS = ["The cat likes warm soup.", "We cook fresh bread.", "She reads an old book."]
NEG = ["Is the sun cold?", "What time is it?", "Where do fish live?"]
T, BATCH = 8, 2
CHUNKS = (1, 3, 1000)  # one row, a chunk that splits prompts unevenly, more rows than the whole batch holds
# family -> coefficient that moves the tiny model visibly (Gemma scales its embeddings by sqrt(H))
FAMILIES = {"llama": 40.0, "qwen2": 40.0, "qwen3_5": 40.0, "gemma2": 40.0, "gemma3": 200.0}


def reference_kl(model: nn.Module, tokenizer, prompt: str, tokens: Tensor, steered: Callable,
                 base: Callable) -> tuple[Tensor, Tensor]:  # fmt: skip
    """(float64 KL(steered ‖ base) per generated position, argmax of the steered logits) for one unpadded prompt."""
    ids = torch.tensor(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    seq = torch.cat([ids, tokens])[None]
    kwargs = {"input_ids": seq, "attention_mask": torch.ones_like(seq),
              "position_ids": torch.arange(seq.shape[1])[None]}  # fmt: skip
    rows = slice(len(ids) - 1, -1)  # row t predicts token t + 1
    with torch.no_grad():
        with steered():
            ls = model(**kwargs).logits[0, rows].double().log_softmax(-1)
        with base():
            lb = model(**kwargs).logits[0, rows].double().log_softmax(-1)
    return (ls.exp() * (ls - lb)).sum(-1), ls.argmax(-1)


def check_against_reference(model: nn.Module, tokenizer, method, coeff: float, steered: Callable,
                            base: Callable) -> None:  # fmt: skip
    results = [measure_kl(model, tokenizer, PROMPTS, method, coeff, max_new_tokens=T, batch_size=BATCH,
                          chunk_size=c) for c in CHUNKS]  # fmt: skip
    first = results[0]
    assert sum(len(t) for t in first.tokens) > max(CHUNKS[:2])  # several chunks per batch
    for result in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(result.tokens, first.tokens, strict=True))
        torch.testing.assert_close(result.pooled, first.pooled, rtol=1e-5, atol=1e-6)
    for i, prompt in enumerate(PROMPTS):
        kl_ref, argmax = reference_kl(model, tokenizer, prompt, first.tokens[i], steered, base)
        assert torch.equal(argmax, first.tokens[i])  # the greedy tokens are the steered model's own
        for result in results:
            torch.testing.assert_close(result.kl[i].double(), kl_ref, rtol=1e-4, atol=1e-5)
    assert first.pooled.max() > 0.05  # the steering does move the model


@pytest.mark.parametrize("family", list(FAMILIES))
def test_chunked_kl_equals_the_models_own_logits_in_float64(family: str, tokenizer) -> None:
    model = lively(family)
    vec = SteeringVector.fit(model, tokenizer, POS, NEG, "mean_diff", layers=[0, 1])
    coeff = FAMILIES[family]
    check_against_reference(model, tokenizer, vec, coeff, lambda: vec.steering(model, coeff), contextlib.nullcontext)


def test_a_lora_head_is_applied_in_each_sides_own_context(tokenizer) -> None:
    """A LoRA layer on lm_head changes the head itself: steered rows go through the adapter's head, base rows
    through the base head (the unfused path, one context per chunk)."""
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"], init_lora_weights=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        model = get_peft_model(lively(), config).eval()
    check_against_reference(model, tokenizer, AdapterSteering(model), 1.0, contextlib.nullcontext,
                            model.disable_adapter)  # fmt: skip


@pytest.mark.parametrize("chunk_size", [1, 3])
@pytest.mark.parametrize("lora_head", [False, True], ids=["fused", "lora-head"])
def test_no_whole_batch_by_positions_by_vocab_tensor(chunk_size: int, lora_head: bool, tokenizer,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """At most ``chunk_size`` rows of log-probabilities exist at once; head products have at most
    ``max(batch_size, 2 · chunk_size)`` rows (a generation step reads one row per prompt; the fused kernel
    multiplies the steered and the base rows of a chunk in one product). A ``[B, n, V]`` block has ``B · n``."""
    model = lively()
    if lora_head:
        config = LoraConfig(r=4, lora_alpha=8, target_modules=["lm_head"], init_lora_weights=False)
        model = get_peft_model(model, config).eval()
        method = AdapterSteering(model)
    else:
        method = SteeringVector.fit(model, tokenizer, POS, NEG, "mean_diff", layers=[0, 1])
    vocab = model.get_output_embeddings().weight.shape[0]
    check_head(model)  # its one-off probe (8 rows through the model's own forward) is cached: not counted below
    fused: list[int] = []
    monkeypatch.setattr(kl_module, "head_stats", lambda *a, **k: fused.append(1) or head_stats(*a, **k))
    with largest_vocab_rows(vocab) as seen:
        result = measure_kl(model, tokenizer, PROMPTS, method, 20.0, max_new_tokens=T, batch_size=BATCH,
                            chunk_size=chunk_size, eos_token_id=[])  # fmt: skip
    assert result.pooled.numel() == len(PROMPTS) * T  # every rollout runs to T: B · n = 16 rows per full batch
    assert 0 < seen["log_softmax"] <= chunk_size
    assert 0 < seen["head"] <= max(BATCH, 2 * chunk_size) < BATCH * T
    assert bool(fused) != lora_head  # a plain linear head runs the fused no-grad kernel, a LoRA head cannot


@pytest.mark.parametrize("bad", [0, -2, 2.5, True, None])
def test_bad_chunk_size(bad: object, tokenizer) -> None:
    model = lively()
    vec = SteeringVector.fit(model, tokenizer, POS, NEG, "mean_diff", layers=[0, 1])
    with pytest.raises(ValueError, match=rf"chunk_size={bad!r} must be an integer >= 1"):
        measure_kl(model, tokenizer, PROMPTS, vec, 1.0, max_new_tokens=2, chunk_size=bad)  # type: ignore[arg-type]
