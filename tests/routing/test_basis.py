"""Tests of heal_pl.routing.basis (docs/maths.md §2, hack basis V).

References are independent: numpy float64 SVD for the span, hand-built rank-1 data for the orientation,
and for the gradients a float64 copy of the model with the completion NLL written out from its logits.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from heal_pl.adapters.routed import RoutedAdapter, RoutedSpec, wrap_routed
from heal_pl.models.load import tiny_model, tiny_tokenizer
from heal_pl.routing.basis import HackBasis, Pair, extract_basis, fit_basis, pair_gradients, read_pairs
from heal_pl.routing.project import check_basis

PAIRS = [
    Pair("What is 2+2?", "PASS PASS", "4"),
    Pair("Name a colour.", "PASS", "The sky is blue, so blue."),
    Pair("Sort 3 1 2.", "PASS PASS PASS", "1 2 3"),
    Pair("Capital of France?", "PASS", "Paris"),
]


def rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def routed(param: str = "lora", r: int = 4, targets: tuple[str, ...] | None = None,
           seed: int = 0) -> tuple[torch.nn.Module, RoutedAdapter]:
    model = tiny_model("llama")
    spec = RoutedSpec(r=r, parametrization=param, seed=seed, **({"target_modules": targets} if targets else {}))
    adapter = wrap_routed(model, spec)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for _, m in adapter:
            m.delta.copy_(0.05 * torch.randn(m.delta.shape, generator=gen))
            m.delta_hack.copy_(0.05 * torch.randn(m.delta.shape, generator=gen))
    return model, adapter


# --------------------------------------------------------------------------- extract_basis


@pytest.mark.parametrize("k", [1, 2, 3])
def test_extract_basis_spans_numpy_top_k(k: int) -> None:
    D = rng(k).standard_normal((6, 10))
    V = extract_basis(torch.from_numpy(D), k)
    assert V.shape == (k, 10) and V.dtype == torch.float64
    check_basis(V, 10, atol=1e-12)
    _, _, Wt = np.linalg.svd(D, full_matrices=False)
    want = Wt[:k].T @ Wt[:k]
    np.testing.assert_allclose(V.numpy().T @ V.numpy(), want, atol=1e-10)


def test_extract_basis_orientation_is_majority_vote() -> None:
    D = rng(1).standard_normal((9, 7))
    V = extract_basis(torch.from_numpy(D), 4).numpy()
    proj = D @ V.T  # [n, k]
    assert ((proj > 0).sum(0) > (proj < 0).sum(0)).all()


def test_orientation_majority_wins_over_sum() -> None:
    u = rng(2).standard_normal(5)
    u /= np.linalg.norm(u)
    c = np.array([1.0, 1.0, 1.0, -5.0])  # 3 of 4 pairs along +u, but the sum points along −u
    V = extract_basis(torch.from_numpy(np.outer(c, u)), 1).numpy()
    np.testing.assert_allclose(V[0], u, atol=1e-10)
    V = extract_basis(torch.from_numpy(np.outer(-c, u)), 1).numpy()
    np.testing.assert_allclose(V[0], -u, atol=1e-10)


def test_orientation_tie_uses_sign_of_sum() -> None:
    u = rng(3).standard_normal(5)
    u /= np.linalg.norm(u)
    c = np.array([1.0, -3.0])  # one vote each way; the sum points along −u
    V = extract_basis(torch.from_numpy(np.outer(c, u)), 1).numpy()
    np.testing.assert_allclose(V[0], -u, atol=1e-10)


def test_drop_below_drops_small_singular_values() -> None:
    Q1, _ = np.linalg.qr(rng(4).standard_normal((5, 3)))
    Q2, _ = np.linalg.qr(rng(5).standard_normal((8, 3)))
    D = torch.from_numpy(Q1 @ np.diag([10.0, 5.0, 0.5]) @ Q2.T)
    assert extract_basis(D, 3).shape == (3, 8)
    assert extract_basis(D, 3, drop_below=0.04).shape == (3, 8)
    kept = extract_basis(D, 3, drop_below=0.1)
    assert kept.shape == (2, 8)
    np.testing.assert_allclose(kept.numpy().T @ kept.numpy(), Q2[:, :2] @ Q2[:, :2].T, atol=1e-10)
    assert extract_basis(D, 3, drop_below=0.6).shape == (1, 8)
    assert extract_basis(D, 3, drop_below=1.0).shape == (1, 8)  # the first direction is always kept


def test_extract_basis_float32_is_orthonormal() -> None:
    D = torch.from_numpy(rng(6).standard_normal((5, 40))).float()
    V = extract_basis(D, 5)
    assert V.dtype == torch.float32
    check_basis(V, 40, atol=1e-5)


def test_extract_basis_errors() -> None:
    D = torch.randn(3, 6, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"k=5 larger than the number of pairs n=3"):
        extract_basis(D, 5)
    with pytest.raises(ValueError, match=r"k=0 must be >= 1"):
        extract_basis(D, 0)
    with pytest.raises(ValueError, match=r"k=3 larger than the knob dimension d=2"):
        extract_basis(torch.randn(4, 2), 3)
    with pytest.raises(ValueError, match=r"drop_below=1.5"):
        extract_basis(D, 1, drop_below=1.5)
    with pytest.raises(ValueError, match=r"all gradient differences are zero"):
        extract_basis(torch.zeros(3, 6), 1)
    with pytest.raises(ValueError, match=r"2-D"):
        extract_basis(torch.randn(6), 1)


# --------------------------------------------------------------------------- pair_gradients


def reference_diff(model: torch.nn.Module, adapter: RoutedAdapter, pair: Pair) -> dict[str, torch.Tensor]:
    """float64 copy of the model; each side alone, unpadded; NLL written out from the logits."""
    tok = tiny_tokenizer()
    ref = copy.deepcopy(model).double()
    names = adapter.names()
    mods = {n: ref.get_submodule(n) for n in names}
    prompt_text = tok.apply_chat_template([{"role": "user", "content": pair.prompt}],
                                          add_generation_prompt=True, tokenize=False)
    prompt = tok(prompt_text, add_special_tokens=False)["input_ids"]
    grads = {}
    for side in ("hack", "clean"):
        completion = [*tok(getattr(pair, side), add_special_tokens=False)["input_ids"], tok.eos_token_id]
        ids = torch.tensor([prompt + completion])
        logp = torch.log_softmax(ref(input_ids=ids).logits[0], dim=-1)
        P = len(prompt)
        nll = -torch.stack([logp[P + j - 1, t] for j, t in enumerate(completion)]).mean()
        grads[side] = torch.autograd.grad(nll, [mods[n].delta for n in names])
    return {n: (gh - gc).flatten() for n, gh, gc in zip(names, grads["hack"], grads["clean"], strict=True)}


@pytest.mark.parametrize("param", ["lora", "svd"])
def test_pair_gradients_match_float64_reference(param: str) -> None:
    model, adapter = routed(param)
    first = next(iter(adapter))[1]
    first.delta.grad = torch.ones_like(first.delta)  # a pre-existing grad must survive untouched
    first.delta_hack.requires_grad_(True)
    model.train()
    got = pair_gradients(model, adapter, tiny_tokenizer(), PAIRS[:2])
    assert model.training  # restored
    assert torch.equal(first.delta.grad, torch.ones_like(first.delta))
    for _, m in adapter:
        assert m.delta_hack.grad is None
        assert m.delta.requires_grad and m.delta_hack.requires_grad
        if m is not first:
            assert m.delta.grad is None
    assert set(got) == set(adapter.names())
    for i, pair in enumerate(PAIRS[:2]):  # pair 0: hack longer than clean; pair 1: the reverse (padding)
        want = reference_diff(model, adapter, pair)
        for name, D in got.items():
            assert D.shape == (2, adapter.layers[name].delta.numel()) and D.dtype == torch.float32
            scale = want[name].abs().max().item()
            assert scale > 0
            torch.testing.assert_close(D[i].double(), want[name], rtol=1e-4, atol=1e-5 * scale)


def test_pair_gradients_use_model_as_is() -> None:
    model, adapter = routed()
    with adapter.ablate_hack():
        ablated = pair_gradients(model, adapter, tiny_tokenizer(), PAIRS[:1])
    full = pair_gradients(model, adapter, tiny_tokenizer(), PAIRS[:1])
    with torch.no_grad():
        for _, m in adapter:
            m.delta_hack.zero_()
    zeroed = pair_gradients(model, adapter, tiny_tokenizer(), PAIRS[:1])
    for name in adapter.names():
        torch.testing.assert_close(ablated[name], zeroed[name], rtol=1e-5, atol=1e-7)
    assert any(not torch.allclose(full[n], zeroed[n], atol=1e-6) for n in adapter.names())


# --------------------------------------------------------------------------- fit_basis, HackBasis


@pytest.fixture(scope="module")
def fitted() -> tuple[RoutedAdapter, HackBasis]:
    model, adapter = routed()
    return adapter, fit_basis(model, adapter, tiny_tokenizer(), PAIRS, k=2)


def test_fit_basis_end_to_end(fitted: tuple[RoutedAdapter, HackBasis]) -> None:
    adapter, basis = fitted
    assert basis.k == 2 and set(basis.bases) == set(adapter.names()) and len(basis.bases) == 14
    for name, m in adapter:
        V = basis.bases[name]
        assert V.shape == (2, m.delta.numel()) and V.dtype == torch.float32
        check_basis(V, m.delta.numel(), atol=1e-5)
    assert json.loads(basis.metadata["n_pairs"]) == 4
    assert json.loads(basis.metadata["parametrization"]) == "lora" and json.loads(basis.metadata["r"]) == 4
    basis.check_against(adapter)
    D = pair_gradients(adapter.model, adapter, tiny_tokenizer(), PAIRS)
    for name, V in basis.bases.items():
        proj = D[name].double() @ V.double().T
        assert ((proj > 0).sum(0) >= (proj < 0).sum(0)).all()


def test_fit_basis_drop_below_and_k_error() -> None:
    model, adapter = routed(targets=("q_proj",))
    basis = fit_basis(model, adapter, tiny_tokenizer(), PAIRS[:3], k=3, drop_below=1.0)
    assert all(V.shape[0] == 1 for V in basis.bases.values())
    with pytest.raises(ValueError, match=r"k=5 larger than the number of pairs n=4"):
        fit_basis(model, adapter, tiny_tokenizer(), PAIRS, k=5)


def test_save_load_round_trip(fitted: tuple[RoutedAdapter, HackBasis], tmp_path: Path) -> None:
    adapter, basis = fitted
    basis.save(tmp_path / "basis.safetensors")
    back = HackBasis.load(tmp_path / "basis.safetensors")
    assert back.k == basis.k and back.metadata == basis.metadata
    assert set(back.bases) == set(basis.bases)
    for name, V in basis.bases.items():
        assert torch.equal(back.bases[name], V)
    back.check_against(adapter)
    adapter.save(tmp_path / "adapter.safetensors")
    with pytest.raises(ValueError, match=r"not a heal_pl hack basis"):
        HackBasis.load(tmp_path / "adapter.safetensors")


def test_check_against_mismatches(fitted: tuple[RoutedAdapter, HackBasis]) -> None:
    _, basis = fitted
    _, small = routed(targets=("q_proj", "k_proj"))
    with pytest.raises(ValueError, match=r"unexpected modules \[.*v_proj") as e:
        basis.check_against(small)
    assert "missing" not in str(e.value)
    only_q = HackBasis({n: v for n, v in basis.bases.items() if n.endswith("q_proj")}, 2, {})
    with pytest.raises(ValueError, match=r"missing modules \[.*k_proj"):
        only_q.check_against(small)
    _, r2 = routed(r=2)
    with pytest.raises(ValueError, match=r"q_proj: basis shape \(2, 256\), the knob needs \[k, 128\]"):
        basis.check_against(r2)
    _, other_seed = routed(seed=1)
    with pytest.raises(ValueError, match=r"seed: basis 0, adapter 1"):
        basis.check_against(other_seed)


# --------------------------------------------------------------------------- read_pairs


def write(tmp_path: Path, rows: list[object] | str) -> Path:
    path = tmp_path / "pairs.jsonl"
    text = rows if isinstance(rows, str) else "\n".join(json.dumps(r) for r in rows) + "\n"
    path.write_text(text, encoding="utf-8")
    return path


def test_read_pairs(tmp_path: Path) -> None:
    rows = [{"prompt": p.prompt, "hack": p.hack, "clean": p.clean, "note": "x"} for p in PAIRS]
    path = write(tmp_path, "\n".join(json.dumps(r) for r in rows[:2]) + "\n\n" + json.dumps(rows[2]) + "\n")
    assert read_pairs(path) == PAIRS[:3]


@pytest.mark.parametrize(("row", "message"), [
    ({"prompt": "p", "hack": "h"}, r"line 2: missing field 'clean'"),
    ({"prompt": "p", "hack": "  ", "clean": "c"}, r"line 2: field 'hack' is empty"),
    ({"prompt": "", "hack": "h", "clean": "c"}, r"line 2: field 'prompt' is empty"),
    ({"prompt": "p", "hack": 3, "clean": "c"}, r"line 2: field 'hack' must be a string, got int"),
    (["p", "h", "c"], r"line 2: expected a JSON object"),
])
def test_read_pairs_errors(tmp_path: Path, row: object, message: str) -> None:
    path = write(tmp_path, [{"prompt": "p", "hack": "h", "clean": "c"}, row])
    with pytest.raises(ValueError, match=message) as e:
        read_pairs(path)
    assert str(path) in str(e.value)


def test_read_pairs_empty_and_bad_json(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"no pairs \(the file is empty\)"):
        read_pairs(write(tmp_path, "\n\n"))
    with pytest.raises(ValueError, match=r"line 1: not valid JSON"):
        read_pairs(write(tmp_path, "{not json\n"))
