"""The fused frozen-head path of token_stats against a float64 full-tensor reference (values and gradients)."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from heal_pl.barrier.fused_head import HeadTransform
from heal_pl.barrier.kl import naive_token_stats, token_stats
from heal_pl.barrier.lazy_head import KLGradPlan


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
    from heal_pl.barrier import kl as kl_module

    calls: list[int] = []
    original = kl_module.FusedHeadStats.apply
    monkeypatch.setattr(kl_module.FusedHeadStats, "apply", lambda *a: calls.append(1) or original(*a))
    h, ref, y = torch.randn(5, 4, requires_grad=True), torch.randn(5, 4), torch.randint(0, 9, (5,))
    trainable = torch.nn.Linear(4, 9)
    token_stats(h, ref, y, head=trainable, chunk_size=2)
    assert calls == []
    token_stats(h, ref, y, head=trainable.requires_grad_(False), chunk_size=2)
    assert len(calls) == 3


@pytest.mark.parametrize("trainable", [False, True], ids=["fused", "checkpointed"])
def test_bf16_autocast_gives_float32_logits(trainable: bool) -> None:
    """Under bf16 autocast the head product of float32 weights stays float32: float32 tolerances vs float64
    (before issue 12 the product ran in bf16 and the KL was ~6 % off, its gradient ~10 %)."""
    g = torch.Generator().manual_seed(1)
    N, H, V = 6, 16, 400
    head = torch.nn.Linear(H, V, bias=False).requires_grad_(trainable)
    with torch.no_grad():
        head.weight.copy_(torch.randn(V, H, generator=g))
    h = torch.randn(N, H, generator=g, requires_grad=True)
    ref, y = torch.randn(N, H, generator=g), torch.randint(0, V, (N,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        stats = token_stats(h, ref, y, head=head, chunk_size=4)
    (stats.kl.sum() + stats.nll.sum()).backward()
    h64, kl64, nll64 = reference(h, ref, head.weight, torch.zeros(V), y, "kl_rev")
    (kl64.sum() + nll64.sum()).backward()
    assert stats.kl.dtype == torch.float32 and h.grad.dtype == torch.float32
    torch.testing.assert_close(stats.kl.double(), kl64.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stats.nll.double(), nll64.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h.grad.double(), h64.grad, rtol=1e-4, atol=1e-5)


class TransformedHead(torch.nn.Module):
    """A frozen projection plus a logit transform (the shape of heal_pl.models.lm.LMHead, without a model)."""

    def __init__(self, proj: torch.nn.Linear, transform: HeadTransform) -> None:
        super().__init__()
        self.proj, self.transform = proj, transform

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.transform(self.proj(x))


TRANSFORMS = {
    "cohere": HeadTransform(multiplier=0.0625),
    "granite": HeadTransform(divisor=8.0),
    "gemma": HeadTransform(softcap=3.0),
    "scaled_cap": HeadTransform(multiplier=2.0, softcap=3.0),
}


@pytest.mark.parametrize("reg", ["kl_rev", "kl_fwd", "nll"])
@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_fused_head_applies_the_logit_transform_and_its_gradient(
    name: str, reg: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from heal_pl.barrier import kl as kl_module

    calls: list[int] = []
    original = kl_module.FusedHeadStats.apply
    monkeypatch.setattr(kl_module.FusedHeadStats, "apply", lambda *a: calls.append(1) or original(*a))
    t = TRANSFORMS[name]
    g = torch.Generator().manual_seed(5)
    N, H, V = 11, 8, 37
    proj = torch.nn.Linear(H, V).requires_grad_(False)
    with torch.no_grad():
        proj.weight.copy_(torch.randn(V, H, generator=g) * 2)
        proj.bias.copy_(torch.randn(V, generator=g))
    h = torch.randn(N, H, generator=g, requires_grad=True)
    ref, y = torch.randn(N, H, generator=g), torch.randint(0, V, (N,), generator=g)
    a, c = torch.rand(N, generator=g), torch.rand(N, generator=g)
    stats = token_stats(h, ref, y, head=TransformedHead(proj, t), reg=reg, chunk_size=4)
    (a * stats.kl + c * stats.nll).sum().backward()

    h64 = h.detach().double().requires_grad_()
    W, b = proj.weight.double(), proj.bias.double()

    def z(x: torch.Tensor) -> torch.Tensor:  # the transform written out in float64
        u = (x @ W.T + b) * (t.multiplier or 1.0) / (t.divisor or 1.0)
        return torch.tanh(u / t.softcap) * t.softcap if t.softcap else u

    logp, logq = torch.log_softmax(z(h64), -1), torch.log_softmax(z(ref.double()), -1)
    nll = -logp[torch.arange(N), y]
    kl = {"kl_rev": (logp.exp() * (logp - logq)).sum(-1), "kl_fwd": (logq.exp() * (logq - logp)).sum(-1),
          "nll": torch.zeros_like(nll)}[reg]  # fmt: skip
    (a.double() * kl + c.double() * nll).sum().backward()
    assert len(calls) == 3, "a frozen transformed head takes the fused path"
    torch.testing.assert_close(stats.kl.double(), kl.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats.nll.double(), nll.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h.grad.double(), h64.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reg", ["kl_rev", "kl_fwd"])
def test_low_precision_head_matches_float64_of_its_own_values(
    dtype: torch.dtype, reg: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bf16/fp16 head and rows: the products of two 8- (11-) bit mantissas are exact in float32 and summed in
    float32, so KL/NLL carry float32 error only (rtol 1e-5 vs float64 of the same low-precision values). The row
    gradient is returned in the rows' dtype: one rounding, ≤ eps/2 relative (2^-8 bf16, 2^-11 fp16), so rtol 2 eps.
    The vocabulary is upcast in blocks (forced small here): never a float32 copy of the whole weight."""
    from heal_pl.barrier import fused_head

    g = torch.Generator().manual_seed(6)
    N, H, V = 10, 16, 300
    monkeypatch.setattr(fused_head, "_BLOCK_BYTES", 4 * H * 64)  # 64 vocabulary rows per upcast block
    head = torch.nn.Linear(H, V, bias=False, dtype=dtype).requires_grad_(False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(V, H, generator=g))
    h = torch.randn(N, H, generator=g).to(dtype).requires_grad_()
    ref, y = torch.randn(N, H, generator=g).to(dtype), torch.randint(0, V, (N,), generator=g)
    rec = _FloatCopies()
    with rec:
        stats = token_stats(h, ref, y, head=head, reg=reg, chunk_size=4)
        (stats.kl.sum() + stats.nll.sum()).backward()
    h64, kl64, nll64 = reference(h, ref, head.weight, torch.zeros(V), y, reg)
    (kl64.sum() + nll64.sum()).backward()
    assert stats.kl.dtype == torch.float32 and h.grad.dtype == dtype
    torch.testing.assert_close(stats.kl.double(), kl64.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stats.nll.double(), nll64.detach(), rtol=1e-5, atol=1e-5)
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(h.grad.double(), h64.grad, rtol=2 * eps, atol=1e-5)
    assert rec.largest and max(rec.largest) <= 64 * H < V * H, "the weight is upcast in vocabulary blocks"
    assert 64 * H in rec.largest, "the recorder saw the weight blocks (it can fail)"


