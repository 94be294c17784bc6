"""Baking adapters: the weights against a float64 reference, and 'baked + adapter off = previous round'."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from heal_pl.adapters.switch import adapter_off
from heal_pl.models.load import tiny_model
from heal_pl.rounds.bake import bake_adapter, bake_history

TARGETS = ["q_proj", "v_proj", "down_proj"]


def _random_adapter(folder: Path, seed: int) -> Path:
    config = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        get_peft_model(tiny_model(), config).save_pretrained(folder)
    return folder


def _lora_delta64(folder: Path, module_name: str) -> torch.Tensor:
    """s · B A in float64 from the saved adapter tensors (independent of peft's merge)."""
    from safetensors.torch import load_file

    tensors = load_file(str(folder / "adapter_model.safetensors"))
    key = next(k for k in tensors if module_name in k and "lora_A" in k)
    a, b = tensors[key].double(), tensors[key.replace("lora_A", "lora_B")].double()
    return (8 / 4) * b @ a


def test_bake_history_adds_every_delta_in_order(tmp_path: Path) -> None:
    dirs = [_random_adapter(tmp_path / f"a{i}", seed=i) for i in range(2)]
    w0 = tiny_model().model.layers[1].self_attn.q_proj.weight.detach().double()
    baked = bake_history(tiny_model(), dirs)
    want = w0 + sum(_lora_delta64(d, "layers.1.self_attn.q_proj") for d in dirs)
    got = baked.model.layers[1].self_attn.q_proj.weight.detach().double()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert not isinstance(baked, PeftModel)
    again = bake_history(tiny_model(), dirs)  # a resumed run re-bakes: bit for bit the same weights
    assert all(torch.equal(p, q) for p, q in zip(baked.state_dict().values(), again.state_dict().values(), strict=True))


def test_baked_history_with_the_next_adapter_off_reproduces_the_previous_student(tmp_path: Path) -> None:
    folder = _random_adapter(tmp_path / "round0", seed=1)
    ids = torch.randint(3, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    prev = PeftModel.from_pretrained(tiny_model(), str(folder)).eval()
    with torch.no_grad():
        want = prev(input_ids=ids).logits
    config = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False)
    current = get_peft_model(bake_adapter(tiny_model(), folder), config).eval()  # a non-zero next adapter
    with torch.no_grad(), adapter_off(current):
        off = current(input_ids=ids).logits
    with torch.no_grad():
        on = current(input_ids=ids).logits
    torch.testing.assert_close(off, want, atol=1e-5, rtol=1e-5)
    assert (on - want).abs().max() > 1e-3


def test_bad_input(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        bake_adapter(tiny_model(), tmp_path)
    folder = _random_adapter(tmp_path / "a", seed=0)
    with pytest.raises(TypeError, match="plain model"):
        bake_adapter(PeftModel.from_pretrained(tiny_model(), str(folder)), folder)
