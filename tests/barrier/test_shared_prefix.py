"""Shared prefix: the ref's forward starts at the first adapted block and gives the same KL, bit for bit."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from heal_pl.adapters.lora import LoRASpec
from heal_pl.barrier.kl import KLBarrier
from heal_pl.barrier.shared_prefix import SharedPrefix, first_adapted_block
from heal_pl.module import HealModule
from heal_pl.steering.hooks import find_blocks
from tests.helpers import make_batch

# family, decoder depth of its tiny model, the adapted depth range -> first adapted block
CASES = [("llama", (0.5, 1.0), 1), ("gemma3", (0.5, 1.0), 2), ("qwen3_5", (0.25, 0.75), 1), ("qwen2", None, 0)]


def _module(family: str, layers: tuple[float, float] | None) -> HealModule:
    torch.manual_seed(0)
    module = HealModule(model=f"tiny-{family}", lora=LoRASpec(layers=layers), barrier=KLBarrier(agg="max", tau=0.0))
    with torch.no_grad():  # a non-zero adapter, so the KL is not trivially 0
        for name, p in module.student.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return module


def _block_calls(module: HealModule) -> list[int]:
    calls = [0] * len(find_blocks(module.student))
    for i, block in enumerate(find_blocks(module.student)):
        block.mlp.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))  # work done inside
    return calls


@pytest.mark.parametrize(("family", "layers", "lo"), CASES)
def test_same_loss_and_gradient_as_the_full_ref_forward(family: str, layers, lo: int) -> None:
    batch = make_batch(seed=4)
    module = _module(family, layers)
    assert module.shared_prefix.lo == lo
    calls = _block_calls(module)
    loss, _, kl = module.loss_terms(batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    # every block ran twice (student, ref) except the shared ones, which ran once
    assert calls == [1] * lo + [2] * (len(calls) - lo)
    full = _module(family, layers)
    full.shared_prefix = SharedPrefix(full.student, 0)
    full_loss, _, full_kl = full.loss_terms(batch)
    full_loss.backward()
    assert kl.max() > 1e-4  # a real barrier, not a zero one
    assert torch.equal(kl, full_kl) and torch.equal(loss, full_loss)
    for n, p in full.named_parameters():
        if p.grad is not None:
            assert torch.equal(grads[n], p.grad), n
    assert module.shared_prefix._out is None  # nothing kept between steps


def test_nothing_is_shared_when_the_prefix_can_drop_out(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="heal_pl"):
        module = HealModule(model="tiny-gpt2", lora=LoRASpec(layers=(0.5, 1.0), target_modules=("c_attn",)))
    assert module.shared_prefix.lo == 0
    assert "blocks 0..0 are not shared between student and ref (config.attn_pdrop=0.1" in caplog.text


def test_an_adapter_outside_the_blocks_shares_nothing() -> None:
    model = nn.Module()
    model.model = nn.Module()
    model.model.embed = nn.Embedding(5, 4)
    model.model.layers = nn.ModuleList([nn.Linear(4, 4) for _ in range(3)])
    blocks = model.model.layers
    assert first_adapted_block(model, {id(blocks[2].weight)}) == 2
    assert first_adapted_block(model, {id(blocks[2].weight), id(blocks[1].bias)}) == 1
    assert first_adapted_block(model, {id(blocks[2].weight), id(model.model.embed.weight)}) == 0
    assert first_adapted_block(model, set()) == 0


def test_replay_without_capture_is_an_error() -> None:
    module = _module("llama", (0.5, 1.0))
    with pytest.raises(RuntimeError, match="replay\\(\\) without a captured forward"), module.shared_prefix.replay():
        pass
