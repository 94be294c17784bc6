"""Survival forks on SmolLM2: cached (copy + crop the rollout's KV cache) ÷ recomputed from scratch.

    python benchmarks/forks.py --w 256 --step 5

One greedy rollout of ``w`` tokens (EOS ignored) under a mean_diff vector (pirate vs plain assistant,
mid depth) at ``--coeff``; a true/false probe at every ``step`` tokens. Both arms return the same pmass
(max difference printed); the time includes the rollout. Arms alternate ``--repeats`` times.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from heal_pl.calibrate_run import NEUTRAL, PIRATE, chat_prompt, questions
from heal_pl.forks import fork_probe, fork_probe_recompute
from heal_pl.models import load_model, load_tokenizer
from heal_pl.probes import answer_token_ids
from heal_pl.steering import SteeringVector

SPLICE = "\n\nIs the answer above written like a pirate? Answer true or false:"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--w", type=int, default=256)
    p.add_argument("--step", type=int, default=5)
    p.add_argument("--coeff", type=float, default=20.0)
    p.add_argument("--repeats", type=int, default=1)
    a = p.parse_args()
    tok, model = load_tokenizer(a.model), load_model(a.model)
    qs = questions(17)
    vector = SteeringVector.fit(model, tok, [chat_prompt(tok, q, PIRATE) for q in qs[:16]],
                                [chat_prompt(tok, q, NEUTRAL) for q in qs[:16]], layers=0.5)  # fmt: skip
    prompt, ids = chat_prompt(tok, qs[16], None), answer_token_ids(tok)
    arms = {"cached": fork_probe, "recomputed": fork_probe_recompute}
    times: dict[str, list[float]] = {k: [] for k in arms}
    results = {}
    for _ in range(a.repeats):
        for name, fn in arms.items():
            t0 = time.perf_counter()
            results[name] = fn(model, tok, prompt, vector, a.coeff, a.w, a.step, SPLICE, ids, eos_token_id=[])
            times[name].append(time.perf_counter() - t0)
    diff = np.nanmax(np.abs(results["cached"].pmass - results["recomputed"].pmass))
    cached, recomputed = statistics.median(times["cached"]), statistics.median(times["recomputed"])
    n_forks = int(np.isfinite(results["cached"].pmass).sum())
    print(f"model={a.model} w={a.w} step={a.step} forks={n_forks} threads={torch.get_num_threads()}")
    print(f"| arm | seconds |\n|---|---|\n| cached | {cached:.2f} |\n| recomputed | {recomputed:.2f} |")
    print(f"| recomputed ÷ cached | {recomputed / cached:.2f}× |")
    print(f"max |pmass cached − recomputed| = {diff:.2e}")


if __name__ == "__main__":
    main()
