"""The lazy KL gradient (heal_pl.barrier.lazy_head): the same loss, logged values and adapter as the eager path,
against float64 written out by hand, on steps where the hinge opens and where it stays closed."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from heal_pl.barrier import kl as kl_module
from heal_pl.barrier import lazy_head
from heal_pl.barrier.fused_head import HeadTransform
from heal_pl.barrier.kl import KLBarrier, aggregate, token_stats
from heal_pl.barrier.lazy_head import KLGradPlan
from heal_pl.callbacks import KLBarrierCallback
from heal_pl.module import HealModule
from tests.barrier.test_fused_head import TransformedHead
from tests.helpers import make_batch

TRANSFORMS = {"plain": HeadTransform(), "scaled": HeadTransform(multiplier=0.5, divisor=0.8),
              "softcap": HeadTransform(softcap=3.0)}  # fmt: skip


def _head(transform: HeadTransform, H: int = 16, V: int = 97, seed: int = 0) -> TransformedHead:
    g = torch.Generator().manual_seed(seed)
    proj = torch.nn.Linear(H, V)
    with torch.no_grad():
        proj.weight.copy_(torch.randn(V, H, generator=g) * 0.5)
        proj.bias.copy_(torch.randn(V, generator=g) * 0.1)
    return TransformedHead(proj.requires_grad_(False), transform)


def _rows(N: int = 70, H: int = 16, V: int = 97, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ref = torch.randn(N, H, generator=g)
    return ref + 0.4 * torch.randn(N, H, generator=g), ref, torch.randint(0, V, (N,), generator=g)


def _float64(h: torch.Tensor, ref: torch.Tensor, y: torch.Tensor, head: TransformedHead, reg: str,
             barrier: KLBarrier) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """Loss, per-token KL and ``∂loss/∂h`` in float64, every step written out."""
    h64 = h.detach().double().requires_grad_()
    W, b, t = head.proj.weight.double(), head.proj.bias.double(), head.transform

    def logits(x: torch.Tensor) -> torch.Tensor:
        z = (x @ W.T + b) * t.scale
        return torch.tanh(z / t.softcap) * t.softcap if t.softcap else z

    logp, logq = F.log_softmax(logits(h64), -1), F.log_softmax(logits(ref.double()), -1)
    a, b_ = (logp, logq) if reg == "kl_rev" else (logq, logp)
    kl = (a.exp() * (a - b_)).sum(-1)
    nll = -logp.gather(-1, y[:, None]).squeeze(-1)
    D = aggregate(kl, barrier.agg, barrier.eps) if barrier.agg != "rmse" else torch.sqrt(kl.square().mean() + 1e-8)
    loss = nll.mean() + barrier.lam * torch.relu(D - barrier.tau)
    loss.backward()
    return loss.detach(), kl.detach(), h64.grad


def _run(h0: torch.Tensor, ref: torch.Tensor, y: torch.Tensor, head: TransformedHead, barrier: KLBarrier,
         plan: KLGradPlan, extra: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    h = h0.clone().requires_grad_()
    stats = token_stats(h, ref, y, head=head, reg=barrier.reg, chunk_size=32, plan=plan)
    loss = stats.nll.mean() + barrier(stats.kl).value + extra * stats.kl.mean()
    loss.backward()
    return loss.detach(), stats.kl.detach(), h.grad


@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("tau", ["open", "closed"])
@pytest.mark.parametrize("agg", ["mean", "rmse", "p95", "max"])
@pytest.mark.parametrize("reg", ["kl_rev", "kl_fwd"])
def test_lazy_equals_eager_and_float64(reg: str, agg: str, tau: str, transform: str) -> None:
    h, ref, y = _rows()
    head = _head(TRANSFORMS[transform])
    barrier = KLBarrier(reg=reg, agg=agg, tau=0.0 if tau == "open" else 50.0, lam=2.0)  # type: ignore[arg-type]
    loss64, kl64, grad64 = _float64(h, ref, y, head, reg, barrier)
    lazy = _run(h, ref, y, head, barrier, KLGradPlan())  # a fresh plan takes the lazy path
    eager = _run(h, ref, y, head, barrier, KLGradPlan(lazy=False))
    assert (float(barrier(lazy[1]).fired) == 1.0) == (tau == "open")
    for loss, kl, grad in (lazy, eager):
        torch.testing.assert_close(loss.double(), loss64, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(kl.double(), kl64, rtol=1e-5, atol=2e-6)
        torch.testing.assert_close(grad.double(), grad64, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(lazy[2], eager[2], rtol=1e-5, atol=1e-7)


def test_a_kl_gradient_from_outside_the_hinge_takes_the_exact_path() -> None:
    """The lazy backward decides on the gradient it receives, not on the plan: a closed hinge plus another use of
    the KL in the loss still gets the KL's gradient."""
    h, ref, y = _rows()
    head = _head(TRANSFORMS["plain"])
    closed = KLBarrier(tau=50.0)
    lazy, eager = (_run(h, ref, y, head, closed, KLGradPlan(lazy), extra=0.3) for lazy in (True, False))
    torch.testing.assert_close(lazy[2], eager[2], rtol=1e-5, atol=1e-7)
    plain = _run(h, ref, y, head, closed, KLGradPlan(lazy=False))
    assert not torch.allclose(lazy[2], plain[2], rtol=1e-3, atol=0), "the extra KL term must move the gradient"


