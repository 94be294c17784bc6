"""Survival forks: cached (reads on the rollout's own cache) ÷ recomputed from scratch.

    python benchmarks/forks.py --w 256 --step 5                   # SmolLM2-135M (Llama: full attention)
    python benchmarks/forks.py --shape gemma3 --w 128 --step 4    # Gemma-3-shaped: 5 sliding : 1 full, window 32
    python benchmarks/forks.py --shape qwen3_5 --w 128 --step 4   # Qwen3.5-shaped: 3 linear attention : 1 full

``--shape`` builds a randomly initialised model of that family's layer pattern at a small size (hidden 256,
12 / 8 layers; see :func:`shaped_model`), NOT the real checkpoint: the rows show what the cache machinery costs
on that pattern (sliding layers keep every position; recurrent layers read one row per fork from snapshots).

One greedy rollout of ``w`` tokens (EOS ignored) under a mean_diff vector (pirate vs plain assistant, mid
depth) at ``--coeff``; a true/false probe at every ``step`` tokens. Printed side by side, each the median
of ``--repeats`` alternating runs:

* end to end: ``fork_probe`` (rollout + packed fork reads on its cache) vs ``fork_probe_recompute``
  (``greedy_generate`` + one full forward per fork). Both contain the same token-by-token rollout.
* the rollout alone (``heal_pl.survival.forks.rollout``): the floor both end-to-end arms share.
* fork phase only, on the same tokens, vs ``probe_forks_recompute`` (one full forward per fork, logits of the
  last position only, ``logits_to_keep=1``):
  ``probe_forks(cache=rollout's cache)`` (the packed reads alone: what ``fork_probe`` adds to its rollout),
  ``probe_forks`` without a cache (one prefill forward of ``x ⊕ y_<g`` + the packed reads: what the survival
  sweep pays, its tokens coming from ``measure_kl``), and the previous implementation, one fork at a time on
  a deep copy of the rollout's cache cropped to the fork (full-attention caches only).

All arms return the same pmass (max differences printed).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch

from heal_pl.data.prompts import NEUTRAL, PIRATE, chat_prompt, questions
from heal_pl.models.families import tiny_config
from heal_pl.models.generate import cache_kwargs
from heal_pl.models.lm import LMHead, base_lm
from heal_pl.models.load import load_model, load_tokenizer, tiny_tokenizer
from heal_pl.steering import SteeringVector
from heal_pl.survival.fork_cache import fork_plan
from heal_pl.survival.forks import fork_probe, fork_probe_recompute, probe_forks, probe_forks_recompute, rollout
from heal_pl.survival.probes import answer_token_ids, probe_from_logits
from heal_pl.survival.table import fork_schedule

SPLICE = "\n\nIs the answer above written like a pirate? Answer true or false:"


@torch.no_grad()
def one_by_one(model, tok, prompt_ids: list[int], gen: list[int], cache, forks: np.ndarray, ids) -> np.ndarray:
    """The previous cached path: per fork deep-copy the rollout cache, crop it to the fork, feed the splice."""
    backbone, head = base_lm(model).get_decoder(), LMHead(base_lm(model))
    splice = tok(SPLICE, add_special_tokens=False)["input_ids"]
    P, cached = len(prompt_ids), cache.get_seq_length()
    out = np.full(len(forks), np.nan)
    for j, t in enumerate(forks.tolist()):
        keep = min(P + t, cached)
        fork = copy.deepcopy(cache)
        fork.crop(keep - cached)
        feed = gen[keep - P : t] + splice
        h = backbone(input_ids=torch.tensor([feed]), position_ids=torch.arange(keep, keep + len(feed))[None],
                     use_cache=True, **cache_kwargs(backbone, fork)).last_hidden_state  # fmt: skip
        out[j] = float(probe_from_logits(head(h[:, -1]), ids)[0][0])
    return out


SHAPES = {  # the family's layer pattern at hidden 256 (real: Gemma-3-4B 34 layers / window 1024; Qwen3.5-0.8B 24)
    "gemma3": {"num_hidden_layers": 12, "sliding_window": 32, "head_dim": 64, "num_key_value_heads": 1,
               "layer_types": (["sliding_attention"] * 5 + ["full_attention"]) * 2},
    "qwen3_5": {"num_hidden_layers": 8, "head_dim": 64, "linear_key_head_dim": 64, "linear_value_head_dim": 64,
                "linear_num_key_heads": 4, "linear_num_value_heads": 8,
                "layer_types": (["linear_attention"] * 3 + ["full_attention"]) * 2},
}


def shaped_model(shape: str):
    """A random model with ``shape``'s layer pattern, hidden 256, 4 heads, intermediate 1024, seed 0."""
    tok = tiny_tokenizer()
    config, cls = tiny_config(shape, len(tok), tok.pad_token_id, tok.eos_token_id)
    for key, value in {"hidden_size": 256, "intermediate_size": 1024, **SHAPES[shape]}.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    return tok, cls(config).eval()


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    t0 = time.perf_counter()
    result = fn()
    return time.perf_counter() - t0, result


