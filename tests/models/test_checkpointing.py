"""Activation checkpointing in HealModule: the blocks recompute in backward (less is saved in forward), and the loss
and the adapter's gradients equal a run without it, with every dropout rate of the base set high (it must stay off)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.autograd.graph import saved_tensors_hooks
from transformers import LlamaForCausalLM

from heal_pl.adapters.lora import LoRASpec
from heal_pl.barrier.kl import KLBarrier
from heal_pl.models.checkpointing import checkpointed_blocks
from heal_pl.models.load import tiny_model
from heal_pl.module import HealModule
from tests.helpers import make_batch

FAMILIES = ["llama", "gemma3", "qwen3_5", "gpt2", "phi3"]


def dropout_everywhere(family: str, folder: Path) -> str:
    """A tiny ``family`` model saved with every dropout rate of its config at 0.3: any base dropout left on under
    checkpointing would change the loss."""
    model = tiny_model(family, vocab_size=300)
    rates = [k for k, v in vars(model.config).items() if isinstance(v, float) and k.endswith(("dropout", "pdrop"))]
    for k in rates:
        setattr(model.config, k, 0.3)
    model.save_pretrained(folder)
    return str(folder)


def step(model: str, checkpointing: bool, layers: list[float] | None = None) -> tuple[torch.Tensor, dict, int]:
    """Loss, adapter gradients and bytes saved for backward of one training forward; seeded alike in every arm."""
    torch.manual_seed(0)
    module = HealModule(model=model, lora=LoRASpec(r=4, dropout=0.2, layers=layers),
                        barrier=KLBarrier(agg="rmse", tau=0.0, lam=1.0), gradient_checkpointing=checkpointing)
    trainable = {n: p for n, p in module.named_parameters() if p.requires_grad}
    with torch.no_grad():
        for p in trainable.values():  # a non-zero adapter: KL > 0, the barrier pulls
            p.normal_(0, 0.05)
    module.train()
    saved = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[0] += t.numel() * t.element_size()
        return t

    torch.manual_seed(1)  # the LoRA dropout masks
    with saved_tensors_hooks(pack, lambda t: t):
        loss, scalars, _ = module.loss_terms(make_batch(B=3, T=24, vocab=300))
    loss.backward()
    assert scalars["barrier"] > 0
    return loss.detach(), {n: p.grad for n, p in trainable.items()}, saved[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_checkpointing_recomputes_and_changes_no_number(family: str, tmp_path: Path) -> None:
    model = dropout_everywhere(family, tmp_path / family)
    loss, grads, saved = step(model, checkpointing=False)
    loss_ck, grads_ck, saved_ck = step(model, checkpointing=True)
    torch.testing.assert_close(loss_ck, loss, rtol=1e-6, atol=0)
    assert grads.keys() == grads_ck.keys() and len(grads) > 0
    for name, grad in grads.items():
        torch.testing.assert_close(grads_ck[name], grad, rtol=1e-5, atol=1e-7, msg=name)
    assert saved_ck < 0.6 * saved, f"checkpointing saved {saved_ck} bytes for backward, without it {saved}"


def test_checkpointing_with_a_shared_prefix(tmp_path: Path) -> None:
    """Adapter on the upper half only: the ref reuses the student's lower blocks (heal_pl.barrier.shared_prefix)."""
    model = dropout_everywhere("llama", tmp_path / "llama")
    tiny = tiny_model("llama", vocab_size=300)
    tiny.save_pretrained(tmp_path / "plain")  # no dropout: the shared prefix is on
    for folder in (str(tmp_path / "plain"), model):
        loss, grads, _ = step(folder, checkpointing=False, layers=[0.5, 1.0])
        loss_ck, grads_ck, _ = step(folder, checkpointing=True, layers=[0.5, 1.0])
        torch.testing.assert_close(loss_ck, loss, rtol=1e-6, atol=0)
        for name, grad in grads.items():
            torch.testing.assert_close(grads_ck[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_only_the_blocks_flags_are_on(tmp_path: Path) -> None:
    module = HealModule(model=dropout_everywhere("gpt2", tmp_path / "gpt2"), gradient_checkpointing=True)
    module.train()
    blocks = checkpointed_blocks(module.student)
    assert len(blocks) == 2 and all(b.training for b in blocks)
    dropouts = [m for m in module.student.modules() if isinstance(m, torch.nn.Dropout) and m.p == 0.3]
    assert dropouts and not any(m.training for m in dropouts)
    module.eval()
    assert not any(b.training for b in blocks)


def test_a_model_without_checkpointing_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(LlamaForCausalLM, "supports_gradient_checkpointing", False)
    with pytest.raises(ValueError, match=r"gradient_checkpointing=True: LlamaForCausalLM does not support activation "
                                         r"checkpointing .*set gradient_checkpointing: false"):  # fmt: skip
        HealModule(model="tiny-llama", gradient_checkpointing=True)
