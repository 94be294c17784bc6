"""A quantized base (bitsandbytes, on the CPU here): the blocks really are 4 or 8 bits, the KL heal_pl computes is the
model's own (student forward vs the same quantized base with the adapter off, by hand in float64), a zero adapter
reads 0, a short fit moves the adapter, and the bad inputs are refused before any weight is read."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import bitsandbytes as bnb
import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM

from heal_pl.adapters.lora import LoRASpec
from heal_pl.adapters.switch import adapter_off
from heal_pl.barrier.kl import KLBarrier
from heal_pl.models.checkpointing import checkpointed_blocks
from heal_pl.models.load import load_model, tiny_model
from heal_pl.models.quantize import is_quantized
from heal_pl.module import HealModule
from tests.helpers import make_batch

LAYER = {"nf4": bnb.nn.Linear4bit, "fp4": bnb.nn.Linear4bit, "int8": bnb.nn.Linear8bitLt}


def saved(family: str, folder: Path) -> str:
    tiny_model(family, vocab_size=300).save_pretrained(folder)
    return str(folder)


def quantized_module(model: str, quantize: str, **kwargs) -> HealModule:
    module = HealModule(model=model, quantize=quantize, lora=LoRASpec(r=4), barrier=KLBarrier(agg="rmse", tau=0.0),
                        **kwargs)  # fmt: skip
    with torch.no_grad():
        torch.manual_seed(0)
        for p in module.parameters():
            if p.requires_grad:  # a non-zero adapter
                p.normal_(0, 0.05)
    return module


@pytest.mark.parametrize("quantize", ["nf4", "int8"])
@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3"])
def test_the_kl_is_the_quantized_models_own(family: str, quantize: str, tmp_path: Path) -> None:
    module = quantized_module(saved(family, tmp_path / family), quantize)
    linears = [m for m in module.student.modules() if isinstance(m, torch.nn.Linear)]
    assert any(isinstance(m, LAYER[quantize]) for m in linears) and is_quantized(module.student)
    head = module.student.get_output_embeddings()
    assert not isinstance(head, LAYER[quantize]) and head.weight.dtype == torch.float32  # the head stays dtype
    module.train()
    batch = make_batch(B=3, T=16, vocab=300)
    with torch.no_grad():
        _, scalars, kl = module.loss_terms(batch)
        ids, mask = batch["input_ids"], batch["attention_mask"]
        student = module.student(input_ids=ids, attention_mask=mask).logits.double()
        with adapter_off(module.student):
            base = module.student(input_ids=ids, attention_mask=mask).logits.double()
    lp, lq = student[:, :-1].log_softmax(-1), base[:, :-1].log_softmax(-1)  # float64, by hand
    expected = (lp.exp() * (lp - lq)).sum(-1)[batch["labels"][:, 1:] != -100]
    assert expected.max() > 1e-3, "the adapter must move the model for this test to mean anything"
    torch.testing.assert_close(kl.double(), expected, rtol=1e-4, atol=1e-6)


def test_a_zero_adapter_reads_zero_and_a_fit_moves_it(tmp_path: Path) -> None:
    module = HealModule(model=saved("llama", tmp_path / "m"), quantize="nf4", lr=1e-2, warmup_steps=0,
                        barrier=KLBarrier(agg="max", tau=0.0), adapter_dir=str(tmp_path / "adapter"))  # fmt: skip
    module.train()
    _, _, kl = module.loss_terms(make_batch(vocab=300))
    assert kl.abs().max().item() == 0.0  # LoRA's B starts at zero: student == ref, bit for bit
    before = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(module, DataLoader([make_batch(seed=s, vocab=300) for s in range(2)], batch_size=None))
    moved = [n for n, p in module.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert moved and (tmp_path / "adapter" / "adapter_config.json").is_file()


def test_gradients_flow_through_the_4bit_blocks_as_through_their_dequantized_weights(tmp_path: Path) -> None:
    """The adapter's gradients on an nf4 base equal those on a float32 twin holding the dequantized weights: the
    backward crosses every frozen 4-bit layer (a layer that dropped its input gradient would zero the adapters
    below it)."""
    model = saved("llama", tmp_path / "m")
    twin = load_model(model, quantize="nf4").dequantize()
    twin.save_pretrained(tmp_path / "twin")
    results = []
    for folder, quantize in ((model, "nf4"), (str(tmp_path / "twin"), "none")):
        module = quantized_module(folder, quantize)
        module.train()
        loss, _, _ = module.loss_terms(make_batch(vocab=300))
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in module.named_parameters() if p.requires_grad}))
        packed = [m for m in module.modules() if getattr(getattr(getattr(m, "weight", None), "quant_state", None),
                                                         "packing_format_for_cpu", False)]  # fmt: skip
        assert not packed, "a 4-bit weight was repacked for inference (its matmul has no backward)"
    (loss, grads), (loss_twin, grads_twin) = results
    torch.testing.assert_close(loss, loss_twin, rtol=1e-5, atol=0)
    assert grads.keys() == grads_twin.keys()
    for name, grad in grads.items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(grad, grads_twin[name], rtol=1e-4, atol=1e-6, msg=name)


def test_checkpointing_on_a_quantized_base_changes_no_number(tmp_path: Path) -> None:
    model = saved("llama", tmp_path / "m")
    results = []
    for checkpointing in (False, True):
        module = quantized_module(model, "nf4", gradient_checkpointing=checkpointing)
        module.train()
        assert len(checkpointed_blocks(module.student)) == (2 if checkpointing else 0)
        loss, _, _ = module.loss_terms(make_batch(vocab=300))
        loss.backward()
        results.append((loss.detach(), [p.grad for p in module.parameters() if p.requires_grad]))
    (loss, grads), (loss_ck, grads_ck) = results
    torch.testing.assert_close(loss_ck, loss, rtol=1e-6, atol=0)
    for g, g_ck in zip(grads, grads_ck, strict=True):
        torch.testing.assert_close(g_ck, g, rtol=1e-5, atol=1e-7)


def test_bad_input_is_refused_before_any_weight_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_load(*args, **kwargs):
        raise AssertionError("weights were read before the check")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", no_load)
    with pytest.raises(ValueError, match=r"quantize='int4' is not allowed; choose one of none, nf4, fp4, int8"):
        HealModule(model="tiny-llama", quantize="int4")
    with pytest.raises(ValueError, match=r"quantize='nf4' needs adapter='lora'"):
        HealModule(model="tiny-llama", quantize="nf4", adapter="routed")
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes"
                        else real_find_spec(name, *a))  # fmt: skip
    with pytest.raises(ValueError, match=r"quantize='nf4' needs bitsandbytes, which is not installed: "
                                         r"pip install 'heal_pl\[quant\]'"):  # fmt: skip
        HealModule(model="tiny-llama", quantize="nf4")
