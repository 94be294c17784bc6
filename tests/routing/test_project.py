"""Tests of heal_pl.routing.project (docs/maths.md §2): the gradient projection and its metrics.

Expected values come from a float64 numpy reference written out here, never from the function under test.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from heal_pl.routing.project import check_basis, fired, project, projection_metrics

GATES = ("one_sided", "no_gate", "reverse")
OVERSHOOTS = (0.0, 0.5, 1.0, 1.5)


def ref_project(g: np.ndarray, V: np.ndarray, gate: str, overshoot: float, preserve: bool) -> tuple:
    """docs/maths.md §2 in float64 numpy, one line per formula."""
    c = V @ g
    c_use = {"one_sided": np.maximum(c, 0.0), "no_gate": c, "reverse": 2.0 * c}[gate]
    removed = overshoot * (c_use @ V)
    g_proj = g - removed
    if preserve and np.linalg.norm(g_proj) > 0:
        g_proj = g_proj * np.linalg.norm(g) / np.linalg.norm(g_proj)
    return g_proj, removed


def ref_share(V: np.ndarray, x: np.ndarray) -> float:
    n = np.linalg.norm(x)
    return 0.0 if n == 0 else float(np.linalg.norm(np.maximum(V @ x, 0.0)) / n)


def qr_basis(k: int, n: int, seed: int) -> np.ndarray:
    """k orthonormal rows in R^n from the QR of a Gaussian matrix."""
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((n, k)))
    return q.T.copy()


CASES = list(itertools.product(GATES, OVERSHOOTS, (False, True), ((1, 7), (3, 40), (8, 200))))


@pytest.mark.parametrize(("gate", "overshoot", "preserve", "kn"), CASES)
def test_project_matches_numpy_float64(gate: str, overshoot: float, preserve: bool, kn: tuple[int, int]) -> None:
    k, n = kn
    for seed in range(3):
        V = qr_basis(k, n, seed)
        g = np.random.default_rng(100 + seed).standard_normal(n)
        g = g + 2.0 * V[0]  # a clear positive component along the first hack direction
        want_proj, want_removed = ref_project(g, V, gate, overshoot, preserve)
        got_proj, got_removed = project(torch.from_numpy(g), torch.from_numpy(V), gate, overshoot, preserve)
        assert got_proj.dtype == torch.float64
        np.testing.assert_allclose(got_proj.numpy(), want_proj, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(got_removed.numpy(), want_removed, rtol=1e-12, atol=1e-12)
        if preserve:
            assert np.linalg.norm(got_proj.numpy()) == pytest.approx(np.linalg.norm(g), rel=1e-12)


@pytest.mark.parametrize("gate", GATES)
def test_project_float32_and_bf16_inputs(gate: str) -> None:
    V = qr_basis(4, 64, 1)
    g = np.random.default_rng(2).standard_normal(64)
    want, _ = ref_project(g, V, gate, 1.0, False)
    got, _ = project(torch.tensor(g, dtype=torch.float32), torch.tensor(V, dtype=torch.float32), gate)
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-4, atol=1e-5)
    g16 = torch.tensor(g, dtype=torch.bfloat16)
    got16, removed16 = project(g16, torch.tensor(V, dtype=torch.float32), gate)
    assert got16.dtype == removed16.dtype == torch.bfloat16
    want16, _ = ref_project(g16.double().numpy(), V, gate, 1.0, False)  # same (rounded) input
    np.testing.assert_allclose(got16.double().numpy(), want16, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("preserve", [False, True])
def test_orthogonal_gradient_unchanged(gate: str, preserve: bool) -> None:
    V = qr_basis(3, 30, 4)
    g = np.random.default_rng(5).standard_normal(30)
    g = g - V.T @ (V @ g)  # orthogonal to span(V)
    got, removed = project(torch.from_numpy(g), torch.from_numpy(V), gate, 1.5, preserve)
    np.testing.assert_allclose(got.numpy(), g, atol=1e-13)
    np.testing.assert_allclose(removed.numpy(), 0.0, atol=1e-13)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_gradient_inside_span_one_sided_is_zeroed(dtype: torch.dtype) -> None:
    """g = Vᵀ a with a > 0: one_sided at overshoot 1 removes all of it; preserve_magnitude keeps it zero."""
    V = qr_basis(3, 50, 6)
    g = V.T @ np.array([0.7, 1.3, 2.0])
    gt, Vt = torch.tensor(g, dtype=dtype), torch.tensor(V, dtype=dtype)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    g_proj, removed = project(gt, Vt, "one_sided", 1.0)
    np.testing.assert_allclose(g_proj.double().numpy(), 0.0, atol=tol)
    np.testing.assert_allclose(removed.double().numpy(), g, atol=tol)
    g_kept, _ = project(gt, Vt, "one_sided", 1.0, preserve_magnitude=True)
    assert torch.isfinite(g_kept).all()
    np.testing.assert_allclose(g_kept.double().numpy(), 0.0, atol=tol)  # rounding noise is not blown up to ‖g‖


def test_negative_components_survive_one_sided() -> None:
    """A component along which descent moves away from the hack (c < 0) is kept by one_sided only."""
    V = qr_basis(2, 10, 7)
    g = V.T @ np.array([-1.0, 2.0])
    got, _ = project(torch.from_numpy(g), torch.from_numpy(V), "one_sided")
    np.testing.assert_allclose(got.numpy(), -V[0], atol=1e-13)
    got_ng, _ = project(torch.from_numpy(g), torch.from_numpy(V), "no_gate")
    np.testing.assert_allclose(got_ng.numpy(), 0.0, atol=1e-13)


def test_zero_gradient_preserve_magnitude_no_nan() -> None:
    V = torch.from_numpy(qr_basis(2, 8, 8))
    g_proj, removed = project(torch.zeros(8, dtype=torch.float64), V, "reverse", 1.0, True)
    assert torch.equal(g_proj, torch.zeros(8, dtype=torch.float64))
    assert torch.equal(removed, torch.zeros(8, dtype=torch.float64))


def test_empty_basis_is_identity() -> None:
    g = torch.randn(12, generator=torch.Generator().manual_seed(0))
    g_proj, removed = project(g, torch.zeros(0, 12), "no_gate", 1.0, True)
    torch.testing.assert_close(g_proj, g, rtol=1e-6, atol=0)
    assert torch.equal(removed, torch.zeros(12))


@pytest.mark.parametrize(("gate", "overshoot"), list(itertools.product(GATES, OVERSHOOTS)))
def test_removed_plus_projected_is_gradient(gate: str, overshoot: float) -> None:
    V = torch.from_numpy(qr_basis(5, 60, 9))
    g = torch.from_numpy(np.random.default_rng(10).standard_normal(60))
    g_proj, removed = project(g, V, gate, overshoot)
    torch.testing.assert_close(g_proj + removed, g, rtol=0, atol=1e-13)


@pytest.mark.parametrize("gate", GATES)
def test_metrics_match_numpy(gate: str) -> None:
    V = qr_basis(4, 80, 11)
    g = np.random.default_rng(12).standard_normal(80) + 1.5 * V[1]
    g_proj, _ = ref_project(g, V, gate, 0.5, False)
    got = projection_metrics(torch.from_numpy(g), torch.from_numpy(g_proj), torch.from_numpy(V))
    assert set(got) == {"cin", "cout"}
    assert got["cin"].item() == pytest.approx(ref_share(V, g), rel=1e-12)
    assert got["cout"].item() == pytest.approx(ref_share(V, g_proj), rel=1e-12)
    assert 0 < got["cin"].item() <= 1


def test_metrics_after_full_one_sided_projection() -> None:
    """At overshoot 1, one_sided leaves no positive component: cout = 0 while cin > 0."""
    V = torch.from_numpy(qr_basis(3, 40, 13))
    g = torch.from_numpy(np.random.default_rng(14).standard_normal(40)) + 2 * V[0]
    g_proj, _ = project(g, V)
    m = projection_metrics(g, g_proj, V)
    assert m["cin"].item() > 0.1
    assert m["cout"].item() == pytest.approx(0.0, abs=1e-12)


def test_metrics_zero_norms_are_zero() -> None:
    V = torch.from_numpy(qr_basis(2, 6, 15))
    zero = torch.zeros(6, dtype=torch.float64)
    m = projection_metrics(zero, zero, V)
    assert m["cin"].item() == 0.0 and m["cout"].item() == 0.0
    assert not m["cin"].isnan()


def test_fired_share() -> None:
    cins = [0.0, 5e-7, 2e-6, 0.4, torch.tensor(0.9), torch.tensor(0.0)]
    assert fired(cins) == pytest.approx(3 / 6)
    assert fired([0.0]) == 0.0
    assert fired([0.2, 0.3], threshold=0.25) == 0.5
    with pytest.raises(ValueError, match="no module"):
        fired([])


# --------------------------------------------------------------------------- bad input


def test_bad_gate_lists_choices() -> None:
    V = torch.eye(2, 4)
    with pytest.raises(ValueError, match="gate='both'.*one_sided, no_gate, reverse"):
        project(torch.ones(4), V, gate="both")  # type: ignore[arg-type]


def test_negative_overshoot() -> None:
    with pytest.raises(ValueError, match="overshoot=-0.5"):
        project(torch.ones(4), torch.eye(2, 4), overshoot=-0.5)
    with pytest.raises(ValueError, match="overshoot=nan"):
        project(torch.ones(4), torch.eye(2, 4), overshoot=float("nan"))


def test_shape_mismatch_names_both_shapes() -> None:
    with pytest.raises(ValueError, match=r"\(2, 5\).*\(4,\)"):
        project(torch.ones(4), torch.eye(2, 5))
    with pytest.raises(ValueError, match=r"1-D.*\(2, 2\)"):
        project(torch.ones(2, 2), torch.eye(2, 4))
    with pytest.raises(ValueError, match=r"\(4,\)"):
        project(torch.ones(4), torch.ones(4))
    with pytest.raises(ValueError, match=r"\(3, 5\).*\(4,\)"):
        projection_metrics(torch.ones(4), torch.ones(4), torch.eye(3, 5))
    with pytest.raises(ValueError, match=r"\(4,\).*\(3,\)"):
        projection_metrics(torch.ones(4), torch.ones(3), torch.eye(3, 4))


@pytest.mark.parametrize(
    "basis",
    [
        torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]]),  # a row not unit
        torch.tensor([[1.0, 0.0, 0.0], [0.6, 0.8, 0.0]]),  # rows not orthogonal
        torch.tensor([[float("nan"), 0.0, 0.0]]),
    ],
)
def test_non_orthonormal_basis_rejected(basis: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="not orthonormal"):
        project(torch.ones(3), basis)
    project(torch.ones(3), basis, atol=None)  # the caller may skip the check for a basis checked once


def test_check_basis_tolerance() -> None:
    V = torch.from_numpy(qr_basis(3, 20, 16)).float()
    check_basis(V, n=20)
    with pytest.raises(ValueError, match=r"\(3, 20\).*\(21,\)"):
        check_basis(V, n=21)
    with pytest.raises(ValueError, match="not orthonormal"):
        check_basis(V * (1 + 1e-3))
    check_basis(V * (1 + 1e-3), atol=1e-2)