def test_the_plan_follows_the_last_step_and_a_closed_backward_runs_no_head(monkeypatch: pytest.MonkeyPatch) -> None:
    h, ref, y = _rows()
    head = _head(TRANSFORMS["plain"])
    paths: list[str] = []
    recomputed: list[str] = []
    for name in ("LazyHeadStats", "FusedHeadStats"):
        original = getattr(kl_module, name).apply

        def apply(*args: object, _name: str = name, _orig: object = original) -> object:
            paths.append(_name)
            return _orig(*args)  # type: ignore[operator]

        monkeypatch.setattr(getattr(kl_module, name), "apply", apply)
    original_stats = lazy_head.head_stats
    monkeypatch.setattr(lazy_head, "head_stats",
                        lambda *a, **k: recomputed.append(k["grads"]) or original_stats(*a, **k))  # fmt: skip
    plan = KLGradPlan()
    for tau in (50.0, 50.0, 50.0, 0.0, 0.0, 50.0, 50.0):  # closed × 3, opens, open, closes, closed
        recomputed.clear()
        _run(h, ref, y, head, KLBarrier(tau=tau), plan)
        chunks = -(-h.shape[0] // 32)
        if paths[-1] == "LazyHeadStats":  # forward: one "nll" pass per chunk; backward: "both" only when open
            assert recomputed == ["nll"] * chunks + (["both"] * chunks if tau == 0.0 else [])
    lazy_steps = [p for p in paths if p == "LazyHeadStats"]
    assert paths == [*["LazyHeadStats"] * 4, *["FusedHeadStats"] * chunks * 2, "LazyHeadStats"]
    assert len(lazy_steps) == 5


def _cheaper_by_hand(history: list[bool], closed: int, opened: int, eager: int) -> bool:
    """The eager path is the cheaper bet for the step after ``history`` (each entry: that step fired), with
    ``P(fire)`` counted from the history directly: steps after one in the last step's state, prior 1 after a
    firing and 0 after a closed step, over their number + 1."""
    if not history:
        return False
    last = history[-1]
    after = [b for a, b in zip(history, history[1:], strict=False) if a == last]
    p = (sum(after) + last) / (len(after) + 1)
    return eager < (1 - p) * closed + p * opened


@pytest.mark.parametrize("cached", [False, True])
def test_the_plan_takes_the_cheaper_bet_on_the_runs_record(cached: bool) -> None:
    closed, opened, eager = (2, 5, 4) if cached else (3, 6, 4)  # units of the module docstring's table
    g = torch.Generator().manual_seed(3)
    patterns = {"isolated": [i % 10 == 9 for i in range(40)], "always": [True] * 20, "never": [False] * 20,
                "bursts": [i % 8 in (3, 4, 5) for i in range(40)],
                "random": (torch.rand(60, generator=g) < 0.5).tolist()}  # fmt: skip
    for name, fired in patterns.items():
        plan, history, paths = KLGradPlan(), [], []
        for step_fired in fired:
            paths.append(plan.eager(lazy_head.FUSED_CACHED if cached else lazy_head.FUSED))
            assert paths[-1] == _cheaper_by_hand(history, closed, opened, eager), (name, len(history))
            plan.note(step_fired)
            history.append(step_fired)
        if name == "isolated":  # eager after the first opening(s) only, then lazy after every one
            learned = 1 if cached else 2
            assert [i for i, e in enumerate(paths) if e] == [10 * k for k in range(1, learned + 1)]
        if name == "always":
            assert paths == [False] + [True] * 19
        if name == "never":
            assert not any(paths)


def test_the_plans_record_survives_a_checkpoint() -> None:
    fired = [i % 5 == 4 for i in range(30)]
    whole, first = KLGradPlan(), KLGradPlan()
    paths = []
    for f in fired:
        paths.append(whole.eager())
        whole.note(f)
    for f in fired[:17]:
        first.eager()
        first.note(f)
    resumed = KLGradPlan()
    resumed.load_state_dict(copy.deepcopy(first.state_dict()))
    rest = []
    for f in fired[17:]:
        rest.append(resumed.eager())
        resumed.note(f)
    assert rest == paths[17:] and resumed.state_dict() == whole.state_dict()
    legacy = KLGradPlan()
    legacy.load_state_dict({"lazy": True, "fired": True})  # a checkpoint from before the record was kept
    assert legacy.eager() and legacy.state_dict()["seen"] == [[0, 0], [0, 0]]


def _perturbed(model: str, barrier: KLBarrier, ref_cache: bool) -> HealModule:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # the adapter's A
        module = HealModule(model=model, barrier=barrier, ref_cache=ref_cache)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return module


def _module_run(module: HealModule, plan: KLGradPlan, steps: int = 6) -> tuple[list[dict], dict[str, torch.Tensor]]:
    module.kl_grad_plan = plan
    opt = torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=0.5)
    batches = [make_batch(seed=s) for s in (0, 1)]
    logged = []
    for step in range(steps):
        loss, scalars, _ = module.loss_terms(batches[step % 2])
        loss.backward()
        opt.step()
        opt.zero_grad()
        logged.append({k: float(v) for k, v in scalars.items()})
    return logged, {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}


