"""One survival α at a user's scale (issue 27): Gemma-3-4B's shape, 64 prompts x 512 tokens, on one GPU.

    python benchmarks/survival_scale.py                      # on a CUDA GPU, bf16 (part of benchmarks/gpu_check.sh)
    python benchmarks/survival_scale.py --dry-run            # the same code on the CPU, a tiny shape

The model is built here, randomly initialised (no download): ``Gemma3ForCausalLM`` with gemma-3-4b-it's text
decoder shape (hidden 2560, 34 layers, 8 heads / 4 KV heads of 256, MLP 10240, vocabulary 262 144, sliding window
1024 on 5 of every 6 layers, soft-capped attention as Gemma-3 has none: its config's defaults), its weights ×
``--sharpen`` so that greedy rollouts vary (a random model's logits are nearly flat). The prompts are the bundled
true/false evaluation questions in heal_pl's tiny ChatML tokenizer, cycled to ``--prompts``; the steering is a
random unit direction at the middle block, at ``--coeff`` times the residual norm's scale.

What runs is :func:`heal_pl.survival.sweep.measure_alpha`, one α of ``heal survival``: the greedy rollouts under
steering, the per-token KL to the base along them (bounded memory: ``chunk_size`` rows of the 262k-wide head at a
time) and the forced-choice probe at every ``--fork-step``-th token. Arms (alternated, ``--repeats`` each):

- ``batched forks``: the forks of a whole batch read on the KL's own cache (:mod:`heal_pl.survival.batch_forks`);
- ``per-prompt forks``: the path before it, a prefill and a fork read per prompt (``batch_fork_reader`` off).

Printed: seconds (min / median / max), peak GPU memory (``torch.cuda.max_memory_allocated``), and whether the arms
agree (the same tokens; the largest pmass difference). One ``RESULT {json}`` line for the GPU check's table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch

GEMMA3_4B = {"hidden_size": 2560, "num_hidden_layers": 34, "num_attention_heads": 8, "num_key_value_heads": 4,
             "head_dim": 256, "intermediate_size": 10240, "vocab_size": 262_144, "sliding_window": 1024,
             "max_position_embeddings": 8192, "query_pre_attn_scalar": 256}  # fmt: skip
TINY = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
        "intermediate_size": 128, "vocab_size": 4096, "sliding_window": 64, "max_position_embeddings": 1024,
        "query_pre_attn_scalar": 16}  # fmt: skip


def build(shape: dict, device: str, dtype: torch.dtype, sharpen: float) -> torch.nn.Module:
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    from heal_pl.models.load import tiny_tokenizer

    tok = tiny_tokenizer()
    config = Gemma3TextConfig(pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None,
                              **shape)  # fmt: skip
    torch.manual_seed(0)
    with torch.device(device):
        model = Gemma3ForCausalLM(config).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(sharpen)
    return model.eval()


def main() -> None:
    from heal_pl.data.prompts import chat_prompt
    from heal_pl.models.load import tiny_tokenizer
    from heal_pl.steering.vectors import SteeringVector
    from heal_pl.survival import batch_forks, sweep
    from heal_pl.survival.config import SweepConfig, load_questions
    from heal_pl.survival.probes import answer_token_ids

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="the CPU, a tiny shape, 8 prompts x 32 tokens")
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--w", type=int, default=512)
    p.add_argument("--fork-step", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--fork-batch", type=int, default=64)
    p.add_argument("--coeff", type=float, default=4.0)
    p.add_argument("--sharpen", type=float, default=4.0)
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args()
    device, dtype = ("cpu", torch.float32) if a.dry_run else ("cuda", torch.bfloat16)
    if a.dry_run:
        a.prompts, a.w, a.fork_step, a.batch_size = 8, 32, 8, 4
    model = build(TINY if a.dry_run else GEMMA3_4B, device, dtype, a.sharpen)
    tok = tiny_tokenizer()
    questions = load_questions("eval")
    prompts = [chat_prompt(tok, questions[i % len(questions)]["prompt"], None) for i in range(a.prompts)]
    hidden, middle = model.config.hidden_size, model.config.num_hidden_layers // 2
    direction = torch.nn.functional.normalize(torch.randn(hidden, generator=torch.Generator().manual_seed(1)), dim=0)
    vector = SteeringVector("mean_diff", {middle: direction * hidden**0.5})
    config = SweepConfig(w=a.w, fork_step=a.fork_step, splice="<|im_end|>\n<|im_start|>assistant\nAnswer:",
                         threshold=0.5, batch_size=a.batch_size, fork_batch=a.fork_batch, stop_at_eos=False,
                         n_eval=None)  # fmt: skip
    answer_ids = answer_token_ids(tok, config.answer_sets())
    forks = config.fork_points()
    reader = batch_forks.batch_fork_reader

    def run(arm: str) -> tuple[float, float, dict]:
        sweep.batch_fork_reader = reader if arm == "batched forks" else (lambda *args, **kwargs: None)
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        m = sweep.measure_alpha(model, tok, vector, prompts, a.coeff, config, forks, answer_ids, arm)
        if device == "cuda":
            torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
        return time.perf_counter() - t0, peak, m

    arms = ("batched forks", "per-prompt forks")
    times: dict[str, list[float]] = {arm: [] for arm in arms}
    peaks: dict[str, float] = {}
    last: dict[str, dict] = {}
    for _ in range(a.repeats):
        for arm in arms:
            seconds, peak, last[arm] = run(arm)
            times[arm].append(seconds)
            peaks[arm] = max(peaks.get(arm, 0.0), peak)
    same_tokens = last[arms[0]]["tokens"] == last[arms[1]]["tokens"]
    x, y = (np.asarray(last[arm]["pmass"], dtype=np.float64) for arm in arms)
    both = ~np.isnan(x) & ~np.isnan(y)
    pm_diff = float(np.abs(x[both] - y[both]).max(initial=0.0)) if same_tokens else float("nan")
    gen = sum(len(t) for t in last[arms[0]]["tokens"])
    name = "CPU (dry run)" if device == "cpu" else torch.cuda.get_device_name()
    print(f"one survival α on {name}: Gemma-3-4B shape{' (tiny)' if a.dry_run else ''}, {a.prompts} prompts x "
          f"{a.w} tokens, {len(forks)} forks each, batch {a.batch_size}, {str(dtype).removeprefix('torch.')}")
    print("| arm | min s | median s | max s | peak GiB | generated tokens / s |\n|---|---|---|---|---|---|")
    for arm in arms:
        ts = times[arm]
        peak = f"{peaks[arm]:.1f}" if device == "cuda" else "-"
        print(f"| {arm} | {min(ts):.1f} | {statistics.median(ts):.1f} | {max(ts):.1f} | {peak} | "
              f"{gen / statistics.median(ts):.0f} |")  # fmt: skip
    print(f"same tokens in both arms: {same_tokens}; max |Δ pmass| {pm_diff:.1e}; kl_p95 "
          f"{last[arms[0]]['stats']['p95']:.3g}")  # fmt: skip
    print("RESULT " + json.dumps({arm: {"median_s": statistics.median(times[arm]), "peak_gib": peaks[arm]}
                                  for arm in arms} | {"same_tokens": same_tokens, "max_dpmass": pm_diff}))  # fmt: skip


if __name__ == "__main__":
    main()