class _FloatCopies(TorchDispatchMode):
    """numel of every float32 tensor made by a dtype conversion from a low-precision one."""

    def __init__(self) -> None:
        super().__init__()
        self.largest: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        out = func(*args, **(kwargs or {}))
        src = args[0] if args and isinstance(args[0], torch.Tensor) else None
        low = src is not None and src.dtype in (torch.bfloat16, torch.float16) and src.dim() == 2
        if "_to_copy" in str(func) and low and isinstance(out, torch.Tensor) and out.dtype == torch.float32:
            self.largest.append(out.numel())
        return out


@pytest.mark.parametrize("path", ["eager", "lazy", "cached lse"])
@pytest.mark.parametrize("reg", ["kl_rev", "kl_fwd"])
def test_masked_vocabulary_zero_log_zero(reg: str, path: str) -> None:
    """A bias of −inf on some tokens (p = q = 0 there): 0 · log 0 = 0, finite KL and gradients.

    The fast path's ``p · (log p − log q)`` is NaN there; the fused kernel must fall back to masking,
    and agree with the naive full-tensor reference (which masks by ``p == 0``; float64 logits); on the lazy path
    (heal_pl.barrier.lazy_head) too, whose backward recomputes the chunks, and from a cached ref LSE.
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
    lse = None
    if path == "cached lse":
        out: list[torch.Tensor] = []
        token_stats(h, ref, y, head=head, reg=reg, chunk_size=4, plan=KLGradPlan(), lse_out=out)
        lse = out[0]
        assert torch.isfinite(lse).all()
    stats = token_stats(h, ref, y, head=head, reg=reg, chunk_size=4, plan=KLGradPlan(path != "eager"), ref_lse=lse)
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
    from heal_pl.barrier import kl as kl_module

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
    from heal_pl.barrier import kl as kl_module

    flags: list[str] = []
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
    assert flags == ["none", "none", "none"]  # 3 chunks, no gradient passes
    _, kl64, nll64 = reference(h, ref, head.weight, head.bias, y, reg)
    torch.testing.assert_close(stats.kl.double(), kl64.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats.nll.double(), nll64.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("reg", ["kl_rev", "kl_fwd"])
def test_no_grad_kl_sums_like_per_token_kl(reg: str) -> None:
    """Without gradients the kernel sums ``KL_t`` as ``per_token_kl`` does (torch's pairwise sum, not float32 dot
    products along V), so a rollout's KL (measure_kl, issue 27) is the full-tensor value to float32 rounding, also
    with ``p = 0`` terms (masked vocabulary)."""
    from heal_pl.barrier.fused_head import linear_f32
    from heal_pl.barrier.kl import per_token_kl

    g = torch.Generator().manual_seed(5)
    N, H, V = 16, 8, 65536
    head = torch.nn.Linear(H, V)  # trainable: under no_grad it is fused all the same
    with torch.no_grad():
        head.weight.copy_(4 * torch.randn(V, H, generator=g))
        head.bias[[3, 11]] = -float("inf")
        h, ref = torch.randn(N, H, generator=g), torch.randn(N, H, generator=g)
        stats = token_stats(h, ref, torch.randint(0, V, (N,), generator=g), head=head, reg=reg, chunk_size=5)
        logp = torch.log_softmax(linear_f32(h, head.weight, head.bias), -1)
        logq = torch.log_softmax(linear_f32(ref, head.weight, head.bias), -1)
    want = per_token_kl(logp, logq) if reg == "kl_rev" else per_token_kl(logq, logp)
    assert torch.isfinite(stats.kl).all()
    torch.testing.assert_close(stats.kl, want, rtol=2e-6, atol=0)


def test_auto_chunk_size_follows_the_vocabulary_and_the_free_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    from heal_pl.barrier.fused_head import CPU_BUDGET, auto_chunk_size

    cpu = torch.device("cpu")
    assert auto_chunk_size(49_152, cpu) == 256  # the earlier fixed default, at SmolLM2's vocabulary
    assert auto_chunk_size(262_144, cpu) == CPU_BUDGET // (4 * 262_144 * 4) == 48
    assert auto_chunk_size(10**9, cpu) == 8  # never fewer than 8 rows
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (16 * 2**30, 80 * 2**30))
    rows = auto_chunk_size(128_256, torch.device("cuda"))  # an eighth of 16 GiB free: 2 GiB of workspace
    assert rows == 1024 and 4 * rows * 128_256 * 4 <= 2 * 2**30 < 4 * (rows + 64) * 128_256 * 4