def profile(model, tok, prompt: str, prompt_ids: list[int], vector, a: argparse.Namespace, args: tuple) -> None:
    """torch.profiler over one cached run: where the time goes (rollout vs packed fork reads, top operators)."""
    from torch.profiler import ProfilerActivity, record_function
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        with record_function("rollout"), vector.steering(model, a.coeff), torch.no_grad():
            gen, cache = rollout(model, prompt_ids, a.w, torch.tensor([], dtype=torch.long))
        with record_function("forks packed on cache"):
            probe_forks(model, tok, prompt, gen, *args, cache=cache)
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=14, max_name_column_width=40))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--shape", choices=sorted(SHAPES), help="a random model of this layer pattern instead of --model")
    p.add_argument("--w", type=int, default=256)
    p.add_argument("--step", type=int, default=5)
    p.add_argument("--coeff", type=float, default=20.0)
    p.add_argument("--repeats", type=int, default=5, help="alternating runs of every arm (median)")
    p.add_argument("--profile", action="store_true", help="torch.profiler table of one cached run instead")
    a = p.parse_args()
    tok, model = shaped_model(a.shape) if a.shape else (load_tokenizer(a.model), load_model(a.model).eval())
    name = f"{a.shape}-shaped (random, hidden 256)" if a.shape else a.model
    full_only = a.shape is None  # the one-by-one copy/crop arm needs a croppable full-attention cache
    qs = questions(17)
    vector = SteeringVector.fit(model, tok, [chat_prompt(tok, q, PIRATE) for q in qs[:16]],
                                [chat_prompt(tok, q, NEUTRAL) for q in qs[:16]], layers=0.5)  # fmt: skip
    prompt, ids = chat_prompt(tok, qs[16], None), answer_token_ids(tok)
    prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    forks = fork_schedule(a.w, step=a.step)
    args = (vector, a.coeff, a.w, a.step, SPLICE, ids)
    times: dict[str, list[float]] = {}
    pm: dict[str, np.ndarray] = {}

    def run(name: str, fn: Callable[..., object], *fn_args: object, **fn_kwargs: object) -> object:
        seconds, result = timed(lambda: fn(*fn_args, **fn_kwargs))
        times.setdefault(name, []).append(seconds)
        pm[name] = result.pmass if hasattr(result, "pmass") else result
        return result

    if a.profile:
        profile(model, tok, prompt, prompt_ids, vector, a, args)
        return
    for _ in range(a.repeats):
        cached = run("e2e cached", fork_probe, model, tok, prompt, *args, eos_token_id=[])
        run("e2e recomputed", fork_probe_recompute, model, tok, prompt, *args, eos_token_id=[])
        gen = cached.tokens.tolist()
        with vector.steering(model, a.coeff), torch.no_grad():
            _, cache = run("rollout", rollout, model, prompt_ids, a.w, torch.tensor([], dtype=torch.long),
                           forks.tolist())
            if full_only:
                run("forks one-by-one", one_by_one, model, tok, prompt_ids, gen, cache, forks, ids)
        run("forks packed on cache", probe_forks, model, tok, prompt, gen, *args, cache=cache)  # steers by itself
        run("forks packed", probe_forks, model, tok, prompt, gen, *args)
        run("forks recomputed", probe_forks_recompute, model, tok, prompt, gen, *args)
    med = {k: statistics.median(v) for k, v in times.items()}
    diffs = {k: float(np.nanmax(np.abs(v - pm["e2e recomputed"]))) for k, v in pm.items()
             if k not in ("e2e recomputed", "rollout")}
    print(f"model={name} w={a.w} step={a.step} forks={len(forks)} splice={len(tok(SPLICE)['input_ids'])} tokens "
          f"prompt={len(prompt_ids)} tokens threads={torch.get_num_threads()} repeats={a.repeats}")
    print("| what | cached (s) | recomputed (s) | recomputed ÷ cached |\n|---|---|---|---|")
    spread = {k: f"{min(v):.2f}–{max(v):.2f}" for k, v in times.items()}
    plan = fork_plan(model)
    reads = "packed reads" if plan.mode == "packed" else "one row per fork from snapshots"
    print(f"| end to end (rollout + forks) | {med['e2e cached']:.2f} | {med['e2e recomputed']:.2f} | "
          f"{med['e2e recomputed'] / med['e2e cached']:.2f}× |")
    print(f"| fork phase only, {reads} on the rollout's cache | {med['forks packed on cache']:.2f} | "
          f"{med['forks recomputed']:.2f} | {med['forks recomputed'] / med['forks packed on cache']:.2f}× |")
    print(f"| fork phase only, prefill + {reads} | {med['forks packed']:.2f} | {med['forks recomputed']:.2f} | "
          f"{med['forks recomputed'] / med['forks packed']:.2f}× |")
    if full_only:
        print(f"| fork phase only, one-by-one copy/crop (previous) | {med['forks one-by-one']:.2f} | "
              f"{med['forks recomputed']:.2f} | {med['forks recomputed'] / med['forks one-by-one']:.2f}× |")
    print(f"| rollout alone (shared floor) | {med['rollout']:.2f} | | |")
    bound = (med["rollout"] + med["forks recomputed"]) / med["rollout"]
    print(f"end-to-end ceiling with free forks: (rollout + recomputed forks) ÷ rollout = {bound:.2f}×")
    print("min–max of each arm over the repeats: " + ", ".join(f"{k} {v} s" for k, v in spread.items()))
    print("max |pmass − e2e recomputed|: " + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()))


if __name__ == "__main__":
    main()
