"""Peak memory and speed of the loss from hidden rows: heal_pl's fused head against lean baselines and the peers.

    python benchmarks/barrier_memory.py                      # peak memory, each arm in a fresh process
    OMP_NUM_THREADS=2 python benchmarks/barrier_memory.py --speed --repeats 5    # time, arms alternated
    python benchmarks/barrier_memory.py --dtype bfloat16     # a bf16 head and bf16 hidden rows
    python benchmarks/barrier_memory.py --device cuda        # peak CUDA memory allocated instead of RSS

The loss is mean NLL + mean reverse KL(student ‖ ref) over the completion rows (all but the first quarter of
each row), forward and backward, from random hidden rows of both models (SmolLM2's shapes by default)
through one frozen ``vocab × hidden`` LM head. Arms:

- ``full logits (GKD-style)``: ``[B, T, V]`` logits of both models, one log-softmax each, the KL by
  ``F.kl_div(log_target=True)``, then masked — what a trainer that takes the model's logits does;
- ``lean naive (counted rows)``: the same on the counted rows only (``[N, V]``): the lean baseline;
- ``heal_pl token_stats``: :func:`heal_pl.barrier.kl.token_stats`, the fused head, 256 rows at a time;
- ``liger fused linear JSD`` (beta = 1: reverse KL, plus its hard loss = NLL), eager at chunk 1024 and 256 and
  ``compiled=True``, when ``liger-kernel`` is installed (``pip install -e ".[bench]"``);
- ``trl chunked divergence``: TRL's ``_chunked_divergence_loss`` at beta = 1 (the KL part only; its loss
  column is the KL), when ``trl`` is installed.

Memory: each arm runs in its own subprocess; after its inputs exist the process's peak RSS is reset
(``/proc/self/clear_refs``), and the peak (``VmHWM``) after forward + backward minus the RSS before is
reported — process memory, not torch's allocator (the CPU allocator keeps no peak counter). With ``--device
cuda`` the tensors live on the GPU and memory is ``torch.cuda.max_memory_allocated()`` minus the allocated
memory before the run. Speed: every arm
in one process, alternated, ``--repeats`` timed runs after one warm-up, min / median / max.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

LIGER = ("liger eager, chunk 1024", "liger eager, chunk 256", "liger compiled, chunk 1024")
ARMS = ("full logits (GKD-style)", "lean naive (counted rows)", "heal_pl token_stats", *LIGER,
        "trl chunked divergence (KL only)")  # fmt: skip


def available(arm: str) -> str | None:
    """Why ``arm`` cannot run here, or ``None``."""
    need = "liger_kernel" if arm.startswith("liger") else "trl" if arm.startswith("trl") else None
    if need and importlib.util.find_spec(need) is None:
        return f"{need} is not installed (pip install -e '.[bench]')"
    return None


def inputs(B: int, T: int, V: int, H: int, dtype: torch.dtype, device: str = "cpu") -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(0)
    head = (torch.randn(V, H, generator=g) * H**-0.5).to(dtype)
    hs = torch.randn(B, T, H, generator=g).to(dtype)
    hr = (hs.float() + 0.3 * torch.randn(B, T, H, generator=g)).to(dtype)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[:, : T // 4] = -100
    return {k: v.to(device) for k, v in {"head": head, "hs": hs, "hr": hr, "labels": labels}.items()}


def loss_fn(arm: str, x: dict[str, Tensor], chunk: int) -> Callable[[], tuple[Tensor, Tensor]]:
    """A closure returning ``(loss, student hidden states to take the gradient of)``; the next-token shift
    is done as heal_pl does it: the row at t predicts the label at t + 1."""
    head, labels = x["head"], x["labels"]
    nxt = labels[:, 1:]
    keep = nxt != -100
    b, t = keep.nonzero(as_tuple=True)
    targets = nxt[b, t]

    def rows(h: Tensor) -> Tensor:
        return h[b, t]

    # imports and modules are made here, outside the measured closure
    if arm == "heal_pl token_stats":
        from heal_pl.barrier.kl import token_stats

        linear = torch.nn.Linear(head.shape[1], head.shape[0], bias=False, dtype=head.dtype, device=head.device)
        linear.weight.data = head
        linear.requires_grad_(False)
    elif arm.startswith("liger"):
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        liger = LigerFusedLinearJSDLoss(weight_hard_loss=1.0, weight_soft_loss=1.0, beta=1.0,
                                        compiled="compiled" in arm, chunk_size=256 if "256" in arm else 1024)
    elif arm.startswith("trl"):
        from trl.trainer.distillation_trainer import _chunked_divergence_loss

        mask = torch.ones(len(targets), 1, dtype=torch.long, device=head.device)

    def run() -> tuple[Tensor, Tensor]:
        hs = x["hs"].detach().requires_grad_()
        hr = x["hr"]
        if arm == "full logits (GKD-style)":
            logp_s = F.log_softmax((hs[:, :-1] @ head.T).float(), -1)
            with torch.no_grad():
                logp_r = F.log_softmax((hr[:, :-1] @ head.T).float(), -1)
            kl = F.kl_div(logp_r, logp_s, log_target=True, reduction="none").sum(-1)[keep]
            nll = F.nll_loss(logp_s[keep], targets)
            return nll + kl.mean(), hs
        if arm == "lean naive (counted rows)":
            logp_s = F.log_softmax((rows(hs) @ head.T).float(), -1)
            with torch.no_grad():
                logp_r = F.log_softmax((rows(hr) @ head.T).float(), -1)
            kl = F.kl_div(logp_r, logp_s, log_target=True, reduction="none").sum(-1)
            return F.nll_loss(logp_s, targets) + kl.mean(), hs
        if arm == "heal_pl token_stats":
            stats = token_stats(rows(hs), rows(hr), targets, head=linear, chunk_size=256)
            return stats.nll.mean() + stats.kl.mean(), hs
        if arm.startswith("liger"):
            return liger(rows(hs), head, rows(hr), head, targets), hs
        if arm.startswith("trl"):
            loss, _, _ = _chunked_divergence_loss(rows(hs)[:, None], rows(hr)[:, None], head, head, mask, beta=1.0)
            return loss, hs
        raise ValueError(f"arm={arm!r} is not one of {', '.join(ARMS)}")

    return run


def _rss(field: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field)) / 1024  # MiB


def measure_memory(
    arm: str, dims: tuple[int, int, int, int], dtype: torch.dtype, chunk: int, device: str = "cpu"
) -> dict[str, float]:
    from heal_pl.hardware import resolve_device

    dev = resolve_device(device)
    x = inputs(*dims, dtype, str(dev))
    run = loss_fn(arm, x, chunk)
    if "compiled" in arm:  # compile outside the measurement, as any real run does once
        loss, _ = run()
        loss.backward()
    cuda = dev.type == "cuda"
    if cuda:
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        before = torch.cuda.memory_allocated(dev) / 2**20
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        before = _rss("VmRSS")
    loss, hs = run()
    loss.backward()
    assert hs.grad is not None and torch.isfinite(hs.grad).all()
    peak = torch.cuda.max_memory_allocated(dev) / 2**20 if cuda else _rss("VmHWM")
    return {"peak_mib": peak - before, "loss": loss.item()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--hidden", type=int, default=576)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--chunk", type=int, default=256)
    p.add_argument("--device", default="cpu", help="auto | cpu | cuda | cuda:N (heal_pl.hardware)")
    p.add_argument("--speed", action="store_true", help="time the arms (alternated, one process) instead")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--arms", nargs="*", default=list(ARMS), help="a subset of the arms")
    p.add_argument("--arm", help=argparse.SUPPRESS)
    a = p.parse_args()
    dims, dtype = (a.batch, a.seq, a.vocab, a.hidden), getattr(torch, a.dtype)
    if a.arm:
        print(json.dumps(measure_memory(a.arm, dims, dtype, a.chunk, a.device)))
        return
    unknown = sorted(set(a.arms) - set(ARMS))
    if unknown:
        p.error(f"--arms {unknown} not among {list(ARMS)}")
    arms, skipped = [], []
    for arm in a.arms:
        why = available(arm)
        (skipped.append(f"{arm}: {why}") if why else arms.append(arm))
    n_rows = a.batch * (a.seq - a.seq // 4)
    print(f"B×T = {a.batch}×{a.seq} ({n_rows} counted rows), V = {a.vocab}, H = {a.hidden}, {a.dtype}, "
          f"threads = {torch.get_num_threads()}")  # fmt: skip
    for line in skipped:
        print(f"skipped {line}")
    if a.speed:
        from heal_pl.hardware import resolve_device

        x = inputs(*dims, dtype, str(resolve_device(a.device)))
        runs = {arm: loss_fn(arm, x, a.chunk) for arm in arms}
        times: dict[str, list[float]] = {arm: [] for arm in arms}
        losses: dict[str, float] = {}
        for k in range(a.repeats + 1):
            for arm, run in runs.items():
                t0 = time.perf_counter()
                loss, _ = run()
                loss.backward()
                if loss.device.type == "cuda":
                    torch.cuda.synchronize(loss.device)
                if k:
                    times[arm].append(time.perf_counter() - t0)
                losses[arm] = loss.item()
        print(f"| arm | min (s) | median (s) | max (s) | loss |   ({a.repeats} timed runs after 1 warm-up)")
        print("|---|---|---|---|---|")
        for arm, ts in times.items():
            print(f"| {arm} | {min(ts):.2f} | {statistics.median(ts):.2f} | {max(ts):.2f} | {losses[arm]:.7f} |")
        return
    results = {}
    for arm in arms:
        args = [sys.executable, __file__, "--arm", arm, "--batch", str(a.batch), "--seq", str(a.seq), "--vocab",
                str(a.vocab), "--hidden", str(a.hidden), "--dtype", a.dtype, "--chunk", str(a.chunk),
                "--device", a.device]  # fmt: skip
        out = subprocess.run(args, capture_output=True, text=True)
        if out.returncode:
            sys.exit(f"arm {arm!r} failed:\n{out.stderr}")
        results[arm] = json.loads(out.stdout.strip().splitlines()[-1])
    lean = results.get("lean naive (counted rows)", {}).get("peak_mib")
    what = "peak RSS Δ" if a.device == "cpu" else f"peak {a.device} allocated Δ"
    print(f"| arm | {what} (MiB) | ÷ lean naive | loss |\n|---|---|---|---|")
    for arm, r in results.items():
        ratio = f"{r['peak_mib'] / lean:.3f}" if lean else "–"
        print(f"| {arm} | {r['peak_mib']:.0f} | {ratio} | {r['loss']:.7f} |")


if __name__ == "__main__":
    main()
