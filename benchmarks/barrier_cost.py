"""Step time of SFT + KL barrier ÷ SFT alone, side by side in one process.

    python benchmarks/barrier_cost.py --batch 8 --seq 256 --steps 2 --before 6a79050
    python benchmarks/barrier_cost.py --device cuda --dtype bfloat16 --batch 8 --seq 512   # on a GPU

Both arms run HealModule's own loss (forward, backward, AdamW step) on the same random-token batch
(completion = the last 3/4 of each row); they alternate step by step so machine noise hits both.
The barrier adds one no-grad forward of the base (adapter off) and the chunked KL through the LM head.

``--before REV`` adds the same two arms with ``heal_pl/kl.py`` and ``heal_pl/fused_head.py`` as they
were at git revision ``REV`` (loaded from ``git show``), so an optimisation is measured against the
code it replaced in the same run. The last row times the ref's no-grad backbone forward alone:
``1 + ref forward ÷ sft`` is the floor of the ratio for this step (no head, no KL).
``--head-only`` times just the loss from fixed hidden rows (the head, log-softmaxes, KL and row
gradients, forward + backward) on the same counted rows, to see the head's share without the backbone.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import heal_pl.module as module_py
from heal_pl.hardware import resolve_device
from heal_pl.kl import KLBarrier, counted_positions, token_stats
from heal_pl.lm import ref_rows
from heal_pl.module import HealModule

ROOT = Path(__file__).resolve().parents[1]


def load_old_token_stats(rev: str) -> Callable[..., object]:
    """``token_stats`` of ``heal_pl/kl.py`` at ``rev``, importing that revision's ``fused_head.py``."""

    def source(path: str) -> str:
        return subprocess.run(["git", "show", f"{rev}:{path}"], cwd=ROOT, check=True, capture_output=True,
                              text=True).stdout  # fmt: skip

    fused = types.ModuleType("heal_pl.fused_head")
    exec(compile(source("heal_pl/fused_head.py"), f"{rev}:heal_pl/fused_head.py", "exec"), fused.__dict__)
    current = sys.modules["heal_pl.fused_head"]
    sys.modules["heal_pl.fused_head"] = fused  # the old kl.py imports the old fused head
    try:
        kl = sys.modules["heal_pl.kl_before"] = types.ModuleType("heal_pl.kl_before")  # dataclasses look it up
        exec(compile(source("heal_pl/kl.py"), f"{rev}:heal_pl/kl.py", "exec"), kl.__dict__)
    finally:
        sys.modules["heal_pl.fused_head"] = current
    return kl.token_stats


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--agg", default="rmse")
    p.add_argument("--before", default=None, help="git revision of kl.py / fused_head.py to compare against")
    p.add_argument("--head-only", action="store_true", help="time only the loss from hidden rows (head + KL)")
    p.add_argument("--device", default="cpu", help="auto | cpu | cuda | cuda:N (heal_pl.hardware)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="base weights")
    a = p.parse_args()

    torch.manual_seed(0)
    device = resolve_device(a.device)
    module = HealModule(model=a.model, barrier=KLBarrier(agg=a.agg, tau=0.0), dtype=a.dtype).to(device)
    vocab = module.head.proj.weight.shape[0]
    ids = torch.randint(0, vocab, (a.batch, a.seq), device=device)
    labels = ids.clone()
    labels[:, : a.seq // 4] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-5)
    barriers = {"sft": KLBarrier(reg="nll"), f"sft+{a.agg}": KLBarrier(agg=a.agg, tau=0.0)}
    impls = {"": token_stats}
    if a.before:
        impls = {f" ({a.before})": load_old_token_stats(a.before), " (now)": token_stats}
    arms = [(name + tag, barrier, fn) for tag, fn in impls.items() for name, barrier in barriers.items()]
    times: dict[str, list[float]] = {name: [] for name, _, _ in arms}
    times["ref forward only"] = []
    counted = counted_positions(labels, batch["attention_mask"])
    rows = ref_rows(module.student, ids, batch["attention_mask"], counted)  # real hidden rows for --head-only
    student_rows = (rows + 0.05 * torch.randn_like(rows)).requires_grad_()

    def step_fn(barrier: KLBarrier, fn: Callable[..., Any]) -> None:
        if a.head_only:  # the loss from hidden rows: LM head, log-softmax, KL, row gradients
            stats = fn(student_rows, rows if barrier.active else None, counted.targets,
                       head=module.head, reg=barrier.reg, chunk_size=module.hparams.chunk_size)  # fmt: skip
            (stats.nll.mean() + barrier(stats.kl).value).backward()
            student_rows.grad = None
            return
        module.barrier = barrier
        module_py.token_stats = fn
        loss, _, _ = module.loss_terms(batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for step in range(a.steps + 1):  # step 0 warms up
        for name, barrier, fn in arms:
            sync()
            t0 = time.perf_counter()
            step_fn(barrier, fn)
            sync()
            if step:
                times[name].append(time.perf_counter() - t0)
        if not a.head_only:
            t0 = time.perf_counter()
            ref_rows(module.student, ids, batch["attention_mask"], counted)
            sync()
            if step:
                times["ref forward only"].append(time.perf_counter() - t0)
    module_py.token_stats = token_stats
    print(f"model={a.model} device={device} dtype={a.dtype} batch={a.batch}x{a.seq} "
          f"counted rows={counted.targets.numel()} head_only={a.head_only} "
          f"threads={torch.get_num_threads()} steps={a.steps} (median of each)")  # fmt: skip
    first = list(impls)[0]
    print(f"| arm | median (s) | ÷ its sft | ÷ the same arm{first or ''} |\n|---|---|---|---|")
    for tag in impls:
        base = statistics.median(times["sft" + tag])
        for name in barriers:
            t = statistics.median(times[name + tag])
            print(f"| {name + tag} | {t:.2f} | {t / base:.2f} | {t / statistics.median(times[name + first]):.2f} |")
    if a.head_only:
        return
    ref = statistics.median(times["ref forward only"])
    base = statistics.median(times["sft" + list(impls)[-1]])
    floor = f"floor 1 + {ref:.2f}/{base:.2f} = {1 + ref / base:.2f}"
    print(f"| ref forward only (no grad, adapter off) | {ref:.2f} | {floor} | |")


if __name__ == "__main__":
    main()
