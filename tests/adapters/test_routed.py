"""Tests of heal_pl.adapters.routed (docs/maths.md §2): the delta / delta_hack adapter.

Expected updates are computed independently in float64 (torch / numpy SVD written out here).
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from heal_pl.adapters.routed import (
    RoutedAdapter,
    RoutedLinear,
    RoutedSpec,
    ablate_hack,
    adapter_off,
    read_spec,
    routed_modules,
    wrap_routed,
)
from heal_pl.models.load import tiny_model

STYLES = ("llama", "qwen2")
PARAMS = ("lora", "svd")
GRID = list(itertools.product(STYLES, PARAMS))


def ids(seed: int = 0, B: int = 2, T: int = 9) -> torch.Tensor:
    return torch.randint(3, 200, (B, T), generator=torch.Generator().manual_seed(seed))


def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=x).logits


def randomize(adapter: RoutedAdapter, seed: int, which: str, scale: float = 0.05) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in adapter:
            p = getattr(m, which)
            p.copy_(scale * torch.randn(p.shape, generator=gen))


@pytest.mark.parametrize(("style", "param"), GRID)
def test_bit_identical_to_base_at_init(style: str, param: str) -> None:
    x = ids()
    want = logits(tiny_model(style), x)
    model = tiny_model(style)
    adapter = wrap_routed(model, RoutedSpec(r=4, parametrization=param))
    assert len(adapter) == 2 * 7  # 2 blocks × 7 default targets
    assert torch.equal(logits(model, x), want)
    with adapter.ablate_hack():
        assert torch.equal(logits(model, x), want)


@pytest.mark.parametrize(("style", "param"), GRID)
def test_ablate_hack_removes_exactly_delta_hack(style: str, param: str) -> None:
    spec = RoutedSpec(r=4, parametrization=param, seed=3)
    x = ids(1)
    model = tiny_model(style)
    adapter = wrap_routed(model, spec)
    randomize(adapter, 10, "delta")
    randomize(adapter, 11, "delta_hack")
    only_delta = tiny_model(style)
    adapter_d = wrap_routed(only_delta, spec)
    randomize(adapter_d, 10, "delta")
    full = logits(model, x)
    with ablate_hack(model):
        ablated = logits(model, x)
    assert torch.equal(ablated, logits(only_delta, x))
    assert not torch.allclose(full, ablated, atol=1e-4)  # delta_hack did contribute
    assert torch.equal(logits(model, x), full)  # restored on exit


@pytest.mark.parametrize(("style", "param"), GRID)
def test_adapter_off_is_base(style: str, param: str) -> None:
    x = ids(2)
    want = logits(tiny_model(style), x)
    model = tiny_model(style)
    adapter = wrap_routed(model, RoutedSpec(r=3, parametrization=param))
    randomize(adapter, 1, "delta")
    randomize(adapter, 2, "delta_hack")
    assert not torch.allclose(logits(model, x), want, atol=1e-4)
    with adapter_off(model), ablate_hack(model):  # nesting restores each flag
        assert torch.equal(logits(model, x), want)
    with adapter.adapter_off():
        assert torch.equal(logits(model, x), want)
    assert all(m.adapter_on and m.hack_on for _, m in adapter)


def test_lora_delta_matches_float64() -> None:
    model = tiny_model("llama")
    adapter = wrap_routed(model, RoutedSpec(r=5, target_modules=("up_proj",), seed=7))
    name, m = next(iter(adapter))
    assert name == "model.layers.0.mlp.up_proj"
    A = m.A.double()
    np.testing.assert_allclose((A @ A.T).numpy(), np.eye(5), atol=1e-6)  # orthonormal rows
    randomize(adapter, 4, "delta", 0.3)
    randomize(adapter, 5, "delta_hack", 0.3)
    x = torch.randn(3, 6, 64, generator=torch.Generator().manual_seed(6))
    want_delta = (m.delta.double() + m.delta_hack.double()) @ A  # [d_out, d_in]
    want = x.double() @ (m.base.weight.double() + want_delta).T
    with torch.no_grad():
        torch.testing.assert_close(m(x).double(), want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(m.delta_weight().double(), want_delta, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(m.delta_weight(include_hack=False).double(), m.delta.double() @ A)


def test_svd_delta_matches_float64() -> None:
    model = tiny_model("qwen2")
    adapter = wrap_routed(model, RoutedSpec(r=6, parametrization="svd", target_modules=("down_proj",)))
    _, m = next(iter(adapter))
    W = m.base.weight.detach().double().numpy()  # [64, 128]
    U, S, Vh = np.linalg.svd(W, full_matrices=False)
    randomize(adapter, 8, "delta", 0.5)
    randomize(adapter, 9, "delta_hack", 0.5)
    dS = (m.delta + m.delta_hack).detach().double().numpy()
    want_delta = U[:, :6] @ np.diag(dS) @ Vh[:6]  # u_i v_iᵀ is sign-invariant
    x = torch.randn(2, 5, 128, generator=torch.Generator().manual_seed(1))
    want = x.double().numpy() @ (W + want_delta).T
    with torch.no_grad():
        np.testing.assert_allclose(m(x).double().numpy(), want, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(m.delta_weight().double().numpy(), want_delta, atol=1e-5)
    # with δS = −Σ_top the layer removes its own top-r singular directions
    with torch.no_grad():
        m.delta.copy_(-torch.from_numpy(S[:6]).float())
        m.delta_hack.zero_()
        rest = W - U[:, :6] @ np.diag(S[:6]) @ Vh[:6]
        np.testing.assert_allclose(m(x).double().numpy(), x.double().numpy() @ rest.T, atol=1e-4)


@pytest.mark.parametrize("param", PARAMS)
def test_gradient_reaches_both_knobs_and_only_them(param: str) -> None:
    model = tiny_model("llama")
    adapter = wrap_routed(model, RoutedSpec(r=4, parametrization=param))
    randomize(adapter, 0, "delta", 0.1)  # a non-zero knob so every layer's gradient is non-zero
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.{k}" for n in adapter.names() for k in ("delta", "delta_hack")}
    assert [id(p) for p in adapter.delta_params()] == [id(m.delta) for _, m in adapter]
    assert [id(p) for p in adapter.hack_params()] == [id(m.delta_hack) for _, m in adapter]
    x = ids(3)
    model(input_ids=x, labels=x).loss.backward()
    for _, m in adapter:
        assert m.delta.grad is not None and m.delta.grad.abs().sum() > 0
        assert m.delta_hack.grad is not None
        torch.testing.assert_close(m.delta_hack.grad, m.delta.grad)  # the update is linear in delta + delta_hack
    assert all(p.grad is None for n, p in model.named_parameters() if "delta" not in n)
    model.zero_grad(set_to_none=True)
    with adapter.ablate_hack():
        model(input_ids=x, labels=x).loss.backward()
    assert all(m.delta.grad is not None and m.delta_hack.grad is None for _, m in adapter)


def test_frames_are_frozen_buffers() -> None:
    for param, keys in (("lora", {"A"}), ("svd", {"U", "Vh"})):
        model = tiny_model("llama")
        adapter = wrap_routed(model, RoutedSpec(r=4, parametrization=param))
        params = dict(model.named_parameters())
        buffers = dict(model.named_buffers())
        for name, m in adapter:
            assert set(m.frame()) == keys
            for k in keys:
                assert f"{name}.{k}" in buffers and f"{name}.{k}" not in params
                assert not getattr(m, k).requires_grad


def test_fixed_a_deterministic_per_seed_and_name() -> None:
    a1 = wrap_routed(tiny_model("llama"), RoutedSpec(r=4, seed=1))
    a2 = wrap_routed(tiny_model("llama"), RoutedSpec(r=4, seed=1))
    a3 = wrap_routed(tiny_model("llama"), RoutedSpec(r=4, seed=2))
    frames = [[m.A for _, m in a] for a in (a1, a2, a3)]
    assert all(torch.equal(x, y) for x, y in zip(frames[0], frames[1], strict=True))
    assert not torch.equal(frames[0][0], frames[2][0])
    assert not torch.equal(frames[0][0], frames[0][7])  # q_proj of block 0 vs block 1


def test_targets_and_layers() -> None:
    model = tiny_model("qwen2", num_layers=4)
    adapter = wrap_routed(model, RoutedSpec(r=2, target_modules=["q_proj", "v_proj"], layers=(0.5, 1.0)))
    assert adapter.names() == [f"model.layers.{i}.self_attn.{t}" for i in (2, 3) for t in ("q_proj", "v_proj")]
    assert adapter.spec.target_modules == ("q_proj", "v_proj")
    assert isinstance(model.lm_head, nn.Linear) and not isinstance(model.lm_head, RoutedLinear)
    assert [n for n, _ in routed_modules(model)] == adapter.names()


@pytest.mark.parametrize("param", PARAMS)
def test_save_load_round_trip(tmp_path: Path, param: str) -> None:
    spec = RoutedSpec(r=3, parametrization=param, target_modules=("q_proj", "down_proj"), layers=(0.0, 0.5), seed=5)
    model = tiny_model("llama")
    adapter = wrap_routed(model, spec)
    randomize(adapter, 1, "delta")
    randomize(adapter, 2, "delta_hack")
    path = tmp_path / "routed.safetensors"
    adapter.save(path)
    assert read_spec(path) == spec
    fresh = tiny_model("llama")
    loaded = wrap_routed(fresh, read_spec(path)).load(path)
    x = ids(4)
    assert torch.equal(logits(fresh, x), logits(model, x))
    with ablate_hack(fresh), ablate_hack(model):
        assert torch.equal(logits(fresh, x), logits(model, x))
    for (n1, m1), (n2, m2) in zip(adapter, loaded, strict=True):
        assert n1 == n2
        assert torch.equal(m1.delta, m2.delta) and torch.equal(m1.delta_hack, m2.delta_hack)


def test_load_mismatch_errors(tmp_path: Path) -> None:
    path = tmp_path / "a.safetensors"
    wrap_routed(tiny_model("llama"), RoutedSpec(r=3)).save(path)
    with pytest.raises(ValueError, match="parametrization: file 'lora', model 'svd'"):
        wrap_routed(tiny_model("llama"), RoutedSpec(r=3, parametrization="svd")).load(path)
    with pytest.raises(ValueError, match=r"target_modules: file \('all-linear',\), model \('q_proj',\)"):  # the default
        wrap_routed(tiny_model("llama"), RoutedSpec(r=3, target_modules=("q_proj",))).load(path)
    with pytest.raises(ValueError, match="r: file 3, model 4"):
        wrap_routed(tiny_model("llama"), RoutedSpec(r=4)).load(path)
    with pytest.raises(ValueError, match="different layers: missing.*model.layers.2"):
        wrap_routed(tiny_model("llama", num_layers=3), RoutedSpec(r=3)).load(path)
    plain = tmp_path / "plain.safetensors"
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(plain))
    with pytest.raises(ValueError, match="not a heal_pl routed adapter"):
        read_spec(plain)


# --------------------------------------------------------------------------- bad input


def test_bad_specs() -> None:
    with pytest.raises(ValueError, match="parametrization='dora'.*lora, svd"):
        RoutedSpec(parametrization="dora")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="routed.r=0"):
        RoutedSpec(r=0)
    with pytest.raises(ValueError, match="target_modules is empty"):
        RoutedSpec(target_modules=())
    with pytest.raises(ValueError, match=r"routed.layers=\[0.7, 0.2\]"):
        RoutedSpec(layers=(0.7, 0.2))


def test_bad_wraps() -> None:
    with pytest.raises(ValueError, match=r"\['qproj'\] not found.*q_proj"):
        wrap_routed(tiny_model("llama"), RoutedSpec(target_modules=("qproj",)))
    with pytest.raises(ValueError, match="r=65 is too large.*lora needs r <= 64"):
        wrap_routed(tiny_model("llama"), RoutedSpec(r=65, target_modules=("q_proj",)))
    with pytest.raises(ValueError, match="svd needs r <= 32"):
        wrap_routed(tiny_model("llama"), RoutedSpec(r=33, parametrization="svd", target_modules=("k_proj",)))
    model = tiny_model("llama")
    wrap_routed(model, RoutedSpec(r=2))
    with pytest.raises(ValueError, match="already holds a routed adapter"):
        wrap_routed(model, RoutedSpec(r=2))
    with pytest.raises(ValueError, match="no routed adapter layer"), ablate_hack(tiny_model("llama")):
        pass


@pytest.mark.parametrize("param", PARAMS)
def test_bf16_base_float32_knobs(param: str) -> None:
    """Knobs and frames stay float32 on a bf16 base; at init the bf16 model is still exactly its base."""
    x = ids(5)
    want = logits(tiny_model("llama").to(torch.bfloat16), x)
    model = tiny_model("llama").to(torch.bfloat16)
    adapter = wrap_routed(model, RoutedSpec(r=4, parametrization=param))
    assert all(p.dtype == torch.float32 for p in adapter.delta_params() + adapter.hack_params())
    assert all(t.dtype == torch.float32 for _, m in adapter for t in m.frame().values())
    assert torch.equal(logits(model, x), want)
    randomize(adapter, 3, "delta")
    out = logits(model, x)
    assert out.dtype == torch.bfloat16 and not torch.equal(out, want)
