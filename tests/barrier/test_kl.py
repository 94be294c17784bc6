"""Tests of heal_pl.barrier.kl (docs/maths.md §1): per-token KL, aggregation, barrier, counted positions, chunked stats.

Every expected value is computed independently in the test (float64 numpy, or float64 torch autograd
on a formula written out here), never by calling the function under test.
"""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from heal_pl.barrier.kl import (
    KLBarrier,
    aggregate,
    counted_positions,
    kl_summary,
    naive_token_stats,
    per_token_kl,
    quantile,
    token_stats,
)

HOWS = ("mean", "rmse", "p95", "max")
REGS = ("kl_rev", "kl_fwd", "nll")
LOW_DTYPES = (torch.bfloat16, torch.float16)
EPS = 1e-8


# ----------------------------------------------------------------------------- float64 references


def np_log_softmax(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, dtype=np.float64)
    m = z.max(axis=-1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(axis=-1, keepdims=True))


def np_kl(lp: np.ndarray, lq: np.ndarray) -> np.ndarray:
    """Σ_v p_v (log p_v − log q_v) in float64, with 0 · log 0 = 0."""
    lp = np.asarray(lp, dtype=np.float64)
    lq = np.asarray(lq, dtype=np.float64)
    p = np.exp(lp)
    terms = np.zeros_like(lp)
    nz = p > 0
    terms[nz] = p[nz] * (lp[nz] - lq[nz])
    return terms.sum(axis=-1)


def np_agg(x: np.ndarray, how: str, eps: float = EPS) -> float:
    x = np.asarray(x, dtype=np.float64)
    if how == "mean":
        return float(x.mean())
    if how == "rmse":
        return float(np.sqrt(np.mean(x**2) + eps))
    if how == "p95":
        return float(np.percentile(x, 95))
    return float(x.max())


def t64_agg(x64: torch.Tensor, how: str, eps: float = EPS) -> torch.Tensor:
    """Float64 torch version of each aggregator, written out by hand (for autograd gradients)."""
    n = x64.numel()
    if how == "mean":
        return x64.sum() / n
    if how == "rmse":
        return torch.sqrt((x64 * x64).sum() / n + eps)
    order = torch.as_tensor(np.argsort(x64.detach().numpy(), kind="stable"))
    if how == "p95":
        pos = 0.95 * (n - 1)
        lo = int(np.floor(pos))
        hi = min(lo + 1, n - 1)
        frac = pos - lo
        return (1.0 - frac) * x64[order[lo]] + frac * x64[order[hi]]
    return x64[order[-1]]


def ref_grad(x: torch.Tensor, how: str, eps: float = EPS) -> np.ndarray:
    x64 = x.detach().double().requires_grad_(True)
    t64_agg(x64, how, eps).backward()
    return x64.grad.numpy()


def group_sums(values: np.ndarray, grad: np.ndarray) -> dict[float, float]:
    """Gradient summed over each group of equal values (the only tie-invariant part of it)."""
    return {float(v): float(grad[values == v].sum()) for v in np.unique(values)}


# ----------------------------------------------------------------------------- per_token_kl


def _random_logps(shape: tuple[int, ...], seed: int, scale: float = 2.0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(shape, generator=g, dtype=torch.float64) * scale
    b = a + torch.randn(shape, generator=g, dtype=torch.float64) * scale
    return torch.log_softmax(a, -1).float(), torch.log_softmax(b, -1).float()


@pytest.mark.parametrize("shape", [(13, 50), (3, 5, 50)], ids=["NV", "BTV"])
def test_per_token_kl_matches_float64_reference(shape):
    lp, lq = _random_logps(shape, seed=1)
    out = per_token_kl(lp, lq)
    assert out.dtype == torch.float32
    assert out.shape == shape[:-1]
    expected = np_kl(lp.double().numpy(), lq.double().numpy())
    assert expected.min() > 0.05  # the check is not against ~0
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-5, atol=1e-6)


def test_per_token_kl_direction_is_p_then_q():
    lp = torch.log(torch.tensor([[0.5, 0.5]]))
    lq = torch.log(torch.tensor([[0.9, 0.1]]))
    kl_pq = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)
    kl_qp = 0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5)
    assert per_token_kl(lp, lq).item() == pytest.approx(kl_pq, rel=1e-6)
    assert per_token_kl(lq, lp).item() == pytest.approx(kl_qp, rel=1e-6)


