"""The fused frozen-head path of token_stats against a float64 full-tensor reference (values and gradients)."""

from __future__ import annotations

import pytest
import torch

from heal_pl.kl import naive_token_stats, token_stats


def reference(h: torch.Tensor, ref: torch.Tensor, W: torch.Tensor, b: torch.Tensor, y: torch.Tensor, reg: str):
    """float64, full [N, V], autograd: the independent reference."""
    h = h.detach().double().requires_grad_()
    logp = torch.log_softmax(h @ W.double().T + b.double(), -1)
    logq = torch.log_softmax(ref.double() @ W.double().T + b.double(), -1)
    nll = -logp[torch.arange(len(y)), y]
    if reg == "kl_rev":
        kl = (logp.exp() * (logp - logq)).sum(-1)
    elif reg == "kl_fwd":
        kl = (logq.exp() * (logq - logp)).sum(-1)
    else:
        kl = torch.zeros_like(nll)
    return h, kl, nll


@pytest.mark.parametrize("reg", ["kl_rev", "kl_fwd", "nll"])
@pytest.mark.parametrize("chunk_size", [1, 4, 64])
def test_fused_values_and_gradients_match_float64(reg: str, chunk_size: int) -> None:
    g = torch.Generator().manual_seed(0)
    N, H, V = 13, 8, 40
    head = torch.nn.Linear(H, V).requires_grad_(False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(V, H, generator=g))
        head.bias.copy_(torch.randn(V, generator=g))
    h = torch.randn(N, H, generator=g, requires_grad=True)
    ref = torch.randn(N, H, generator=g)
    y = torch.randint(0, V, (N,), generator=g)
    a, c = torch.rand(N, generator=g), torch.rand(N, generator=g)  # arbitrary upstream gradients

    stats = token_stats(h, ref, y, head=head, reg=reg, chunk_size=chunk_size)
    (a * stats.kl + c * stats.nll).sum().backward()
    h64, kl64, nll64 = reference(h, ref, head.weight, head.bias, y, reg)
    (a.double() * kl64 + c.double() * nll64).sum().backward()

    torch.testing.assert_close(stats.kl.double(), kl64.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats.nll.double(), nll64.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h.grad.double(), h64.grad, rtol=1e-4, atol=1e-6)


def test_fused_path_is_taken_only_for_a_frozen_linear_head(monkeypatch: pytest.MonkeyPatch) -> None:
    from heal_pl import kl as kl_module

    calls: list[int] = []
    original = kl_module.FusedHeadStats.apply
    monkeypatch.setattr(kl_module.FusedHeadStats, "apply", lambda *a: calls.append(1) or original(*a))
    h, ref, y = torch.randn(5, 4, requires_grad=True), torch.randn(5, 4), torch.randint(0, 9, (5,))
    trainable = torch.nn.Linear(4, 9)
    token_stats(h, ref, y, head=trainable, chunk_size=2)
    assert calls == []
    token_stats(h, ref, y, head=trainable.requires_grad_(False), chunk_size=2)
    assert len(calls) == 3


