"""Peak memory of the per-token KL along a rollout (issue 27): whole ``[B, n, V]`` tensors against chunked rows.

    OMP_NUM_THREADS=1 python benchmarks/rollout_kl_memory.py            # V = 128k and 262k, B = 8, n = 32 / 64 / 512

The KL step of :func:`heal_pl.steering.trajectory.measure_kl` from random final hidden rows of the steered and the
base forward (``[B, n, H]``, ``H`` small: the head product is not what is measured) through one ``V × H`` linear
head, under ``torch.no_grad`` as in ``measure_kl``. Arms:

- ``whole [B, n, V]``: the code before issue 27: ``log_softmax(head(rows))`` of both sides as ``[B, n, V]``
  float32, then :func:`heal_pl.barrier.kl.per_token_kl`;
- ``chunked``: :func:`heal_pl.barrier.kl.token_stats` on the ``[B · n, H]`` rows, ``--chunk`` rows at a time
  (the fused no-grad kernel: one ``[3 · chunk, V]`` float32 workspace), what ``measure_kl`` runs now.

Each (arm, n, V) runs in its own subprocess: after its inputs exist the peak RSS is reset (``/proc/self/clear_refs``)
and ``VmHWM`` after the KL minus ``VmRSS`` before is reported (process memory, as ``barrier_memory.py`` does).
The whole-tensor arm is skipped where its own estimate, ``6 · B · n · V · 4`` bytes (two log-prob tensors and
``per_token_kl``'s temporaries), exceeds ``--max-gib``: at B = 8, n = 512, V = 262,144 that is ≈ 24 GiB, more than
a shared CPU machine should be asked for, so the table measures it at short ``n`` where it grows linearly.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch
from barrier_memory import _rss  # this folder is on sys.path when the script runs

ARMS = ("whole [B, n, V]", "chunked")


def measure(arm: str, B: int, n: int, V: int, H: int, chunk: int) -> dict[str, float]:
    from heal_pl.barrier.fused_head import linear_f32
    from heal_pl.barrier.kl import per_token_kl, token_stats

    g = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(H, V, bias=False)
    head.weight.data = torch.randn(V, H, generator=g) * H**-0.5 * 4  # sharp enough for a KL far from 0
    hs = torch.randn(B, n, H, generator=g)
    hb = hs + 0.3 * torch.randn(B, n, H, generator=g)
    targets = torch.randint(0, V, (B * n,), generator=g)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    before = _rss("VmRSS")
    t0 = time.perf_counter()
    with torch.no_grad():
        if arm == "whole [B, n, V]":
            logp_s = torch.log_softmax(linear_f32(hs, head.weight), dim=-1)  # [B, n, V]
            logp_b = torch.log_softmax(linear_f32(hb, head.weight), dim=-1)
            kl = per_token_kl(logp_s, logp_b).flatten()
        else:
            kl = token_stats(hs.flatten(0, 1), hb.flatten(0, 1), targets, head=head, chunk_size=chunk).kl
    seconds = time.perf_counter() - t0
    return {"peak_mib": _rss("VmHWM") - before, "seconds": seconds, "kl_sum": float(kl.double().sum())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seqs", type=int, nargs="+", default=[32, 64, 512], help="generated tokens n per prompt")
    p.add_argument("--vocabs", type=int, nargs="+", default=[131072, 262144])
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--chunk", type=int, default=256)
    p.add_argument("--max-gib", type=float, default=4.0, help="skip the whole-tensor arm above this estimate")
    p.add_argument("--arm", help=argparse.SUPPRESS)
    p.add_argument("--seq", type=int, help=argparse.SUPPRESS)
    p.add_argument("--vocab", type=int, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.arm:
        print(json.dumps(measure(a.arm, a.batch, a.seq, a.vocab, a.hidden, a.chunk)))
        return
    print(f"B = {a.batch}, H = {a.hidden}, chunk = {a.chunk}, threads = {torch.get_num_threads()}; "
          "peak RSS Δ of the KL step, each row a fresh process")  # fmt: skip
    print("| V | n | arm | peak RSS Δ (MiB) | time (s) | Σ KL |\n|---|---|---|---|---|---|")
    for V in a.vocabs:
        for n in a.seqs:
            for arm in ARMS:
                estimate = 6 * a.batch * n * V * 4 / 2**30
                if arm == ARMS[0] and estimate > a.max_gib:
                    print(f"| {V:,} | {n} | {arm} | skipped: ≈ {estimate * 1024:,.0f} estimated | – | – |")
                    continue
                args = [sys.executable, __file__, "--arm", arm, "--batch", str(a.batch), "--seq", str(n), "--vocab",
                        str(V), "--hidden", str(a.hidden), "--chunk", str(a.chunk)]  # fmt: skip
                out = subprocess.run(args, capture_output=True, text=True)
                if out.returncode:
                    sys.exit(f"arm {arm!r} failed:\n{out.stderr}")
                r = json.loads(out.stdout.strip().splitlines()[-1])
                print(f"| {V:,} | {n} | {arm} | {r['peak_mib']:,.0f} | {r['seconds']:.2f} | {r['kl_sum']:.6g} |")


if __name__ == "__main__":
    main()