@pytest.mark.parametrize("dtype", LOW_DTYPES, ids=["bf16", "fp16"])
def test_per_token_kl_low_precision_inputs(dtype):
    lp, lq = _random_logps((4, 6, 40), seed=2)
    lp_r, lq_r = lp.to(dtype), lq.to(dtype)
    out = per_token_kl(lp_r, lq_r)
    assert out.dtype == torch.float32
    # reference from the *rounded* inputs, upcast to float64: only the float32 compute error remains
    expected = np_kl(lp_r.double().numpy(), lq_r.double().numpy())
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-5, atol=1e-5)
    # and it is the KL of the unrounded inputs up to the input rounding
    np.testing.assert_allclose(out.numpy(), np_kl(lp.double().numpy(), lq.double().numpy()), rtol=0.05, atol=0.05)


@pytest.mark.parametrize("dtype", [torch.float32, *LOW_DTYPES], ids=["fp32", "bf16", "fp16"])
def test_zero_probability(dtype):
    ninf = -math.inf
    lp = torch.tensor(
        [
            [math.log(0.5), math.log(0.5), ninf, ninf],  # p has zeros, q has none
            [math.log(0.5), math.log(0.5), ninf, ninf],  # p and q are both 0 on the same entries
            [0.0, ninf, ninf, ninf],  # a one-hot p
        ],
        dtype=dtype,
    )
    lq = torch.tensor(
        [
            [math.log(0.25)] * 4,
            [math.log(0.25), math.log(0.75), ninf, ninf],
            [math.log(0.5), ninf, math.log(0.5), ninf],
        ],
        dtype=dtype,
    )
    lp.requires_grad_(True)
    lq.requires_grad_(True)
    out = per_token_kl(lp, lq)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()
    expected = np_kl(lp.detach().double().numpy(), lq.detach().double().numpy())
    np.testing.assert_allclose(out.detach().numpy(), expected, rtol=1e-5, atol=1e-6)
    # sanity of the hand values: KL(½,½,0,0 ‖ uniform) = log 2; one-hot vs ½ = log 2
    assert out[0].item() == pytest.approx(math.log(2), rel=1e-2)
    assert out[2].item() == pytest.approx(math.log(2), rel=1e-2)
    out.sum().backward()
    assert torch.isfinite(lp.grad).all() and torch.isfinite(lq.grad).all()
    # zero-probability entries of p get zero gradient on both sides
    zero = torch.isinf(lp.detach())
    assert (lp.grad[zero] == 0).all() and (lq.grad[zero] == 0).all()


def test_kl_self_is_zero():
    lp, _ = _random_logps((7, 33), seed=3)
    lp[0, :5] = -math.inf  # zero-probability entries too
    lp[0] = torch.log_softmax(lp[0], -1)
    out = per_token_kl(lp, lp.clone())
    assert torch.equal(out, torch.zeros(7))


def test_kl_nonnegative():
    g = torch.Generator().manual_seed(4)
    a = torch.randn(200, 30, generator=g) * 3
    for noise in (1e-3, 1e-1, 1.0, 5.0):
        b = a + torch.randn(200, 30, generator=g) * noise
        out = per_token_kl(torch.log_softmax(a, -1), torch.log_softmax(b, -1))
        # float32 rounding may dip a hair below 0 for near-identical rows, never more
        assert out.min().item() >= -1e-6
        if noise >= 0.1:
            assert (out > 0).all()


def test_per_token_kl_shape_mismatch():
    with pytest.raises(ValueError, match="shapes differ"):
        per_token_kl(torch.zeros(2, 3), torch.zeros(2, 4))


