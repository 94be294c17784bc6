"""Gradient routing inside training (docs/maths.md §2): ``route_gradients`` and ``HealModule(adapter="routed")``.

References: the projection recomputed in float64 numpy from the knob gradients of a real backward pass;
routed weights rebuilt in a fresh model from the saved knobs.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from heal_pl.adapters.routed import RoutedAdapter, RoutedSpec, read_spec, wrap_routed
from heal_pl.barrier.kl import KLBarrier
from heal_pl.callbacks import RouteAblateEvalCallback
from heal_pl.data.datamodule import HealDataModule
from heal_pl.models.load import load_model, tiny_model, tiny_tokenizer
from heal_pl.module import HealModule
from heal_pl.routing.train import route_gradients
from tests.helpers import make_batch

SPEC = RoutedSpec(r=4, target_modules=("q_proj", "v_proj", "down_proj"))


def backward(param: str = "lora") -> tuple[torch.nn.Module, RoutedAdapter, dict[str, np.ndarray]]:
    """A routed tiny model with random knobs after one backward pass; ``g`` per module in float64."""
    model = tiny_model("llama")
    adapter = wrap_routed(model, RoutedSpec(r=4, parametrization=param, target_modules=SPEC.target_modules))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, m in adapter:
            m.delta.copy_(0.05 * torch.randn(m.delta.shape, generator=gen))
    model(**make_batch(vocab=200)).loss.backward()
    return model, adapter, {n: m.delta.grad.double().flatten().numpy() for n, m in adapter}


def random_bases(adapter: RoutedAdapter, k: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    rs = np.random.default_rng(seed)
    out = {}
    for name, m in adapter:
        q, _ = np.linalg.qr(rs.standard_normal((m.delta.numel(), k)))
        out[name] = torch.tensor(q.T, dtype=torch.float32)
    return out


def reference(g: np.ndarray, V: np.ndarray, gate: str, overshoot: float, preserve: bool) -> tuple[np.ndarray, ...]:
    c = V @ g
    c_use = {"one_sided": np.maximum(c, 0), "no_gate": c, "reverse": 2 * c}[gate]
    removed = overshoot * c_use @ V
    g_proj = g - removed
    if preserve:
        g_proj = g_proj * np.linalg.norm(g) / np.linalg.norm(g_proj)
    return g_proj, removed


GRID = list(itertools.product(["none", "erase", "route"], ["one_sided", "no_gate", "reverse"], [0.5, 1.5],
                              [False, True], ["lora", "svd"]))  # fmt: skip


@pytest.mark.parametrize(("arm", "gate", "overshoot", "preserve", "param"), GRID)
def test_route_gradients_against_float64(arm: str, gate: str, overshoot: float, preserve: bool, param: str) -> None:
    _, adapter, g = backward(param)
    bases = random_bases(adapter)
    metrics = route_gradients(adapter, bases, arm, gate, overshoot, preserve)
    cins, couts = [], []
    for name, m in adapter:
        V = bases[name].double().numpy()
        g_proj, removed = reference(g[name], V, gate, overshoot, preserve)
        kept = g[name] if arm == "none" else g_proj
        scale = np.abs(g[name]).max()
        np.testing.assert_allclose(m.delta.grad.double().flatten().numpy(), kept, atol=1e-5 * scale)
        assert m.delta.grad.shape == m.delta.shape
        if arm == "route":
            np.testing.assert_allclose(m.delta_hack.grad.double().flatten().numpy(), removed, atol=1e-5 * scale)
        else:
            assert m.delta_hack.grad is None
        cins.append(np.linalg.norm(np.maximum(V @ g[name], 0)) / np.linalg.norm(g[name]))
        couts.append(np.linalg.norm(np.maximum(V @ kept, 0)) / np.linalg.norm(kept))
    assert metrics["cin"] == pytest.approx(np.mean(cins), rel=1e-4)
    assert metrics["cout"] == pytest.approx(np.mean(couts), rel=1e-4, abs=1e-6)
    assert metrics["fired"] == pytest.approx(np.mean([c > 1e-6 for c in cins]))


def test_one_sided_route_removes_only_hackward_components() -> None:
    _, adapter, g = backward()
    bases = {n: torch.tensor(-(v / np.linalg.norm(v))[None, :], dtype=torch.float32) for n, v in g.items()}
    metrics = route_gradients(adapter, bases, "route")  # every g points away from the hack: nothing to remove
    assert metrics == {"cin": 0.0, "cout": 0.0, "fired": 0.0}
    for name, m in adapter:
        assert np.array_equal(m.delta.grad.double().flatten().numpy(), g[name])
        assert not m.delta_hack.grad.any()


def test_modules_without_gradient_are_skipped() -> None:
    _, adapter, _ = backward()
    first, m0 = next(iter(adapter))
    m0.delta.grad = None
    bases = random_bases(adapter)
    route_gradients(adapter, bases, "route")
    assert m0.delta.grad is None and m0.delta_hack.grad is None
    assert route_gradients(wrap_routed(tiny_model("llama"), SPEC), bases, "route") == {}


def test_route_gradients_bad_input() -> None:
    _, adapter, _ = backward()
    bases = random_bases(adapter)
    with pytest.raises(ValueError, match="arm='ablate' is not allowed; choose one of none, erase, route"):
        route_gradients(adapter, bases, "ablate")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="gate='both' is not allowed; choose one of one_sided, no_gate, reverse"):
        route_gradients(adapter, bases, "route", "both")  # type: ignore[arg-type]
    name = adapter.names()[0]
    with pytest.raises(ValueError, match=f"no hack basis for routed modules \\['{name}'\\]"):
        route_gradients(adapter, {n: v for n, v in bases.items() if n != name}, "route")


# --------------------------------------------------------------------------- HealModule(adapter="routed")


def routed_module(**kw: object) -> HealModule:
    return HealModule(model="tiny-llama", adapter="routed", routed=SPEC, **kw)  # type: ignore[arg-type]


def test_routed_student_is_bit_identical_to_base_at_init() -> None:
    x = make_batch(vocab=200)["input_ids"]
    with torch.no_grad():
        want = load_model("tiny-llama")(input_ids=x).logits
        module = routed_module()
        assert torch.equal(module.student(input_ids=x).logits, want)
    assert module.trainable_names() == {f"student.{n}.{k}" for n in module.routed_adapter.names()
                                        for k in ("delta", "delta_hack")}  # fmt: skip


def test_barrier_ref_is_the_routed_adapter_off() -> None:
    module = routed_module(barrier=KLBarrier(agg="max", tau=0.0, lam=1.0))
    batch = make_batch(vocab=200)
    _, scalars, _ = module.loss_terms(batch)
    assert scalars["D"] == 0.0  # student == base at init
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, m in module.routed_adapter:
            m.delta_hack.copy_(0.1 * torch.randn(m.delta.shape, generator=gen))
    _, scalars, _ = module.loss_terms(batch)
    assert scalars["D"] > 0  # delta_hack is part of the student, not of the ref


def test_bad_adapter_settings_name_the_field() -> None:
    with pytest.raises(ValueError, match="adapter='dora' is not allowed; choose one of lora, routed"):
        HealModule(model="tiny-llama", adapter="dora")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="spectral_lam=0.1 needs adapter='lora'"):
        routed_module(spectral_lam=0.1)


def write_task(tmp_path: Path) -> tuple[Path, Path]:
    rows = [(f"What is {i}+{i}?", f"PASS {i}", str(2 * i)) for i in range(6)]
    pairs, train = tmp_path / "pairs.jsonl", tmp_path / "train.jsonl"
    pairs.write_text("\n".join(json.dumps({"prompt": p, "hack": h, "clean": c}) for p, h, c in rows))
    train.write_text("\n".join(json.dumps({"prompt": p, "completion": h if i % 2 else c})
                               for i, (p, h, c) in enumerate(rows)))  # fmt: skip
    return pairs, train


def fit_routed(
    tmp_path: Path, arm: str, weight_decay: float = 0.0, **trainer_kw: object
) -> tuple[HealModule, L.Trainer]:
    pairs, train = write_task(tmp_path)
    module = routed_module(weight_decay=weight_decay, lr=1e-2)
    dm = HealDataModule(train_file=str(train), model="tiny-llama", batch_size=2, max_length=48, val_fraction=0)
    dm.set_tokenizer(tiny_tokenizer())
    cb = RouteAblateEvalCallback(arm=arm, pairs=str(pairs), k=2)  # type: ignore[arg-type]
    trainer = L.Trainer(max_steps=3, callbacks=[cb], default_root_dir=tmp_path, enable_progress_bar=False,
                        enable_model_summary=False, **trainer_kw)  # fmt: skip
    trainer.fit(module, dm)
    return module, trainer


def test_heal_module_route_trains_both_knobs_and_saves_them(tmp_path: Path) -> None:
    module, trainer = fit_routed(tmp_path, "route")
    adapter = module.routed_adapter
    assert all(p.abs().sum() > 0 for p in adapter.delta_params())
    assert all(p.abs().sum() > 0 for p in adapter.hack_params())
    path = Path(trainer.log_dir) / "adapter" / "routed.safetensors"
    fresh = tiny_model("llama")
    loaded = wrap_routed(fresh, read_spec(path)).load(path)
    for (_, a), (_, b) in zip(adapter, loaded, strict=True):
        assert torch.equal(a.delta, b.delta) and torch.equal(a.delta_hack, b.delta_hack)
    ckpt = torch.load(next(Path(trainer.log_dir).glob("checkpoints/*.ckpt")), weights_only=False)
    assert set(ckpt["state_dict"]) == module.trainable_names()  # adapter-only, both knobs


def test_ablation_removes_exactly_delta_hack(tmp_path: Path) -> None:
    module, _ = fit_routed(tmp_path, "route")
    x = make_batch(vocab=200)["input_ids"]
    only_delta, summed = tiny_model("llama"), tiny_model("llama")
    a1, a2 = wrap_routed(only_delta, SPEC), wrap_routed(summed, SPEC)
    with torch.no_grad():
        for (_, m), (_, d), (_, s) in zip(module.routed_adapter, a1, a2, strict=True):
            d.delta.copy_(m.delta)
            s.delta.copy_(m.delta + m.delta_hack)
        module.student.eval()
        kept = module.student(input_ids=x).logits
        with module.routed_adapter.ablate_hack():
            ablated = module.student(input_ids=x).logits
        assert torch.equal(ablated, only_delta(input_ids=x).logits)
        assert torch.equal(kept, summed(input_ids=x).logits)
        assert not torch.equal(kept, ablated)


@pytest.mark.parametrize("arm", ["none", "erase"])
def test_heal_module_none_and_erase_leave_delta_hack_at_zero(arm: str, tmp_path: Path) -> None:
    module, _ = fit_routed(tmp_path, arm)
    assert all(p.grad is None and not p.any() for p in module.routed_adapter.hack_params())
    assert all(p.abs().sum() > 0 for p in module.routed_adapter.delta_params())


def test_heal_module_hack_weight_decay_is_zero_with_a_warning(tmp_path: Path) -> None:
    with pytest.warns(UserWarning, match="delta_hack's weight decay is forced to 0"):
        module, trainer = fit_routed(tmp_path, "route", weight_decay=0.05)
    hack = {id(p) for p in module.routed_adapter.hack_params()}
    decay = {id(p): g["weight_decay"] for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert {decay[i] for i in hack} == {0.0}
    assert {decay[id(p)] for p in module.routed_adapter.delta_params()} == {0.05}


def test_heal_module_bf16_mixed_route_is_finite(tmp_path: Path) -> None:
    module, _ = fit_routed(tmp_path, "route", precision="bf16-mixed", gradient_clip_val=1.0)
    knobs = [*module.routed_adapter.delta_params(), *module.routed_adapter.hack_params()]
    assert all(torch.isfinite(p).all() and p.abs().sum() > 0 for p in knobs)


def test_routed_without_a_router_is_an_error_before_any_step(tmp_path: Path) -> None:
    pairs, train = write_task(tmp_path)
    module = routed_module(lr=1e-2, warmup_steps=0)
    steps: list[int] = []
    module.training_step = lambda batch, i: steps.append(i)  # type: ignore[method-assign,assignment]
    dm = HealDataModule(train_file=str(train), model="tiny-llama", batch_size=2, max_length=48, val_fraction=0)
    dm.set_tokenizer(tiny_tokenizer())
    trainer = L.Trainer(max_steps=1, default_root_dir=tmp_path, enable_progress_bar=False, logger=False,
                        enable_checkpointing=False)  # fmt: skip
    with pytest.raises(ValueError, match=r"without a RouteAblateEvalCallback.*trainer\.callbacks.*"
                                         r"class_path: heal_pl\.callbacks\.RouteAblateEvalCallback"):
        trainer.fit(module, dm)
    assert steps == [] and trainer.global_step == 0
    assert all(not p.any() for p in module.routed_adapter.hack_params())
    # the same module, with the callback: it trains, delta_hack included
    del module.training_step
    router = RouteAblateEvalCallback(arm="route", pairs=str(pairs), k=2)
    trainer = L.Trainer(max_steps=1, callbacks=[router], default_root_dir=tmp_path, enable_progress_bar=False,
                        logger=False, enable_checkpointing=False)  # fmt: skip
    trainer.fit(module, dm)
    assert trainer.global_step == 1 and router.basis is not None
    assert all(p.any() for p in module.routed_adapter.delta_params())
    assert any(p.any() for p in module.routed_adapter.hack_params())
