"""Step time of SFT + KL barrier ÷ SFT alone, every arm side by side in one process.

    OMP_NUM_THREADS=2 python benchmarks/barrier_cost.py --batch 8 --seq 256 --steps 5
    python benchmarks/barrier_cost.py --device cuda --dtype bfloat16 --batch 8 --seq 512     # on a GPU

Every arm runs HealModule's own loss (forward, backward, AdamW step) on the same random-token batch
(completion = the last 3/4 of each row); the arms alternate step by step so machine noise hits all of them,
and each is timed ``--steps`` times after one warm-up step (min / median / max):

- ``sft``: no barrier (``reg: nll``), the adapter on every block;
- ``barrier``: SFT + the rmse barrier: one no-grad forward of the base (adapter off) and the exact KL through the
  LM head;
- ``barrier + ref_cache (epoch ≥ 2)``: the same with :mod:`heal_pl.barrier.ref_cache` filled by the warm-up step, as in
  every epoch after the first: the ref's rows are read, not computed;
- ``sft [lo, hi]`` / ``barrier [lo, hi]``: the adapter on blocks ``[lo·L, hi·L)`` only (``--layers``, the seeds'
  ``[0.2, 0.8]``), the barrier with the shared prefix (:mod:`heal_pl.barrier.shared_prefix`: the ref starts at the first
  adapted block) and, for comparison, without it.

The last row times the ref's no-grad backbone forward alone: ``1 + ref ÷ sft`` is the floor of the barrier's
ratio when the ref is recomputed. ``--head-only`` times just the loss from fixed hidden rows (the head,
log-softmaxes, KL and row gradients, forward + backward) on the same counted rows.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from heal_pl.adapters.lora import LoRASpec
from heal_pl.adapters.switch import ref_rows
from heal_pl.barrier.kl import KLBarrier, counted_positions, token_stats
from heal_pl.barrier.ref_cache import RefRowCache
from heal_pl.barrier.shared_prefix import SharedPrefix
from heal_pl.hardware import resolve_device
from heal_pl.module import HealModule


def _step(module: HealModule, batch: dict[str, torch.Tensor], opt: torch.optim.Optimizer) -> Callable[[], None]:
    def run() -> None:
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
        rows = ref_rows(full.student, ids, batch["attention_mask"], counted)
        student_rows = (rows + 0.05 * torch.randn_like(rows)).requires_grad_()

        def head_pass(b: KLBarrier) -> Callable[[], None]:
            def run() -> None:
                stats = token_stats(student_rows, rows if b.active else None, counted.targets, head=full.head,
                                    reg=b.reg, chunk_size=full.hparams.chunk_size)  # fmt: skip
                (stats.nll.mean() + b(stats.kl).value).backward()
                student_rows.grad = None
                _sync(device)

            return run

        arms = {"sft (head only)": head_pass(sft_only), "barrier (head only)": head_pass(barrier)}
    elif a.two_arms:
        sft_full = make(barrier=sft_only)
        arms = {name: _step(m, batch, _optimizer(m)) for name, m in {"sft": sft_full, "barrier": full}.items()}
    else:
        sft_full = make(barrier=sft_only)
        cached = make(barrier=barrier)
        cached.ref_cache = RefRowCache()
        layers = tuple(a.layers)
        sft_part = make(barrier=sft_only, lora=LoRASpec(layers=layers))
        shared = make(barrier=barrier, lora=LoRASpec(layers=layers))
        unshared = make(barrier=barrier, lora=LoRASpec(layers=layers))
        unshared.shared_prefix = SharedPrefix(unshared.student, 0)
        span = f"[{layers[0]}, {layers[1]}]"
        modules = {
            "sft": sft_full, "barrier": full, "barrier + ref_cache (epoch ≥ 2)": cached,
            f"sft {span}": sft_part, f"barrier {span}, shared prefix (from block {shared.shared_prefix.lo})": shared,
            f"barrier {span}, no sharing": unshared,
        }  # fmt: skip
        arms = {name: _step(m, batch, _optimizer(m)) for name, m in modules.items()}

        def ref_only() -> None:
            ref_rows(full.student, ids, batch["attention_mask"], counted)
            _sync(device)

        arms["ref forward only (no grad, adapter off)"] = ref_only

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
    base = {"": statistics.median(times[next(iter(arms))])}
    for name, ts in times.items():
        if name.startswith("sft ["):
            base[name.removeprefix("sft ")] = statistics.median(ts)
        span = next((s for s in base if s and s in name), "")
        ratio = statistics.median(ts) / base[span]
        print(f"| {name} | {min(ts):.2f} | {statistics.median(ts):.2f} | {max(ts):.2f} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