def _assert_same_run(lazy: tuple[list[dict], dict], eager: tuple[list[dict], dict]) -> None:
    fired = [row["barrier_fired"] for row in lazy[0]]
    assert 0.0 in fired and 1.0 in fired, f"the run must open and close the hinge, fired {fired}"
    for a, b in zip(lazy[0], eager[0], strict=True):
        assert a.keys() == b.keys() and a["barrier_fired"] == b["barrier_fired"]
        for k in a:  # the eager KL sums along V by float32 dot products, the lazy one by pairwise summation
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-5), k
    for name, p in lazy[1].items():
        torch.testing.assert_close(p, eager[1][name], rtol=1e-5, atol=1e-6, msg=name)


def _tau_between(model: str, agg: str, reg: str) -> float:
    """Halfway between the middle aggregates of a lam = 0 run: a tau the barrier crosses on some steps and not on
    others, and far from every D that run saw (a D within float32 rounding of tau could fire on one path only)."""
    probe = _perturbed(model, KLBarrier(reg=reg, agg=agg, lam=0.0), False)  # type: ignore[arg-type]
    logged, _ = _module_run(probe, KLGradPlan(lazy=False))
    D = sorted(row["D"] for row in logged)
    return (D[2] + D[3]) / 2


@pytest.mark.slow  # 32 runs of 6 steps (~1 min)
@pytest.mark.parametrize("ref_cache", [False, True])
@pytest.mark.parametrize("agg", ["mean", "rmse", "p95", "max"])
@pytest.mark.parametrize("reg", ["kl_rev", "kl_fwd"])
@pytest.mark.parametrize("model", ["tiny-llama", "tiny-gemma2"])
def test_heal_module_runs_equal_the_eager_path(
    model: str, reg: str, agg: str, ref_cache: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With ``ref_cache`` the lazy kl_rev steps read the KL from the cached LSE (``cached_ref_chunk``); gemma2's
    soft-capped head and kl_fwd keep the ref's head product."""
    barrier = KLBarrier(reg=reg, agg=agg, tau=_tau_between(model, agg, reg), lam=3.0)  # type: ignore[arg-type]
    identity: list[int] = []
    original = lazy_head.cached_ref_chunk
    monkeypatch.setattr(lazy_head, "cached_ref_chunk", lambda *a: identity.append(1) or original(*a))
    lazy = _module_run(_perturbed(model, barrier, ref_cache), KLGradPlan())
    assert bool(identity) == (ref_cache and reg == "kl_rev" and model == "tiny-llama")
    eager = _module_run(_perturbed(model, barrier, ref_cache), KLGradPlan(lazy=False))
    _assert_same_run(lazy, eager)


@pytest.mark.slow  # 8 runs of 6 steps
@pytest.mark.parametrize("agg", ["mean", "rmse", "p95", "max"])
@pytest.mark.parametrize("reg", ["kl_rev", "kl_fwd"])
def test_callback_runs_equal_the_eager_path(reg: str, agg: str) -> None:
    barrier = KLBarrier(reg=reg, agg=agg, tau=_tau_between("tiny-llama", agg, reg), lam=3.0)  # type: ignore[arg-type]
    runs = []
    for lazy in (True, False):
        heal = _perturbed("tiny-llama", barrier, False)
        callback = KLBarrierCallback(barrier)
        callback.setup(None, heal, "fit")  # type: ignore[arg-type]
        callback.kl_grad_plan = KLGradPlan(lazy)
        opt = torch.optim.SGD([p for p in heal.parameters() if p.requires_grad], lr=0.5)
        logged = []
        try:
            for step in range(6):
                batch = make_batch(seed=step % 2)
                out = heal.student(**batch)
                value, scalars = callback.compute(batch, out.logits)
                (out.loss + value).backward()
                opt.step()
                opt.zero_grad()
                logged.append({k: float(v) for k, v in scalars.items() if k != "_kl"})
        finally:
            callback.teardown(None, heal, "fit")  # type: ignore[arg-type]
        runs.append((logged, {n: copy.deepcopy(p.detach()) for n, p in heal.named_parameters() if p.requires_grad}))
    _assert_same_run(*runs)


@pytest.mark.parametrize("family", ["llama", "cohere", "granite"])  # cohere: logit_scale; granite: logits_scaling
def test_the_cached_lse_identity_against_float64(family: str) -> None:
    """``KL_t = LSE(z_q) − LSE(z) − s (r − h) · Wᵀp`` from the ref's rows and cached LSE, against the KL written out
    in float64 from the model's own logits; the same loss gradient where the hinge is closed and where it opens."""
    from heal_pl.models.lm import LMHead, last_hidden
    from heal_pl.models.load import tiny_model

    model = tiny_model(family).requires_grad_(False)  # type: ignore[arg-type]
    head = LMHead(model)
    assert family == "llama" or head.transform.scale != 1.0
    batch = make_batch(vocab=model.config.vocab_size)
    with torch.no_grad():
        ref = last_hidden(model, batch["input_ids"], batch["attention_mask"]).flatten(0, 1)
        own = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.flatten(0, 1)
    g = torch.Generator().manual_seed(0)
    h0 = ref + 0.3 * ref.std() * torch.randn(ref.shape, generator=g)
    y = torch.randint(0, model.config.vocab_size, (ref.shape[0],), generator=g)
    out: list[torch.Tensor] = []
    token_stats(h0.clone().requires_grad_(), ref, y, head=head, plan=KLGradPlan(), lse_out=out)
    lse = out[0]
    torch.testing.assert_close(lse, torch.logsumexp(own.float(), -1), rtol=1e-6, atol=1e-5)  # the model's own
    logits64 = (lambda x: head.transform(x.double() @ head.proj.weight.double().T))  # noqa: E731
    logq = torch.log_softmax(own.double(), -1)
    for tau in (50.0, 0.0):
        barrier = KLBarrier(agg="rmse", tau=tau, lam=2.0)  # smooth: p95's token could swap with a float32 tie
        h = h0.clone().requires_grad_()
        stats = token_stats(h, ref, y, head=head, plan=KLGradPlan(), ref_lse=lse)
        (stats.nll.mean() + barrier(stats.kl).value).backward()
        h64 = h0.double().requires_grad_()
        logp = torch.log_softmax(logits64(h64), -1)
        kl64 = (logp.exp() * (logp - logq)).sum(-1)
        nll64 = -logp.gather(-1, y[:, None]).squeeze(-1)
        (nll64.mean() + 2.0 * torch.relu(torch.sqrt(kl64.square().mean() + 1e-8) - tau)).backward()
        torch.testing.assert_close(stats.kl.double(), kl64.detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(h.grad.double(), h64.grad, rtol=1e-4, atol=1e-6)
