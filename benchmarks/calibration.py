"""Iso-KL calibration on SmolLM2: evaluations to converge, and batched ÷ one-prompt-at-a-time measurement.

    python benchmarks/calibration.py --targets 0.5 1 2 --tokens 64

1. Evaluations: a mean_diff vector (pirate vs plain assistant, mid depth) is calibrated for each target
   (p95 nats) and both signs on 8 questions × 32 tokens; the table gives c*, converged and the number of
   trajectory measurements each search needed, and their median (target: ≤ 4), for the default search
   (extrapolated bracketing, ``prior_slope=2``) and, side by side, the doubling search of docs/maths.md §3.4
   (``prior_slope=None``). Greedy trajectories are deterministic, so a coefficient measured by both
   searches is measured once and reused (each search still counts it as one of its evaluations).
2. Measurement time: ``measure_kl`` of 8 prompts × ``--tokens`` tokens at a fixed coefficient, batched
   (batch 8, left padding) vs one prompt at a time (batch 1), alternated ``--repeats`` times in one process
   (``--repeats 0`` skips it).
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from typing import Any

import torch

import heal_pl.steering.isokl as isokl
from heal_pl.data.prompts import NEUTRAL, PIRATE, chat_prompt, questions
from heal_pl.models.load import load_model, load_tokenizer
from heal_pl.steering import SteeringVector
from heal_pl.steering.calibrate import calibrate
from heal_pl.steering.isokl import calibrate_method
from heal_pl.steering.trajectory import measure_kl


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--targets", type=float, nargs="+", default=[0.5, 1.0, 2.0])
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2)
    a = p.parse_args()
    torch.manual_seed(0)
    tok, model = load_tokenizer(a.model), load_model(a.model)
    qs = questions(32)
    pos = [chat_prompt(tok, q, PIRATE) for q in qs[:16]]
    neg = [chat_prompt(tok, q, NEUTRAL) for q in qs[:16]]
    vector = SteeringVector.fit(model, tok, pos, neg, method="mean_diff", layers=0.5)
    prompts = [chat_prompt(tok, q, None) for q in qs[16:24]]

    searches = {"extrapolated": calibrate, "doubling": functools.partial(calibrate, prior_slope=None)}
    cache: dict[tuple, Any] = {}

    def cached_measure_kl(*args: Any, **kwargs: Any) -> Any:  # (model, tok, texts, method, coeff, ...)
        key = (tuple(args[2]), *args[4:], *sorted(kwargs.items()))
        if key not in cache:
            cache[key] = measure_kl(*args, **kwargs)
        return cache[key]

    isokl.measure_kl = cached_measure_kl
    rows, evals = [], {name: [] for name in searches}
    with torch.no_grad():
        for target in a.targets:
            for sign in (1, -1):
                for name, search in searches.items():
                    isokl.calibrate = search
                    r = calibrate_method(model, tok, vector, prompts, target=target, bracket=(0.5, 128.0), sign=sign,
                                         max_iters=10, max_new_tokens=32)  # fmt: skip
                    evals[name].append(r["evaluations"])
                    path = " → ".join(f"{h['c']:.3g}:{h['p95']:.2f}" for h in r["history"])
                    rows.append(f"| {target} | {'+' if sign > 0 else '-'} | {name} | {r['c_star']:.3g} | "
                                f"{r['stat_star']:.3f} | {r['converged']} | {r['evaluations']} | {path} |")  # fmt: skip
        isokl.calibrate, isokl.measure_kl = calibrate, measure_kl
        times: dict[int, list[float]] = {8: [], 1: []}
        for _ in range(a.repeats):
            for bs in times:
                t0 = time.perf_counter()
                measure_kl(model, tok, prompts, vector, 20.0, max_new_tokens=a.tokens, batch_size=bs, eos_token_id=[])
                times[bs].append(time.perf_counter() - t0)

    print(f"model={a.model} threads={torch.get_num_threads()}")
    print("| target p95 | sign | search | c* | p95 at c* | converged | evaluations | c:p95 of each evaluation |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    for name, counts in evals.items():
        print(f"{name}: median evaluations {statistics.median(counts)}, total {sum(counts)}")
    if a.repeats:
        one, batched = statistics.median(times[1]), statistics.median(times[8])
        print(f"\n| measure_kl, 8 prompts × {a.tokens} tokens | seconds |\n|---|---|")
        print(f"| one prompt at a time | {one:.2f} |\n| batched (8) | {batched:.2f} |")
        print(f"| speed-up | {one / batched:.2f}× |")


if __name__ == "__main__":
    main()
