"""Peak memory of the loss computation: heal_pl's chunked path ÷ the naive full-tensor path.

    python benchmarks/barrier_memory.py --batch 8 --seq 512 --vocab 49152 --hidden 576
    python benchmarks/barrier_memory.py --device cuda            # peak CUDA memory allocated instead of RSS

The loss = mean NLL + rmse KL(student ‖ ref), forward and backward, from the hidden states of both
models (random, the shapes of SmolLM2) through a frozen LM head of ``vocab × hidden``:

- naive: full ``[B, T, V]`` logits and float32 log-softmax for student and ref, then mask;
- chunked: ``heal_pl.kl.token_stats`` on the counted rows only, 256 rows at a time.

Each arm runs in its own fresh subprocess; memory is the process's peak resident set size
(``resource.getrusage(...).ru_maxrss``) after the run minus the peak before it — process RSS deltas,
not torch's allocator (the CPU allocator keeps no peak counter). With ``--device cuda`` the tensors live on the
GPU and memory is ``torch.cuda.max_memory_allocated()`` after the run minus the allocated memory before it.
All rows are completion rows but the first quarter (the prompt).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys


def run_arm(arm: str, B: int, T: int, V: int, H: int, chunk: int, device: str = "cpu") -> dict[str, float]:
    import torch

    from heal_pl.hardware import resolve_device
    from heal_pl.kl import aggregate, counted_positions, naive_token_stats, token_stats

    dev = resolve_device(device)
    torch.manual_seed(0)  # the head's init: both arms (separate processes) must see the same weights
    g = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(H, V, bias=False).requires_grad_(False).to(dev)
    hs = torch.randn(B, T, H, generator=g).to(dev).requires_grad_()
    hr = torch.randn(B, T, H, generator=g).to(dev)
    labels = torch.randint(0, V, (B, T), generator=g).to(dev)
    labels[:, : T // 4] = -100
    cuda = dev.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated() / 1024 if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if arm == "naive":
        with torch.no_grad():
            ref_logits = head(hr)
        stats = naive_token_stats(head(hs), ref_logits, labels)
    else:
        c = counted_positions(labels)
        rows, ref_rows = hs[c.batch_idx, c.pos_idx], hr[c.batch_idx, c.pos_idx]
        stats = token_stats(rows, ref_rows, c.targets, head=head, chunk_size=chunk)
    loss = stats.nll.mean() + aggregate(stats.kl, "rmse")
    loss.backward()
    after = torch.cuda.max_memory_allocated() / 1024 if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_mb": (after - before) / 1024, "loss": loss.item()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--hidden", type=int, default=576)
    p.add_argument("--chunk", type=int, default=256)
    p.add_argument("--device", default="cpu", help="auto | cpu | cuda | cuda:N (heal_pl.hardware)")
    p.add_argument("--arm", choices=["naive", "chunked"], help=argparse.SUPPRESS)
    a = p.parse_args()
    dims = (a.batch, a.seq, a.vocab, a.hidden, a.chunk, a.device)
    if a.arm:
        print(json.dumps(run_arm(a.arm, *dims)))
        return
    results = {}
    for arm in ("naive", "chunked"):
        out = subprocess.run([sys.executable, __file__, "--arm", arm, *sys.argv[1:]], capture_output=True, text=True)
        if out.returncode:
            sys.exit(out.stderr)
        results[arm] = json.loads(out.stdout.strip().splitlines()[-1])
    full_gb = a.batch * a.seq * a.vocab * 4 / 2**30
    print(f"B×T×V = {a.batch}×{a.seq}×{a.vocab} (one float32 [B,T,V] tensor = {full_gb:.2f} GiB), chunk {a.chunk}")
    what = "peak RSS Δ" if a.device == "cpu" else f"peak {a.device} allocated Δ"
    print(f"| path | {what} (MiB) | loss |\n|---|---|---|")
    for arm, r in results.items():
        print(f"| {arm} | {r['peak_mb']:.0f} | {r['loss']:.6f} |")
    print(f"chunked ÷ naive = {results['chunked']['peak_mb'] / results['naive']['peak_mb']:.3f}")


if __name__ == "__main__":
    main()