def test_per_token_kl_gradient_matches_float64_autograd():
    lp, lq = _random_logps((3, 4, 25), seed=5)
    w = torch.randn(3, 4, generator=torch.Generator().manual_seed(6))
    lp.requires_grad_(True)
    lq.requires_grad_(True)
    (w * per_token_kl(lp, lq)).sum().backward()

    lp64 = lp.detach().double().requires_grad_(True)
    lq64 = lq.detach().double().requires_grad_(True)
    kl64 = (torch.exp(lp64) * (lp64 - lq64)).sum(-1)
    (w.double() * kl64).sum().backward()
    np.testing.assert_allclose(lp.grad.numpy(), lp64.grad.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(lq.grad.numpy(), lq64.grad.numpy(), rtol=1e-5, atol=1e-6)
    # the closed form as well: ∂/∂lp = w p (lp − lq + 1), ∂/∂lq = −w p
    p = np.exp(lp.detach().double().numpy())
    d = lp.detach().double().numpy() - lq.detach().double().numpy()
    wn = w.double().numpy()[..., None]
    np.testing.assert_allclose(lp.grad.numpy(), wn * p * (d + 1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(lq.grad.numpy(), -wn * p, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- quantile / aggregate


@pytest.mark.parametrize("n", [1, 2, 3, 20, 101, 1000])
@pytest.mark.parametrize("q", [0.0, 0.25, 0.5, 0.95, 1.0])
def test_quantile_matches_numpy_linear(n, q):
    x = torch.rand(n, generator=torch.Generator().manual_seed(n)) * 5
    np.testing.assert_allclose(quantile(x, q).item(), np.percentile(x.double().numpy(), 100 * q), rtol=1e-6, atol=1e-6)


def test_quantile_rejects_bad_input():
    with pytest.raises(ValueError):
        quantile(torch.zeros(0), 0.5)
    with pytest.raises(ValueError):
        quantile(torch.zeros(2, 2), 0.5)
    with pytest.raises(ValueError):
        quantile(torch.zeros(3), 1.5)


def _kl_like(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, generator=g) ** 3 * 4  # skewed, like per-token KL


@pytest.mark.parametrize("n", [2, 7, 20, 101, 1000])
@pytest.mark.parametrize("how", HOWS)
def test_aggregate_values_and_gradients(how, n):
    x = _kl_like(n, seed=10 + n).requires_grad_(True)
    assert len(set(x.tolist())) == n  # distinct values: the gradient is unambiguous
    out = aggregate(x, how)
    assert out.dtype == torch.float32 and out.dim() == 0
    np.testing.assert_allclose(out.item(), np_agg(x.detach().numpy(), how), rtol=1e-6, atol=1e-7)
    out.backward()
    np.testing.assert_allclose(x.grad.numpy(), ref_grad(x, how), rtol=1e-5, atol=1e-7)


def test_aggregate_p95_gradient_goes_to_two_order_statistics():
    n = 21  # pos = 0.95 · 20 = 19: exactly an order statistic
    x = torch.randperm(n, generator=torch.Generator().manual_seed(0)).float().requires_grad_(True)
    aggregate(x, "p95").backward()
    expected = np.zeros(n)
    expected[int(np.where(x.detach().numpy() == 19)[0][0])] = 1.0
    np.testing.assert_allclose(x.grad.numpy(), expected, atol=1e-6)

    n = 11  # pos = 0.95 · 10 = 9.5: halfway between the 10th and 11th values
    x = torch.randperm(n, generator=torch.Generator().manual_seed(1)).float().requires_grad_(True)
    out = aggregate(x, "p95")
    assert out.item() == pytest.approx(9.5)
    out.backward()
    g = x.grad.numpy()
    v = x.detach().numpy()
    assert g[v == 9][0] == pytest.approx(0.5) and g[v == 10][0] == pytest.approx(0.5)
    assert np.count_nonzero(g) == 2

    n = 7  # pos = 5.7: weights (0.3, 0.7) on the 6th and 7th values
    x = torch.tensor([3.0, 0.0, 6.0, 1.0, 5.0, 2.0, 4.0], requires_grad=True)
    aggregate(x, "p95").backward()
    np.testing.assert_allclose(x.grad.numpy(), [0, 0, 0.7, 0, 0.3, 0, 0], atol=1e-6)


@pytest.mark.parametrize("dtype", LOW_DTYPES, ids=["bf16", "fp16"])
@pytest.mark.parametrize("how", HOWS)
def test_aggregate_low_precision_inputs(how, dtype):
    x = _kl_like(64, seed=20).to(dtype)
    x_r = x.double().numpy()
    x = x.requires_grad_(True)
    out = aggregate(x, how)
    assert out.dtype == torch.float32
    np.testing.assert_allclose(out.item(), np_agg(x_r, how), rtol=1e-5, atol=1e-6)
    out.backward()
    assert x.grad.dtype == dtype
    exp_grad = ref_grad(x, how)
    if len(set(x_r.tolist())) == x_r.size:
        np.testing.assert_allclose(x.grad.double().numpy(), exp_grad, rtol=1e-2, atol=1e-4)
    else:  # rounding made ties: compare the tie-invariant group sums
        got, want = group_sums(x_r, x.grad.double().numpy()), group_sums(x_r, exp_grad)
        for key in want:
            assert got[key] == pytest.approx(want[key], rel=1e-2, abs=1e-4)


@pytest.mark.parametrize("how", HOWS)
def test_aggregate_with_ties(how):
    vals = np.array([0.1, 0.1, 0.1, 2.0, 0.1, 3.0, 3.0, 0.5, 2.0, 3.0, 0.1, 0.5] * 3)
    x = torch.tensor(vals, dtype=torch.float32, requires_grad=True)
    out = aggregate(x, how)
    np.testing.assert_allclose(out.item(), np_agg(vals, how), rtol=1e-6)
    out.backward()
    g = x.grad.numpy().astype(np.float64)
    assert np.isfinite(g).all()
    want = group_sums(vals.astype(np.float32), ref_grad(x, how))
    got = group_sums(vals.astype(np.float32), g)
    for key in want:
        assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-7), key
    if how in ("p95", "max"):  # all of the gradient sits on the tied top value
        assert g[vals != 3.0].sum() == 0 and g.sum() == pytest.approx(1.0)


@pytest.mark.parametrize("how", HOWS)
def test_aggregate_single_element(how):
    x = torch.tensor([0.7], requires_grad=True)
    out = aggregate(x, how)
    expected = math.sqrt(0.49 + EPS) if how == "rmse" else 0.7
    assert out.item() == pytest.approx(expected, rel=1e-6)
    out.backward()
    expected_grad = 0.7 / math.sqrt(0.49 + EPS) if how == "rmse" else 1.0
    assert x.grad.item() == pytest.approx(expected_grad, rel=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, *LOW_DTYPES], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("how", HOWS)
def test_empty_input(how, dtype):
    full = torch.rand(5, dtype=dtype, requires_grad=True)
    kl = full[torch.zeros(5, dtype=torch.bool)]  # an empty selection of counted positions
    out = aggregate(kl, how)
    assert out.dtype == torch.float32
    assert out.item() == 0.0 and not torch.isnan(out)
    out.backward()
    assert full.grad is not None
    assert torch.equal(full.grad, torch.zeros_like(full))


def test_rmse_zero_kl_fp16_keeps_eps():
    """eps = 1e-8 underflows in fp16; rmse must be computed in float32, giving sqrt(eps) and a 0 gradient."""
    x = torch.zeros(10, dtype=torch.float16, requires_grad=True)
    out = aggregate(x, "rmse")
    assert out.item() == pytest.approx(math.sqrt(EPS), rel=1e-4)
    out.backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


def test_unknown_aggregator():
    with pytest.raises(ValueError) as info:
        aggregate(torch.ones(3), "median")
    msg = str(info.value)
    for name in HOWS:
        assert name in msg
    assert "median" in msg


def test_aggregate_rejects_2d():
    with pytest.raises(ValueError):
        aggregate(torch.ones(2, 3), "mean")


def test_p95_large_tensor_beyond_torch_quantile_limit():
    n = 17_000_000  # > 2^24 = 16_777_216: torch.quantile refuses this size
    assert n > 2**24
    x = torch.rand(n, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    start = time.perf_counter()
    out = aggregate(x, "p95")
    out.backward()
    elapsed = time.perf_counter() - start
    expected = np.percentile(x.detach().numpy().astype(np.float64), 95)
    assert out.item() == pytest.approx(expected, rel=1e-6)
    assert x.grad.sum().item() == pytest.approx(1.0, rel=1e-6)
    assert int((x.grad != 0).sum()) <= 2
    assert elapsed < 15.0, f"p95 over {n} elements took {elapsed:.1f} s"


def test_kl_summary():
    x = _kl_like(50, seed=30).requires_grad_(True)
    s = kl_summary(x)
    assert set(s) == {"kl_mean", "kl_rmse", "kl_p95", "kl_max"}
    for how in HOWS:
        assert not s[f"kl_{how}"].requires_grad
        np.testing.assert_allclose(s[f"kl_{how}"].item(), np_agg(x.detach().numpy(), how), rtol=1e-6)
    empty = kl_summary(torch.zeros(0))
    assert all(v.item() == 0.0 for v in empty.values())


# ----------------------------------------------------------------------------- KLBarrier


def test_barrier_defaults():
    b = KLBarrier()
    assert (b.reg, b.agg, b.tau, b.lam) == ("kl_rev", "rmse", 1.0, 1.0)
    assert b.active


@pytest.mark.parametrize("how", HOWS)
def test_barrier_value_matches_hand_computation(how):
    lam, pw, rnd, tau = 0.7, 1.5, 3, 0.2
    x = _kl_like(40, seed=40).requires_grad_(True)
    barrier = KLBarrier(reg="kl_rev", agg=how, tau=tau, lam=lam, lam_round_pow=pw)
    out = barrier(x, round=rnd)
    D = np_agg(x.detach().numpy(), how)
    lam_eff = lam * (1 + rnd) ** pw
    assert tau < D
    assert out.lam_eff == pytest.approx(lam_eff)
    assert out.value.dtype == torch.float32
    assert out.value.item() == pytest.approx(lam_eff * max(D - tau, 0.0), rel=1e-5)
    assert out.D.item() == pytest.approx(D, rel=1e-6) and not out.D.requires_grad
    assert out.fired.item() == 1.0
    out.value.backward()
    np.testing.assert_allclose(x.grad.numpy(), lam_eff * ref_grad(x, how), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("how", HOWS)
def test_barrier_below_tau_is_zero(how):
    x = _kl_like(40, seed=41).requires_grad_(True)
    D = np_agg(x.detach().numpy(), how)
    out = KLBarrier(agg=how, tau=D + 0.1, lam=3.0)(x)
    assert out.value.item() == 0.0
    assert out.fired.item() == 0.0
    out.value.backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


@pytest.mark.parametrize("how", HOWS)
def test_barrier_empty_batch(how):
    full = torch.rand(4, requires_grad=True)
    out = KLBarrier(agg=how, tau=0.0, lam=5.0)(full[:0])
    assert out.value.item() == 0.0 and out.fired.item() == 0.0
    out.value.backward()
    assert torch.equal(full.grad, torch.zeros(4))


def test_barrier_nll_is_inactive():
    barrier = KLBarrier(reg="nll", agg="max", tau=0.0, lam=10.0)
    assert barrier.active is False
    x = (torch.rand(10) + 1).requires_grad_(True)
    out = barrier(x, round=2)
    assert out.value.item() == 0.0 and out.fired.item() == 0.0
    out.value.backward()
    assert torch.equal(x.grad, torch.zeros(10))


@pytest.mark.parametrize(
    ("kwargs", "field", "allowed"),
    [
        ({"reg": "kl_sym"}, "reg", ("kl_rev", "kl_fwd", "nll")),
        ({"agg": "median"}, "agg", HOWS),
        ({"tau": -0.1}, "tau", (">= 0",)),
        ({"tau": math.nan}, "tau", (">= 0",)),
        ({"tau": math.inf}, "tau", ("finite",)),
        ({"lam": -1.0}, "lam", (">= 0",)),
        ({"lam": math.inf}, "lam", ("finite",)),
    ],
)
def test_barrier_bad_config(kwargs, field, allowed):
    with pytest.raises(ValueError) as info:
        KLBarrier(**kwargs)
    msg = str(info.value)
    assert field in msg
    for word in allowed:
        assert word in msg


def test_barrier_motivating_example_tail_aggregators_fire_mean_does_not():
    """docs/maths.md §1.8: base-like everywhere except a few looping positions."""
    g = torch.Generator().manual_seed(50)
    n_base, n_loop = 940, 60
    base = 0.1 + 0.02 * (torch.rand(n_base, generator=g) - 0.5)
    loop = torch.linspace(3.0, 8.1, n_loop)
    perm = torch.randperm(n_base + n_loop, generator=g)
    kl = torch.cat([base, loop])[perm].requires_grad_(True)
    is_loop = (perm >= n_base).numpy()

    vals = kl.detach().numpy()
    ref = {how: np_agg(vals, how) for how in HOWS}
    assert ref["mean"] < 0.5
    for how in ("rmse", "p95", "max"):
        assert ref[how] > 1.0
        assert ref[how] > 2 * ref["mean"]

    mean_out = KLBarrier(agg="mean", tau=0.5)(kl)
    assert mean_out.D.item() == pytest.approx(ref["mean"], rel=1e-6)
    assert mean_out.D.item() < 0.5
    assert mean_out.fired.item() == 0.0 and mean_out.value.item() == 0.0
    mean_out.value.backward()
    assert torch.equal(kl.grad, torch.zeros_like(kl))  # the mean barrier never pushes back

    for how in ("rmse", "p95", "max"):
        kl.grad = None
        out = KLBarrier(agg=how, tau=1.0)(kl)
        assert out.D.item() == pytest.approx(ref[how], rel=1e-5)
        assert out.D.item() > 1.0
        assert out.fired.item() == 1.0
        assert out.value.item() == pytest.approx(ref[how] - 1.0, rel=1e-5)
        out.value.backward()
        grad = kl.grad.numpy()
        # the push-back lands on the looping positions (6% of positions, >= 75% of the gradient)
        assert grad[is_loop].sum() > 0.75 * grad.sum() > 0
        assert grad[is_loop].mean() > 10 * grad[~is_loop].mean()


# ----------------------------------------------------------------------------- counted_positions


def test_counted_positions_prompt_completion_padding():
    P = -100
    labels = torch.tensor(
        [
            [P, P, P, 5, 6, 7],  # prompt of 3, completion of 3, no padding
            [P, P, 8, 9, P, P],  # right padding (attention 0 at the end)
            [P, P, P, P, 3, 4],  # left padding, then a prompt of 2, completion of 2
        ]
    )
    attention = torch.tensor(
        [
            [1, 1, 1, 1, 1, 1],
            [1, 1, 1, 1, 0, 0],
            [0, 0, 1, 1, 1, 1],
        ]
    )
    c = counted_positions(labels, attention)
    assert c.batch_idx.tolist() == [0, 0, 0, 1, 1, 2, 2]
    assert c.pos_idx.tolist() == [2, 3, 4, 1, 2, 3, 4]
    assert c.targets.tolist() == [5, 6, 7, 8, 9, 3, 4]
    # the logits at t predict the token at t + 1
    for b, t, y in zip(c.batch_idx.tolist(), c.pos_idx.tolist(), c.targets.tolist(), strict=True):
        assert labels[b, t + 1].item() == y
    # without a mask the same positions count
    c2 = counted_positions(labels)
    assert torch.equal(c2.batch_idx, c.batch_idx) and torch.equal(c2.pos_idx, c.pos_idx)


def test_counted_positions_label_under_zero_attention():
    labels = torch.tensor([[-100, 4, 5, 6]])
    attention = torch.tensor([[1, 1, 1, 0]])  # the last label sits on padding
    with pytest.raises(ValueError):
        counted_positions(labels, attention)


def test_counted_positions_shape_checks():
    with pytest.raises(ValueError):
        counted_positions(torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError):
        counted_positions(torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 4, dtype=torch.long))


def test_empty_mask():
    labels = torch.full((2, 5), -100)
    c = counted_positions(labels, torch.ones(2, 5, dtype=torch.long))
    assert c.batch_idx.numel() == c.pos_idx.numel() == c.targets.numel() == 0


# ----------------------------------------------------------------------------- token_stats

B, T, H, V = 3, 7, 16, 40


def _setup(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    head = nn.Linear(H, V)
    with torch.no_grad():
        head.weight.copy_(torch.randn(V, H, generator=g) * 0.5)
        head.bias.copy_(torch.randn(V, generator=g) * 0.5)
    hs = torch.randn(B, T, H, generator=g).requires_grad_(True)
    hr = hs.detach() + 0.7 * torch.randn(B, T, H, generator=g)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :2] = -100  # prompt
    labels[1, :4] = -100
    labels[2, :3] = -100
    labels[2, -1] = -100  # padding
    return head, hs, hr, labels


def _weights(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g), torch.randn(n, generator=g)


@pytest.mark.parametrize("chunk_size", [1, 3, 100])
@pytest.mark.parametrize("reg", REGS)
def test_token_stats_chunked_equals_naive(reg, chunk_size):
    head, hs, hr, labels = _setup()
    c = counted_positions(labels)
    n = c.targets.numel()
    assert chunk_size == 100 and n < chunk_size or chunk_size < n
    w_kl, w_nll = _weights(n, seed=1)

    st = token_stats(
        hs[c.batch_idx, c.pos_idx], hr[c.batch_idx, c.pos_idx], c.targets, head=head, reg=reg, chunk_size=chunk_size
    )
    assert st.kl.dtype == st.nll.dtype == torch.float32 and st.kl.shape == st.nll.shape == (n,)
    ((w_kl * st.kl).sum() + (w_nll * st.nll).sum()).backward()
    g_hidden, g_weight = hs.grad.clone(), head.weight.grad.clone()

    hs.grad = None
    head.zero_grad()
    with torch.no_grad():
        ref_logits = head(hr)
    nv = naive_token_stats(head(hs), ref_logits, labels, reg=reg)
    ((w_kl * nv.kl).sum() + (w_nll * nv.nll).sum()).backward()

    torch.testing.assert_close(st.kl, nv.kl, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(st.nll, nv.nll, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g_hidden, hs.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g_weight, head.weight.grad, atol=1e-5, rtol=1e-5)
    if reg == "nll":
        assert torch.equal(st.kl, torch.zeros(n))
    else:
        assert st.kl.min() > 0


@pytest.mark.parametrize("reg", REGS)
def test_token_stats_matches_float64_reference(reg):
    head, hs, hr, labels = _setup(seed=2)
    c = counted_positions(labels)
    st = token_stats(
        hs[c.batch_idx, c.pos_idx], hr[c.batch_idx, c.pos_idx], c.targets, head=head, reg=reg, chunk_size=4
    )
    W, bias = head.weight.detach().double().numpy(), head.bias.detach().double().numpy()
    rows_s = hs.detach().double().numpy()[c.batch_idx.numpy(), c.pos_idx.numpy()]
    rows_r = hr.double().numpy()[c.batch_idx.numpy(), c.pos_idx.numpy()]
    lps, lpr = np_log_softmax(rows_s @ W.T + bias), np_log_softmax(rows_r @ W.T + bias)
    if reg == "kl_rev":
        kl = np_kl(lps, lpr)
    elif reg == "kl_fwd":
        kl = np_kl(lpr, lps)
    else:
        kl = np.zeros(len(lps))
    nll = -lps[np.arange(len(lps)), c.targets.numpy()]
    np.testing.assert_allclose(st.kl.detach().numpy(), kl, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(st.nll.detach().numpy(), nll, rtol=1e-5, atol=1e-5)
    if reg != "nll":
        assert kl.min() > 0.01


@pytest.mark.parametrize("reg", ["kl_rev", "kl_fwd"])
def test_token_stats_student_logits_ref_hidden(reg):
    head, hs, hr, labels = _setup(seed=3)
    c = counted_positions(labels)
    rows_s, rows_r = hs[c.batch_idx, c.pos_idx], hr[c.batch_idx, c.pos_idx]
    w_kl, w_nll = _weights(c.targets.numel(), seed=4)

    a = token_stats(rows_s, rows_r, c.targets, head=head, reg=reg, chunk_size=3)
    ((w_kl * a.kl).sum() + (w_nll * a.nll).sum()).backward()
    g_a = hs.grad.clone()
    hs.grad = None

    rows_s = hs[c.batch_idx, c.pos_idx]
    b = token_stats(head(rows_s), rows_r, c.targets, head=None, ref_head=head, reg=reg, chunk_size=3)
    ((w_kl * b.kl).sum() + (w_nll * b.nll).sum()).backward()
    torch.testing.assert_close(a.kl, b.kl, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(a.nll, b.nll, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(g_a, hs.grad, atol=1e-6, rtol=1e-6)


def test_token_stats_ref_gets_no_gradient():
    head, hs, hr, labels = _setup(seed=5)
    c = counted_positions(labels)
    hr = hr.requires_grad_(True)
    st = token_stats(hs[c.batch_idx, c.pos_idx], hr[c.batch_idx, c.pos_idx], c.targets, head=head, chunk_size=2)
    st.kl.sum().backward()
    assert hr.grad is None
    assert hs.grad is not None and hs.grad.abs().sum() > 0


def test_token_stats_no_grad_mode_same_values():
    head, hs, hr, labels = _setup(seed=6)
    c = counted_positions(labels)
    rows_s, rows_r = hs[c.batch_idx, c.pos_idx], hr[c.batch_idx, c.pos_idx]
    with_grad = token_stats(rows_s, rows_r, c.targets, head=head, chunk_size=3)
    with torch.no_grad():
        without = token_stats(rows_s, rows_r, c.targets, head=head, chunk_size=3)
    assert not without.kl.requires_grad
    torch.testing.assert_close(with_grad.kl.detach(), without.kl, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(with_grad.nll.detach(), without.nll, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("reg", REGS)
def test_token_stats_empty(reg):
    head, hs, hr, _ = _setup(seed=7)
    c = counted_positions(torch.full((B, T), -100))
    st = token_stats(hs[c.batch_idx, c.pos_idx], hr[c.batch_idx, c.pos_idx], c.targets, head=head, reg=reg)
    assert st.kl.shape == st.nll.shape == (0,)
    assert st.kl.dtype == st.nll.dtype == torch.float32
    (st.kl.sum() + st.nll.sum()).backward()
    assert hs.grad is not None
    assert torch.equal(hs.grad, torch.zeros_like(hs))
    # and the barrier on it is exactly 0 with zero gradient
    hs.grad = None
    st = token_stats(hs[c.batch_idx, c.pos_idx], hr[c.batch_idx, c.pos_idx], c.targets, head=head, reg=reg)
    out = KLBarrier(reg=reg, agg="rmse", tau=0.0)(st.kl)
    assert out.value.item() == 0.0
    out.value.backward()
    assert torch.equal(hs.grad, torch.zeros_like(hs))


def test_token_stats_bad_arguments():
    head, hs, hr, labels = _setup(seed=8)
    c = counted_positions(labels)
    rows_s, rows_r = hs[c.batch_idx, c.pos_idx], hr[c.batch_idx, c.pos_idx]
    with pytest.raises(ValueError, match="ref"):
        token_stats(rows_s, None, c.targets, head=head, reg="kl_rev")
    with pytest.raises(ValueError, match="chunk_size"):
        token_stats(rows_s, rows_r, c.targets, head=head, chunk_size=0)
    with pytest.raises(ValueError) as info:
        token_stats(rows_s, rows_r, c.targets, head=head, reg="kl")
    assert all(r in str(info.value) for r in REGS)
    # nll needs no ref
    st = token_stats(rows_s, None, c.targets, head=head, reg="nll")
    assert torch.equal(st.kl, torch.zeros(c.targets.numel()))


# ----------------------------------------------------------------------------- memory: no full [N, V]


class _OpOutputShapes(TorchDispatchMode):
    """Records the shape of every tensor produced by an aten op (forward, recompute and backward)."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[str, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.shapes.append((str(func), tuple(t.shape)))
        return out


def _saved_numels(fn) -> list[tuple[int, ...]]:
    shapes: list[tuple[int, ...]] = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return shapes


def test_token_stats_never_materialises_full_logprobs():
    N, Hs, Vs, chunk = 40, 6, 64, 8  # Vs * Hs (the head weight) < chunk * Vs < N * Vs
    g = torch.Generator().manual_seed(9)
    head = nn.Linear(Hs, Vs)
    rows_s = torch.randn(N, Hs, generator=g, requires_grad=True)
    rows_r = torch.randn(N, Hs, generator=g)
    targets = torch.randint(0, Vs, (N,), generator=g)
    full = N * Vs

    # 1) what autograd keeps for backward: with checkpointing only chunk inputs, nothing with V columns
    out: dict = {}

    def run():
        out["st"] = token_stats(rows_s, rows_r, targets, head=head, chunk_size=chunk)

    saved = _saved_numels(run)
    assert saved, "expected checkpoint inputs to be saved"
    assert all(math.prod(s) < chunk * Vs for s in saved), saved
    assert sum(math.prod(s) for s in saved) < full

    # the same probe does see the [N, V] tensors of an unchunked computation (so it can fail)
    def run_full():
        logp = torch.log_softmax(head(rows_s), -1)
        out["full"] = per_token_kl(logp, torch.log_softmax(head(rows_r), -1).detach())

    assert any(math.prod(s) == full for s in _saved_numels(run_full))

    # 2) every tensor any op creates, in forward, checkpoint recompute and backward, is at most one chunk
    rec = _OpOutputShapes()
    with rec:
        st = token_stats(rows_s, rows_r, targets, head=head, chunk_size=chunk)
        (st.kl.sum() + st.nll.sum()).backward()
    assert any(s[-1:] == (Vs,) for _, s in rec.shapes)  # the recorder saw the chunk logits
    too_big = [(f, s) for f, s in rec.shapes if math.prod(s) > chunk * Vs]
    assert not too_big, too_big
    ops = {f for f, _ in rec.shapes}
    assert sum("_log_softmax.default" in f for f, _ in rec.shapes) >= N // chunk
    assert any("_log_softmax_backward" in f for f in ops)
