"""Tests of heal_pl.steering.adapter: a LoRA adapter's delta scaled by α (docs/maths.md §3).

References are independent of the scaling trick: the base is peft's ``disable_adapter()`` or a fresh copy
of the unwrapped model, α = 1 is the untouched peft model, and one LoRA linear's delta is recomputed in
float64 from its weights, ``lora_alpha / r · B A x``.
"""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import Linear as LoraLinear
from torch import Tensor

from heal_pl.models.load import tiny_model
from heal_pl.steering import AdapterSteering, SteeringMethod, steer

TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]


def lora_llama(dtype: torch.dtype = torch.float32, **config) -> PeftModel:
    """Tiny Llama with a rank-4 LoRA whose B is random (peft's init_lora_weights=False), so the delta is non-zero."""
    cfg = dict(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False) | config
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        model = get_peft_model(tiny_model("llama").to(dtype), LoraConfig(**cfg))
    return model.eval()


def ids() -> Tensor:
    return torch.tensor([[5, 17, 42, 99, 7, 301, 12], [8, 8, 250, 3, 64, 19, 77]])


def logits(model: torch.nn.Module) -> Tensor:
    with torch.no_grad():
        return model(input_ids=ids()).logits


def scalings(model: PeftModel) -> dict[str, float]:
    return {n: m.scaling["default"] for n, m in model.named_modules() if isinstance(m, LoraLinear)}


def test_is_a_steering_method() -> None:
    assert isinstance(AdapterSteering(lora_llama()), SteeringMethod)


def test_alpha_zero_is_the_base_exactly() -> None:
    model = lora_llama()
    method = AdapterSteering(model)
    with model.disable_adapter():
        base = logits(model)
    with method.steering(model, 0.0):
        steered = logits(model)
    assert torch.equal(steered, base)
    assert not torch.equal(logits(model), base)  # the adapter does change the output


def test_alpha_zero_equals_a_fresh_unwrapped_model() -> None:
    model = lora_llama()
    with AdapterSteering(model).base(model):
        steered = logits(model)
    assert torch.equal(steered, logits(tiny_model("llama").eval()))


def test_alpha_one_is_the_adapter_as_trained() -> None:
    model = lora_llama()
    trained = logits(model)
    with steer(model, AdapterSteering(model), 1.0):
        steered = logits(model)
    assert torch.equal(steered, trained)


@pytest.mark.parametrize("alpha", [2.0, -1.0, 0.37])
def test_one_lora_linear_delta_is_alpha_times_the_trained_delta(alpha: float) -> None:
    model = lora_llama(torch.float64)
    layer = model.get_base_model().model.layers[1].mlp.up_proj
    assert isinstance(layer, LoraLinear)
    x = torch.randn(3, 5, layer.in_features, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    delta_ref = (8 / 4) * (x @ A.T @ B.T)  # lora_alpha / r · B A x, by hand
    with torch.no_grad():
        base = layer.base_layer(x)
        with AdapterSteering(model).steering(model, 1.0):
            d1 = layer(x) - base
        with AdapterSteering(model).steering(model, alpha):
            da = layer(x) - base
    torch.testing.assert_close(d1, delta_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(da, alpha * d1, rtol=1e-12, atol=1e-12)
    assert delta_ref.abs().max() > 1e-3


def test_scaling_restored_after_an_exception() -> None:
    model = lora_llama()
    before, trained = scalings(model), logits(model)
    with pytest.raises(RuntimeError, match="boom"), AdapterSteering(model).steering(model, 3.0):
        assert all(v == 3.0 * before[n] for n, v in scalings(model).items())
        raise RuntimeError("boom")
    assert scalings(model) == before
    assert torch.equal(logits(model), trained)


def test_nested_contexts_restore_in_order() -> None:
    model = lora_llama()
    method, before = AdapterSteering(model), scalings(model)
    with method.steering(model, 2.0):
        with method.steering(model, 0.5):  # scales multiply: 2 · 0.5 = 1
            assert scalings(model) == pytest.approx(before)
        assert scalings(model) == pytest.approx({n: 2.0 * v for n, v in before.items()})
    assert scalings(model) == before


def test_layers_subset_scales_only_those_blocks() -> None:
    model = lora_llama()
    before = scalings(model)
    with AdapterSteering(model).steering(model, 2.0, layers=[1]):
        inside = scalings(model)
    assert len(before) == 2 * len(TARGETS)
    for name, value in inside.items():
        expected = 2.0 * before[name] if ".layers.1." in name else 0.0
        assert value == expected, name


def test_steering_accepts_the_inner_base_model() -> None:
    model = lora_llama()
    with model.disable_adapter():
        base = logits(model)
    with AdapterSteering(model).steering(model.get_base_model(), 0.0):
        assert torch.equal(logits(model), base)


def test_from_pretrained_round_trip(tmp_path) -> None:
    model = lora_llama()
    model.save_pretrained(tmp_path)
    method = AdapterSteering.from_pretrained(tiny_model("llama"), tmp_path)
    loaded = method.model.eval()
    assert torch.equal(logits(loaded), logits(model))
    with method.steering(loaded, 2.0):
        two_loaded = logits(loaded)
    with AdapterSteering(model).steering(model, 2.0):
        two = logits(model)
    assert torch.equal(two_loaded, two)


def test_bad_input() -> None:
    model = lora_llama()
    with pytest.raises(TypeError, match="peft.PeftModel"):
        AdapterSteering(tiny_model("llama"))
    with pytest.raises(ValueError, match="adapter_name='other'.*adapters present: \\['default'\\]"):
        AdapterSteering(model, adapter_name="other")
    with pytest.raises(ValueError, match="coeff=nan must be finite"):
        AdapterSteering(model).steering(model, float("nan"))
    with pytest.raises(ValueError, match="layer index 5 is out of range"):
        AdapterSteering(model).steering(model, 1.0, layers=[5])
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        AdapterSteering.from_pretrained(tiny_model("llama"), "/nonexistent/adapter")


def test_refuses_dora_merged_and_disabled_adapters() -> None:
    with pytest.raises(ValueError, match="LoRA variant"):
        AdapterSteering(lora_llama(use_dora=True))
    model = lora_llama()
    method = AdapterSteering(model)
    with model.disable_adapter(), pytest.raises(ValueError, match="not active"):
        method.steering(model, 1.0)
    model.merge_adapter()
    with pytest.raises(ValueError, match="merged into the base weights"):
        method.steering(model, 1.0)
