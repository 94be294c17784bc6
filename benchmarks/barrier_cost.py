"""Step time of SFT + KL barrier ÷ SFT alone, side by side in one process.

    python benchmarks/barrier_cost.py --batch 8 --seq 256 --steps 5

Both arms run HealModule's own loss (forward, backward, AdamW step) on the same random-token batch
(completion = the last 3/4 of each row); they alternate step by step so machine noise hits both.
The barrier adds one no-grad forward of the base (adapter off) and the chunked KL; the floor is
≈ 1.33 (one extra forward on top of forward + backward ≈ 3 forwards).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from heal_pl.kl import KLBarrier
from heal_pl.module import HealModule


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--agg", default="rmse")
    a = p.parse_args()

    torch.manual_seed(0)
    module = HealModule(model=a.model, barrier=KLBarrier(agg=a.agg, tau=0.0))
    vocab = module.head.proj.weight.shape[0]
    ids = torch.randint(0, vocab, (a.batch, a.seq))
    labels = ids.clone()
    labels[:, : a.seq // 4] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-5)
    arms = {"sft": KLBarrier(reg="nll"), f"sft+{a.agg}": KLBarrier(agg=a.agg, tau=0.0)}
    times: dict[str, list[float]] = {name: [] for name in arms}
    for step in range(a.steps + 1):  # step 0 warms up
        for name, barrier in arms.items():
            module.barrier = barrier
            t0 = time.perf_counter()
            loss, _, _ = module.loss_terms(batch)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if step:
                times[name].append(time.perf_counter() - t0)
    base = statistics.median(times["sft"])
    print(f"model={a.model} batch={a.batch}x{a.seq} threads={torch.get_num_threads()} steps={a.steps}")
    print("| arm | median step (s) | ÷ sft |\n|---|---|---|")
    for name, ts in times.items():
        print(f"| {name} | {statistics.median(ts):.2f} | {statistics.median(ts) / base:.2f} |")


if __name__ == "__main__":
    main()