def test_fused_under_bf16_autocast_is_close_and_float32() -> None:
    g = torch.Generator().manual_seed(1)
    head = torch.nn.Linear(8, 30, bias=False).requires_grad_(False)
    h = torch.randn(6, 8, generator=g, requires_grad=True)
    ref, y = torch.randn(6, 8, generator=g), torch.randint(0, 30, (6,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        stats = token_stats(h, ref, y, head=head)
    stats.kl.sum().backward()
    exact = token_stats(h.detach(), ref, y, head=head)
    assert stats.kl.dtype == torch.float32 and h.grad.dtype == torch.float32 and torch.isfinite(h.grad).all()
    torch.testing.assert_close(stats.kl, exact.kl, rtol=0.1, atol=0.05)


@pytest.mark.parametrize("reg", ["kl_rev", "kl_fwd"])
def test_masked_vocabulary_zero_log_zero(reg: str) -> None:
    """A bias of −inf on some tokens (p = q = 0 there): 0 · log 0 = 0, finite KL and gradients.

    The fast path's ``p · (log p − log q)`` is NaN there; the fused kernel must fall back to masking,
    and agree with the naive full-tensor reference (which masks by ``p == 0``; float64 logits).
    """
    g = torch.Generator().manual_seed(2)
    N, H, V = 9, 6, 25
    head = torch.nn.Linear(H, V).requires_grad_(False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(V, H, generator=g))
        head.bias.copy_(torch.randn(V, generator=g))
        head.bias[[3, 11, 20]] = -float("inf")
    h = torch.randn(N, H, generator=g, requires_grad=True)
    ref, y = torch.randn(N, H, generator=g), torch.randint(0, 3, (N,), generator=g)
    stats = token_stats(h, ref, y, head=head, reg=reg, chunk_size=4)
    (stats.kl.sum() + stats.nll.sum()).backward()

    h64 = h.detach().double().requires_grad_()
    W64, b64 = head.weight.double(), head.bias.double()
    naive = naive_token_stats(
        torch.cat([h64 @ W64.T + b64, h64[:1] @ W64.T]).unsqueeze(0),  # positions 0..N-1 predict 1..N
        torch.cat([ref.double() @ W64.T + b64, ref[:1].double() @ W64.T]).unsqueeze(0),
        torch.cat([torch.tensor([-100]), y]).unsqueeze(0),
        reg=reg,
    )
    (naive.kl.sum() + naive.nll.sum()).backward()
    assert torch.isfinite(stats.kl).all() and torch.isfinite(h.grad).all()
    torch.testing.assert_close(stats.kl.double(), naive.kl.detach().double(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats.nll.double(), naive.nll.detach().double(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h.grad.double(), h64.grad, rtol=1e-4, atol=1e-6)


def test_a_different_ref_head_is_not_fused(monkeypatch: pytest.MonkeyPatch) -> None:
    """ref rows through another head (not the student's) take the checkpointed path, with the same maths."""
    from heal_pl import kl as kl_module

    calls: list[int] = []
    original = kl_module.FusedHeadStats.apply
    monkeypatch.setattr(kl_module.FusedHeadStats, "apply", lambda *a: calls.append(1) or original(*a))
    g = torch.Generator().manual_seed(3)
    head = torch.nn.Linear(4, 11).requires_grad_(False)
    other = torch.nn.Linear(4, 11).requires_grad_(False)
    h, ref = torch.randn(5, 4, generator=g, requires_grad=True), torch.randn(5, 4, generator=g)
    y = torch.randint(0, 11, (5,), generator=g)
    stats = token_stats(h, ref, y, head=head, ref_head=other, chunk_size=2)
    assert calls == []
    logp = torch.log_softmax(head(h.detach()).double(), -1)
    logq = torch.log_softmax(other(ref).double(), -1)
    torch.testing.assert_close(stats.kl.double(), (logp.exp() * (logp - logq)).sum(-1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("reg", ["kl_rev", "kl_fwd", "nll"])
def test_no_grad_path_uses_the_fused_kernel_and_matches_float64(reg: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under no_grad (validation) a frozen head runs the same kernel without its gradient passes."""
    from heal_pl import kl as kl_module

    flags: list[bool] = []
    original = kl_module.head_stats
    monkeypatch.setattr(kl_module, "head_stats", lambda *a, **k: flags.append(k["grads"]) or original(*a, **k))
    g = torch.Generator().manual_seed(4)
    N, H, V = 11, 8, 37
    head = torch.nn.Linear(H, V).requires_grad_(False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(V, H, generator=g))
        head.bias.copy_(torch.randn(V, generator=g))
    h, ref = torch.randn(N, H, generator=g), torch.randn(N, H, generator=g)
    y = torch.randint(0, V, (N,), generator=g)
    with torch.no_grad():
        stats = token_stats(h, ref, y, head=head, reg=reg, chunk_size=4)
    assert flags == [False, False, False]  # 3 chunks, no gradient passes
    _, kl64, nll64 = reference(h, ref, head.weight, head.bias, y, reg)
    torch.testing.assert_close(stats.kl.double(), kl64.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats.nll.double(), nll64.detach(), rtol=1e-5, atol=1e-6)
