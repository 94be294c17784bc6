"""ref = base under a baked history: HealModule.set_ref_model leashes the barrier to a separate frozen model."""

from __future__ import annotations

import pytest
import torch

from heal_pl.barrier.kl import KLBarrier, naive_token_stats
from heal_pl.models.load import load_model, tiny_model
from heal_pl.module import HealModule
from tests.helpers import make_batch


def _module() -> HealModule:
    m = HealModule(model="tiny-llama", barrier=KLBarrier(reg="kl_rev", agg="max", tau=0.0), chunk_size=5)
    with torch.no_grad():
        for name, p in m.student.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.2, generator=torch.Generator().manual_seed(3))
    return m


def _other_body() -> torch.nn.Module:
    """Other decoder weights, the same LM head: a stand-in for the original model under a baked history."""
    model = tiny_model(seed=1).eval()
    model.lm_head.weight.data.copy_(load_model("tiny-llama").lm_head.weight)
    return model


def test_ref_model_kl_equals_the_naive_computation_against_that_model() -> None:
    m, batch = _module(), make_batch(seed=1)
    ref = _other_body()
    m.set_ref_model(ref)
    _, _, kl = m.loss_terms(batch)
    with torch.no_grad():
        student = m.student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        ref_logits = ref(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(kl.detach(), naive_token_stats(student, ref_logits, batch["labels"]).kl,
                               rtol=1e-5, atol=1e-6)  # fmt: skip
    assert not any(p.requires_grad for p in ref.parameters())
    assert all(p is not q for p in ref.parameters() for q in m.parameters()), "the ref is not a submodule"
    assert m.trainable_names() == {n for n, p in m.named_parameters() if "lora_" in n}


def test_ref_model_equal_to_the_base_gives_the_default_kl_and_none_restores_it() -> None:
    m, batch = _module(), make_batch(seed=2)
    _, _, default = m.loss_terms(batch)
    m.set_ref_model(load_model("tiny-llama"))  # the same weights as the adapter-off student
    _, _, same = m.loss_terms(batch)
    torch.testing.assert_close(same, default, rtol=1e-5, atol=1e-6)
    m.set_ref_model(_other_body())
    _, _, other = m.loss_terms(batch)
    assert (other - default).abs().max() > 1e-3
    with pytest.raises(ValueError, match="LM head"):
        m.set_ref_model(tiny_model(seed=1))
    m.set_ref_model(None)
    torch.testing.assert_close(m.loss_terms(batch)[2], default)
