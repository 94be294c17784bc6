"""Step time of SFT + KL barrier ÷ SFT alone, every arm side by side in one process.

    OMP_NUM_THREADS=2 python benchmarks/barrier_cost.py --batch 8 --seq 256 --steps 5
    python benchmarks/barrier_cost.py --device cuda --dtype bfloat16 --batch 8 --seq 512     # on a GPU

Every arm runs HealModule's own loss (forward, backward, AdamW step) on the same random-token batch
(completion = the last 3/4 of each row); the arms alternate step by step so machine noise hits all of them,
and each is timed ``--steps`` times after one warm-up step (min / median / max). The barrier's path
(:mod:`heal_pl.barrier.lazy_head`) is set per arm:

- ``today``: the eager path (the KL's row gradients taken in every forward, ``KLGradPlan(lazy=False)``);
- ``lazy``: the default plan. ``closed`` arms run with ``tau`` above any KL (0 % fired), ``fired`` arms with
  ``tau = 0``: ``lazy, fired`` is the steady state of a run firing on every step (the plan takes the eager path
  after a fired step), ``lazy, fired after a closed step`` the step where the hinge opens unforeseen (a fresh plan
  each step: the KL's gradient recomputed in the backward pass);
- each for epoch 1 (the ref's forward run) and epoch ≥ 2 (``ref_cache`` filled by the warm-up step), with the
  adapter on every block, and on blocks ``[lo·L, hi·L)`` (``--layers``) with the shared prefix;
- ``floor``: the ref's no-grad forward through the head at the counted rows (what an exact KL needs at least once
  per example), timed as one arm: 1 + floor ÷ SFT is the least a barrier step can cost in epoch 1; ``floor step``:
  SFT's step followed by that forward, as one arm (the same least cost, read with a step's noise); ``floor, cached
  rows``: the ref's head pass alone from cached rows, for epoch ≥ 2.

The 10 % lines compose the measured steps of a run of 100 steps whose hinge opens on every tenth, the path of
each step taken by :class:`KLGradPlan` itself (:func:`_plan_mix`): lazy closed, eager closed (``today, closed``),
an unforeseen opening (``fired after a closed step``) or a foreseen one (``today, fired``). The plan goes eager
after the first opening(s) and learns that they are isolated; the line "eager after every opening" is the plan
before 2026-12-07 (``(opening + today closed + 8 × lazy closed) / 10``).
``--only 'epoch ≥ 2' floor`` times the arms whose name contains one of the strings (and sft: more repeats of a few
arms in the same time); ``--two-arms`` times only sft and the default barrier (the scaling table); ``--head-only``
times just the loss from fixed hidden rows (head, log-softmaxes, KL and row gradients, forward + backward) on each
path, without the backbone's noise.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from heal_pl.adapters.lora import LoRASpec
from heal_pl.adapters.switch import ref_rows
from heal_pl.barrier.kl import Counted, KLBarrier, counted_positions, token_stats
from heal_pl.barrier.lazy_head import FUSED, FUSED_CACHED, KLGradPlan
from heal_pl.hardware import resolve_device
from heal_pl.module import HealModule


def _step(module: HealModule, batch: dict[str, torch.Tensor], opt: torch.optim.Optimizer,
          fresh_plan: bool = False) -> Callable[[], None]:  # fmt: skip
    def run() -> None:
        if fresh_plan:  # the step after a closed one: the plan takes the lazy path
            module.kl_grad_plan = KLGradPlan()
        loss, _, _ = module.loss_terms(batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(loss.device)

    return run


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _optimizer(module: HealModule) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-5)


def _plan_mix(cached: bool, steps: int = 100, every: int = 10) -> dict[str, float]:
    """The share of each kind of step in a run whose hinge opens on one step in ``every``, the path of each chosen
    by :class:`KLGradPlan` (keys: the arm kinds of :func:`_lazy_arms`)."""
    kind = {(False, False): "lazy, closed", (True, False): "today, closed",
            (False, True): "lazy, fired after a closed step", (True, True): "today, fired"}  # (eager, fired)
    plan, mix = KLGradPlan(), dict.fromkeys(kind.values(), 0.0)
    for i in range(steps):
        fired = i % every == every - 1
        mix[kind[plan.eager(FUSED_CACHED if cached else FUSED), fired]] += 1 / steps
        plan.note(fired)
    return mix


def _head_arms(a: argparse.Namespace, full: HealModule, counted: Counted, batch: dict[str, torch.Tensor],
               device: torch.device) -> dict[str, Callable[[], None]]:  # fmt: skip
    """``--head-only``: the loss from fixed hidden rows (the ref's, and the student's = the ref's + noise), forward
    and backward, per path of :mod:`heal_pl.barrier.lazy_head`; the backbone is left out, so the head's own costs
    show without its noise."""
    rows = ref_rows(full.student, batch["input_ids"], batch["attention_mask"], counted)
    student_rows = (rows + 0.05 * torch.randn_like(rows)).requires_grad_()
    chunk, targets = full.chunk_rows(), counted.targets
    out: list[torch.Tensor] = []
    token_stats(student_rows, rows, targets, head=full.head, chunk_size=chunk, plan=KLGradPlan(), lse_out=out)
    lse = out[0]

    def head_pass(b: KLBarrier, lazy: bool = True, cached: bool = False) -> Callable[[], None]:
        def run() -> None:
            stats = token_stats(student_rows, rows if b.active else None, targets, head=full.head, reg=b.reg,
                                chunk_size=chunk, plan=KLGradPlan(lazy), ref_lse=lse if cached else None)  # fmt: skip
            (stats.nll.mean() + b(stats.kl).value).backward()
            student_rows.grad = None
            _sync(device)

        return run

    def ref_head() -> None:
        with torch.no_grad():
            token_stats(rows, None, targets, head=full.head, reg="nll", chunk_size=chunk)
        _sync(device)

    closed, fired = KLBarrier(agg=a.agg, tau=1e9), KLBarrier(agg=a.agg, tau=0.0)
    return {"sft": head_pass(KLBarrier(reg="nll")), "today, closed": head_pass(closed, lazy=False),
            "lazy, closed": head_pass(closed), "lazy, closed, cached LSE (epoch ≥ 2)": head_pass(closed, cached=True),
            "today, fired": head_pass(fired, lazy=False), "lazy, fired after a closed step": head_pass(fired),
            "floor: the ref's head alone (no grad)": ref_head}  # fmt: skip


def _lazy_arms(a: argparse.Namespace, make: Callable[..., HealModule], batch: dict[str, torch.Tensor],
               counted: Counted, device: torch.device) -> dict[str, Callable[[], None]]:  # fmt: skip
    """The arms of the module docstring, in the order they alternate."""
    closed, fired, sft_only = KLBarrier(agg=a.agg, tau=1e9), KLBarrier(agg=a.agg, tau=0.0), KLBarrier(reg="nll")
    span = f"[{a.layers[0]}, {a.layers[1]}]"
    kinds = (("today, closed", closed, "eager"), ("lazy, closed", closed, "lazy"), ("today, fired", fired, "eager"),
             ("lazy, fired", fired, "lazy"), ("lazy, fired after a closed step", fired, "fresh"))  # fmt: skip
    arms: dict[str, Callable[[], None]] = {}
    for suffix, lora in (("", LoRASpec()), (f" {span}", LoRASpec(layers=tuple(a.layers)))):
        sft = make(barrier=sft_only, lora=lora)
        arms[f"sft{suffix}"] = _step(sft, batch, _optimizer(sft))
        for epoch, cache in (("epoch 1", False), ("epoch ≥ 2", True)):
            for kind, barrier, plan in kinds:
                if suffix and kind in ("today, fired", "lazy, fired"):
                    continue  # the partial adapter: the closed steps and the unforeseen fired one
                if not _wanted(a, f"{kind}, {epoch}{suffix}"):
                    continue
                m = make(barrier=barrier, lora=lora, ref_cache=cache)
                m.kl_grad_plan = KLGradPlan(lazy=plan != "eager")
                arms[f"{kind}, {epoch}{suffix}"] = _step(m, batch, _optimizer(m), fresh_plan=plan == "fresh")
    ref = make(barrier=closed)
    mask, chunk = batch["attention_mask"], ref.chunk_rows()
    cached_rows = ref_rows(ref.student, batch["input_ids"], mask, counted)

    def ref_head(rows: torch.Tensor) -> None:  # the ref's logits and log-softmax at the counted rows, no grad
        with torch.no_grad():
            token_stats(rows, None, counted.targets, head=ref.head, reg="nll", chunk_size=chunk)
        _sync(device)

    def floor_step() -> None:  # the least an epoch-1 barrier step can cost, as one arm: SFT's step, then the ref
        arms["sft"]()
        ref_head(ref_rows(ref.student, batch["input_ids"], mask, counted))

    floors = {"floor: the ref's no-grad forward through the head": lambda: ref_head(
        ref_rows(ref.student, batch["input_ids"], mask, counted)),
        "floor, cached rows: the ref's head alone": lambda: ref_head(cached_rows),
        "floor step: SFT's step, then the ref's no-grad forward through the head": floor_step}  # fmt: skip
    return arms | {name: run for name, run in floors.items() if _wanted(a, name)}


def _wanted(a: argparse.Namespace, name: str) -> bool:
    """``--only``: the arms whose name contains one of its strings (the SFT arms always run: they are the base)."""
    return not a.only or name.startswith("sft") or any(part in name for part in a.only)


def _print_ten(med: dict[str, float], base: float, suffix: str, cached: bool) -> None:
    """The 10 % fired lines (module docstring), from the arms with this ``suffix`` that were measured."""
    kinds = ("lazy, closed", "today, closed", "lazy, fired after a closed step", "today, fired")
    got = {k: med.get(f"{k}{suffix}") for k in kinds}
    mix = {k: share for k, share in _plan_mix(cached).items() if share}
    if all(got[k] is not None for k in mix):
        ten = sum(share * got[k] for k, share in mix.items())
        shares = ", ".join(f"{share:.0%} {k}" for k, share in mix.items())
        print(f"| 10 % fired{suffix} (composed: {shares}) | | {ten:.2f} | | {ten / base:.2f} |")
    if None not in (got["lazy, fired after a closed step"], got["today, closed"], got["lazy, closed"]):
        old = (got["lazy, fired after a closed step"] + got["today, closed"] + 8 * got["lazy, closed"]) / 10
        print(f"| 10 % fired{suffix}, eager after every opening (composed) | | {old:.2f} | | {old / base:.2f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=5, help="timed steps per arm, after one warm-up step")
    p.add_argument("--agg", default="rmse")
    p.add_argument("--layers", type=float, nargs=2, default=(0.2, 0.8), help="depth range of the partial adapter")
    p.add_argument("--head-only", action="store_true", help="time only the loss from hidden rows (head + KL)")
    p.add_argument("--device", default="cpu", help="auto | cpu | cuda | cuda:N (heal_pl.hardware)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="base weights")
    p.add_argument("--two-arms", action="store_true", help="only sft and barrier (for the scaling table)")
    p.add_argument("--only", nargs="+", default=(), metavar="TEXT",
                   help="only the arms whose name contains one of these (and sft), e.g. 'epoch ≥ 2' floor")
    a = p.parse_args()
    if a.steps < 1:
        p.error("--steps must be >= 1")

    torch.manual_seed(0)
    device = resolve_device(a.device)

    def make(**kwargs: object) -> HealModule:
        return HealModule(model=a.model, dtype=a.dtype, **kwargs).to(device)  # type: ignore[arg-type]

    barrier, sft_only = KLBarrier(agg=a.agg, tau=0.0), KLBarrier(reg="nll")
    full = make(barrier=barrier)
    vocab = full.head.proj.weight.shape[0]
    ids = torch.randint(0, vocab, (a.batch, a.seq), device=device)
    labels = ids.clone()
    labels[:, : a.seq // 4] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    counted = counted_positions(labels, batch["attention_mask"])

    arms: dict[str, Callable[[], None]] = {}
    if a.head_only:
        arms = _head_arms(a, full, counted, batch, device)
    elif a.two_arms:
        sft_full = make(barrier=sft_only)
        arms = {name: _step(m, batch, _optimizer(m)) for name, m in {"sft": sft_full, "barrier": full}.items()}
    else:
        arms = _lazy_arms(a, make, batch, counted, device)

    times: dict[str, list[float]] = {name: [] for name in arms}
    for step in range(a.steps + 1):  # step 0 warms up (and fills the ref cache)
        for name, run in arms.items():
            t0 = time.perf_counter()
            run()
            if step:
                times[name].append(time.perf_counter() - t0)

    print(f"model={a.model} device={device} dtype={a.dtype} batch={a.batch}x{a.seq} "
          f"counted rows={counted.targets.numel()} threads={torch.get_num_threads()} "
          f"timed steps per arm={a.steps} after 1 warm-up")  # fmt: skip
    print("| arm | min (s) | median (s) | max (s) | median ÷ its sft |\n|---|---|---|---|---|")
    med = {name: statistics.median(ts) for name, ts in times.items()}
    base = {"": med[next(iter(arms))]}
    for name, ts in times.items():
        if name.startswith("sft ["):
            base[name.removeprefix("sft ")] = med[name]
        span = next((s for s in base if s and s in name), "")
        print(f"| {name} | {min(ts):.2f} | {med[name]:.2f} | {max(ts):.2f} | {med[name] / base[span]:.2f} |")
    for span in base if not (a.two_arms or a.head_only) else ():
        for epoch in ("epoch 1", "epoch ≥ 2"):
            _print_ten(med, base[span], f", {epoch}{' ' + span if span else ''}", cached=epoch != "epoch 1")
    if a.head_only:
        _print_ten(med, base[""], "", cached=False)
    for name in (n for n in med if n.startswith("floor") and not n.startswith("floor step")):  # a step: in the table
        print(f"| 1 + {name.split(':')[0]} ÷ sft | | | | {1 + med[name] / base['']:.2f} |")


if __name__ == "__main__":
    main()
