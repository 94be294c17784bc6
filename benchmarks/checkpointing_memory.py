"""Activation memory and step time of a training step with and without ``gradient_checkpointing``.

    OMP_NUM_THREADS=1 python benchmarks/checkpointing_memory.py             # memory at 512 / 1024 / 2048, time at 512
    OMP_NUM_THREADS=1 python benchmarks/checkpointing_memory.py --quick     # 512 / 1024 tokens, no 1-block runs

The model is a random Llama with Llama-3.2-1B's widths (hidden 2048, MLP 8192, 32 / 8 heads of 64, vocabulary
128,256, tied embeddings, float32) and only ``--blocks`` decoder blocks, built from a ``LlamaConfig`` in code and
saved into a temporary folder (nothing is downloaded). ``HealModule`` loads it with a LoRA adapter (r 8, every linear
layer of every block) and its default ``chunk_size`` (256 rows of the ``[chunk, vocab]`` head alive at once). A step
is ``loss, _, _ = module.loss_terms(batch); loss.backward()`` on one row of ``T`` random tokens whose first 16 are
prompt (label -100) and the rest completion.

Memory (SFT + rmse barrier): each (blocks, arm, T) runs in its own subprocess, after a 32-token warm-up step:

- ``saved``: the bytes of the distinct tensor storages saved for backward during the step's forward, counted with
  ``torch.autograd.graph.saved_tensors_hooks`` (the model's parameters, saved by the frozen linear layers, are not
  counted). Under non-reentrant checkpointing the tensors a block saves go to the checkpoint's own, inner hooks
  and are not seen by the outer one: what stays is what is saved outside the blocks plus, added here from the
  blocks' forward pre-hooks, the blocks' inputs the checkpoint keeps for the recompute (``saved`` = the activation
  memory held between forward and backward; the recompute materialises one block's activations at a time in
  backward, which only the RSS sees);
- ``RSS Δ``: the peak resident set over forward + backward minus the resident set right before the step: the
  process's peak is reset first (``/proc/self/clear_refs``, then ``VmHWM``, as ``benchmarks/barrier_memory.py``
  does; ``ru_maxrss`` read the same way is compared with it: it is reset too, but also keeps the peak the kernel
  records when a thread exits, so a loader thread can leave the load's peak in it); where the reset is refused,
  ``ru_maxrss`` is used instead. It includes the fused head's ``[3 · 256, V]`` float32 workspace (376 MiB), the
  ref's no-grad forward and every temporary. The subprocesses run with ``MALLOC_MMAP_THRESHOLD_=65536``: glibc then
  maps every tensor over 64 KiB on its own and unmaps it when freed, so RSS follows the live bytes; with glibc's
  default, adaptive threshold (``--malloc default``) freed blocks stay in the heap and the RSS of both arms carries
  them (at 512 tokens both arms then read 600–720 MiB).

Per decoder block: the blocks are identical, so (``--blocks`` − (``--blocks`` − 1) blocks) is one block's figure;
both block counts are measured (``--no-diff`` divides the ``--blocks`` run's in-block bytes instead and says so).

Speed (``--speed-seq``): SFT (``reg: nll``) and SFT + rmse barrier, each with and without checkpointing, four
modules in one process, alternated step by step, one warm-up step then ``--repeats`` timed steps each, min / median
/ max. The ratios are of medians, with the min–max of the per-round ratios (the two arms' steps of one round run
back to back).

The estimate for a Llama-3-8B shape scales the per-block saved bytes per input token by width: saved tensors whose last
dimension is the MLP width by 14336 / 8192, all the others by 4096 / 2048 (hidden, q/k/v; the head count, 32, is
the same); the terms outside the blocks (embedding output, final norm, the head's row gradients) by 4096 / 2048;
the head's workspace is ``3 · 256 · V · 4`` bytes whatever the width. Printed as an ESTIMATE.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

HIDDEN, INTER, VOCAB, HEADS, KV_HEADS, HEAD_DIM = 2048, 8192, 128256, 32, 8, 64
PROMPT = 16
ARMS = ("none", "checkpointing")


def build_model(folder: str, blocks: int) -> None:
    """A random Llama of Llama-3.2-1B's widths with ``blocks`` decoder blocks, saved into ``folder``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=HIDDEN, intermediate_size=INTER, vocab_size=VOCAB, num_hidden_layers=blocks,
                         num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM,
                         tie_word_embeddings=True, max_position_embeddings=8192, rope_theta=500000.0,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.float32)
    model.save_pretrained(folder)


def make_module(folder: str, checkpointing: bool, barrier: bool) -> nn.Module:
    from heal_pl.adapters.lora import LoRASpec
    from heal_pl.barrier.kl import KLBarrier
    from heal_pl.module import HealModule

    torch.manual_seed(0)
    kl = KLBarrier(agg="rmse", tau=0.5, lam=1.0) if barrier else KLBarrier(reg="nll")
    module = HealModule(model=folder, dtype="float32", lora=LoRASpec(), barrier=kl,
                        gradient_checkpointing=checkpointing)  # fmt: skip
    module.train()
    return module


def make_batch(seq: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seq)
    ids = torch.randint(3, VOCAB, (1, seq), generator=g)
    labels = ids.clone()
    labels[:, :PROMPT] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def step(module: nn.Module, batch: dict[str, torch.Tensor]) -> float:
    loss, _, _ = module.loss_terms(batch)
    loss.backward()
    module.zero_grad(set_to_none=True)
    return loss.item()


class SavedBytes:
    """Distinct storages saved for backward (parameters excluded), split by where they were saved and whether
    their last dimension is the MLP width; with ``block_inputs`` also the checkpointed blocks' inputs."""

    def __init__(self, module: nn.Module, blocks: list[nn.Module], block_inputs: bool) -> None:
        self.skip = {t.untyped_storage().data_ptr() for t in [*module.parameters(), *module.buffers()]}
        self.seen: dict[int, tuple[int, str]] = {}
        self.where = "outside"
        self.block_inputs = block_inputs
        self.handles = []
        for block in blocks:
            self.handles.append(block.register_forward_pre_hook(self._enter, with_kwargs=True))
            self.handles.append(block.register_forward_hook(self._leave))

    def _add(self, t: torch.Tensor, kind: str) -> None:
        try:
            s = t.untyped_storage()
        except (RuntimeError, NotImplementedError):
            return
        ptr = s.data_ptr()
        if ptr and ptr not in self.skip and ptr not in self.seen:
            self.seen[ptr] = (s.nbytes(), kind)

    def _enter(self, block: nn.Module, args: tuple, kwargs: dict) -> None:
        if torch.is_grad_enabled():
            self.where = "block"
            if self.block_inputs:  # the checkpoint keeps the block's inputs for the recompute
                flat = [*args, *kwargs.values()]
                for x in [*flat, *(y for t in flat if isinstance(t, tuple) for y in t)]:
                    if isinstance(x, torch.Tensor):
                        self._add(x, "checkpoint input")

    def _leave(self, block: nn.Module, args: tuple, out: object) -> None:
        self.where = "outside"

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        wide = t.dim() > 0 and t.shape[-1] == INTER
        self._add(t, f"{self.where} {'MLP-wide' if wide else 'other'}")
        return t

    @contextmanager
    def counting(self) -> Iterator[None]:
        with torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t):
            yield
        for h in self.handles:
            h.remove()

    def by_kind(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for nbytes, kind in self.seen.values():
            out[kind] = out.get(kind, 0) + nbytes
        return out


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field)) * 1024  # bytes


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS
        return True
    except OSError:
        return False


def measure(folder: str, checkpointing: bool, seq: int) -> dict[str, object]:
    """One step of SFT + rmse barrier, in this (fresh) process: saved bytes and peak RSS growth."""
    from heal_pl.models.checkpointing import checkpointed_blocks

    module = make_module(folder, checkpointing, barrier=True)
    decoder = module.student.get_base_model().model
    step(module, make_batch(PROMPT + 16))  # warm-up at 32 tokens: lazy initialisation, not counted
    batch = make_batch(seq)
    assert len(checkpointed_blocks(module.student)) == (len(decoder.layers) if checkpointing else 0)
    counter = SavedBytes(module, list(decoder.layers), block_inputs=checkpointing)
    gc.collect()
    reset = _reset_peak()
    before = _status("VmRSS")
    with counter.counting():
        loss, _, _ = module.loss_terms(batch)
    fwd_peak = _status("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    loss.backward()
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    peak = _status("VmHWM") if reset else maxrss
    grads = [p.grad for p in module.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    return {"saved": counter.by_kind(), "rss_fwd": fwd_peak - before, "rss": peak - before, "loss": loss.item(),
            "peak_reset": reset, "maxrss": maxrss - before, "rss_before": before,
            "tokens": int((batch["labels"] != -100).sum())}  # fmt: skip


def run_child(folder: str, checkpointing: bool, seq: int, malloc: str) -> dict:
    args = [sys.executable, __file__, "--child", folder, "--child-arm", ARMS[checkpointing], "--child-seq", str(seq)]
    env = dict(os.environ)
    if malloc == "mmap":
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    out = subprocess.run(args, capture_output=True, text=True, env=env)
    if out.returncode:
        sys.exit(f"{folder} {ARMS[checkpointing]} T={seq} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


MiB = 2**20


def saved_total(r: dict) -> int:
    return sum(r["saved"].values())


def in_blocks(r: dict) -> int:
    return sum(v for k, v in r["saved"].items() if k.startswith(("block", "checkpoint")))


def fmt(x: float) -> str:
    return f"{x:,.0f}"


def memory_tables(results: dict, blocks: int, seqs: list[int], diff: bool) -> dict:
    """Print the memory tables; return the per-block bytes per token at each length (for the estimate)."""
    top = results[blocks]
    print(f"\n### Peak memory of one step, SFT + rmse barrier, {blocks} blocks, batch 1 (each in a fresh process)\n")
    print("| T | arm | saved for backward (MiB) | … in blocks | … outside blocks | RSS Δ forward (MiB) "
          "| RSS Δ step (MiB) | saved: none ÷ ckpt | RSS Δ: none ÷ ckpt | loss |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for seq in seqs:
        none, ck = top[("none", seq)], top[("checkpointing", seq)]
        for arm, r in (("none", none), ("checkpointing", ck)):
            ratio = (f"{saved_total(none) / saved_total(ck):.2f}", f"{none['rss'] / ck['rss']:.2f}") if r is ck \
                else ("", "")  # fmt: skip
            print(f"| {seq} | {arm} | {fmt(saved_total(r) / MiB)} | {fmt(in_blocks(r) / MiB)} "
                  f"| {fmt((saved_total(r) - in_blocks(r)) / MiB)} | {fmt(r['rss_fwd'] / MiB)} | {fmt(r['rss'] / MiB)} "
                  f"| {ratio[0]} | {ratio[1]} | {r['loss']:.5f} |")  # fmt: skip
    per_block: dict = {}
    how = f"({blocks} blocks − {blocks - 1})" if diff else f"(in-block bytes of the {blocks}-block run ÷ {blocks})"
    print(f"\n### Per decoder block {how}, KiB per input token\n")
    print("| T | saved, none | saved, ckpt | none ÷ ckpt | RSS Δ step, none | RSS Δ step, ckpt | none ÷ ckpt "
          "| saved, none: MLP-wide share |")
    print("|---|---|---|---|---|---|---|---|")
    for seq in seqs:
        row = {}
        for arm in ARMS:
            r = top[(arm, seq)]
            if diff:
                s = results[blocks - 1][(arm, seq)]
                saved, rss = saved_total(r) - saved_total(s), r["rss"] - s["rss"]
            else:
                saved, rss = in_blocks(r) / blocks, float("nan")
            row[arm] = (saved / seq, rss / seq)  # per input token: a block's activations follow T
        r = top[("none", seq)]
        wide = r["saved"].get("block MLP-wide", 0) / max(1, in_blocks(r))
        per_block[seq] = {"none": row["none"][0], "ckpt": row["checkpointing"][0], "wide": wide}
        (sn, rn), (sc, rc) = row["none"], row["checkpointing"]
        print(f"| {seq} | {sn / 1024:.1f} | {sc / 1024:.1f} | {sn / sc:.1f} | {rn / 1024:.1f} | {rc / 1024:.1f} "
              f"| {rn / rc:.1f} | {wide:.2f} |")
    return per_block


def estimate(per_block: dict, results: dict, blocks: int, seq: int) -> None:
    """Print the ESTIMATE for a Llama-3-8B shape at batch 8 × 2048 tokens."""
    L8, H8, I8, B8, T8 = 32, 4096, 14336, 8, 2048
    n8 = B8 * T8
    hr, ir = H8 / HIDDEN, I8 / INTER
    pb = per_block[seq]
    block_none = pb["none"] * ((1 - pb["wide"]) * hr + pb["wide"] * ir)
    block_ckpt = pb["ckpt"] * hr  # the block's input row: hidden-wide
    r_none = results[blocks][("none", seq)]
    outside = (saved_total(r_none) - in_blocks(r_none)) / seq * hr
    workspace = 3 * 256 * VOCAB * 4
    none = L8 * block_none * n8 + outside * n8 + workspace
    ckpt = L8 * block_ckpt * n8 + outside * n8 + workspace + block_none * n8  # + one block recomputed in backward
    print(f"\n### ESTIMATE (not measured): Llama-3-8B shape (hidden {H8}, MLP {I8}, {L8} blocks, vocabulary {VOCAB}), "
          f"batch {B8} × {T8}, float32 activations\n")
    print(f"Rule: per-block saved bytes per input token measured at T = {seq} here; its MLP-wide share "
          f"({pb['wide']:.2f}) × {I8}/{INTER}, the rest × {H8}/{HIDDEN}; outside-block saved bytes per input token × "
          f"{H8}/{HIDDEN}; the head's [3 · 256, V] float32 workspace (+{workspace / 2**30:.2f} GiB) as is; with "
          "checkpointing also one block's activations, recomputed in backward. Temporaries of the ops and the "
          "weights are not in it.\n")
    print("| arm | per block (KiB / token) | blocks (GiB) | outside blocks + head (GiB) | recompute (GiB) "
          "| activations total (GiB) |")
    print("|---|---|---|---|---|---|")
    print(f"| none | {block_none / 1024:.1f} | {L8 * block_none * n8 / 2**30:.1f} "
          f"| {(outside * n8 + workspace) / 2**30:.1f} | – | {none / 2**30:.1f} |")
    print(f"| checkpointing | {block_ckpt / 1024:.1f} | {L8 * block_ckpt * n8 / 2**30:.1f} "
          f"| {(outside * n8 + workspace) / 2**30:.1f} | {block_none * n8 / 2**30:.1f} | {ckpt / 2**30:.1f} |")
    print(f"\nESTIMATE: none ÷ checkpointing = {none / ckpt:.1f}× (activation memory, not the weights' "
          f"≈ {8.0e9 * 4 / 2**30:.0f} GiB in float32)")


def speed(folder: str, seq: int, repeats: int) -> dict[str, tuple[float, float, float]]:
    arms = {f"{'sft + barrier' if b else 'sft'}, {ARMS[c]}": (c, b) for b in (False, True) for c in (False, True)}
    modules = {name: make_module(folder, c, b) for name, (c, b) in arms.items()}
    batch = make_batch(seq)
    times: dict[str, list[float]] = {name: [] for name in arms}
    losses: dict[str, float] = {}
    for k in range(repeats + 1):
        for name, module in modules.items():
            t0 = time.perf_counter()
            losses[name] = step(module, batch)
            if k:
                times[name].append(time.perf_counter() - t0)
    med = {name: statistics.median(ts) for name, ts in times.items()}

    def ratio(name: str, base: str) -> str:
        """Ratio of the medians, and (min–max) of the ratios of the steps of the same round (run back to back)."""
        paired = [x / y for x, y in zip(times[name], times[base], strict=True)]
        return f"{med[name] / med[base]:.2f} ({min(paired):.2f}–{max(paired):.2f})"

    print(f"\n### Step time (forward + backward), T = {seq}, batch 1, {repeats} timed steps per arm after 1 warm-up, "
          f"arms alternated, threads = {torch.get_num_threads()}\n")
    print("Ratios: of the medians; in brackets the min–max of the ratios of the two arms' steps in the same round.\n")
    print("| arm | min (s) | median (s) | max (s) | ckpt ÷ none | barrier ÷ sft | loss |")
    print("|---|---|---|---|---|---|---|")
    for name, ts in times.items():
        c, b = arms[name]
        ck = ratio(name, f"{'sft + barrier' if b else 'sft'}, none") if c else "1"
        br = ratio(name, f"sft, {ARMS[c]}") if b else "1"
        print(f"| {name} | {min(ts):.2f} | {med[name]:.2f} | {max(ts):.2f} | {ck} | {br} | {losses[name]:.5f} |")
    return {name: (min(ts), med[name], max(ts)) for name, ts in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seqs", type=int, nargs="+", default=[512, 1024, 2048], help="lengths of the memory runs")
    p.add_argument("--blocks", type=int, default=2, help="decoder blocks of the model (>= 2 for the difference)")
    p.add_argument("--no-diff", action="store_true", help="skip the (blocks − 1)-block runs; divide instead")
    p.add_argument("--speed-seq", type=int, nargs="*", default=[512], help="lengths of the timed runs (none: skip)")
    p.add_argument("--repeats", type=int, default=5, help="timed steps per arm after one warm-up")
    p.add_argument("--malloc", choices=["mmap", "default"], default="mmap",
                   help="glibc's allocation of the memory runs: mmap = MALLOC_MMAP_THRESHOLD_=65536 (RSS = live bytes)")
    p.add_argument("--quick", action="store_true", help="--seqs 512 1024 --no-diff")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--child-arm", choices=ARMS, help=argparse.SUPPRESS)
    p.add_argument("--child-seq", type=int, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print(json.dumps(measure(a.child, a.child_arm == "checkpointing", a.child_seq)))
        return
    if a.quick:
        a.seqs, a.no_diff = [512, 1024], True
    diff = not a.no_diff
    if a.blocks < (2 if diff else 1):
        p.error("--blocks must be >= 2 for the per-block difference (or pass --no-diff)")
    if a.repeats < 1:
        p.error("--repeats must be >= 1")
    t_start = time.perf_counter()
    print(f"Llama-3.2-1B widths (hidden {HIDDEN}, MLP {INTER}, heads {HEADS}/{KV_HEADS}×{HEAD_DIM}, vocabulary "
          f"{VOCAB}, tied), random, float32, {a.blocks} blocks; LoRA r 8 on every linear layer; chunk_size 256 "
          f"(default); prompt {PROMPT} tokens; torch {torch.__version__}, threads {torch.get_num_threads()}")
    results: dict[int, dict] = {}
    with tempfile.TemporaryDirectory(prefix="heal_ckpt_bench_") as tmp:
        counts = [a.blocks - 1, a.blocks] if diff else [a.blocks]
        folders = {}
        for n in counts:
            folders[n] = os.path.join(tmp, f"llama_{n}")
            build_model(folders[n], n)
        for n in counts:
            results[n] = {}
            for seq in a.seqs:
                for arm in ARMS:  # alternated, each in a fresh process
                    results[n][(arm, seq)] = run_child(folders[n], arm == "checkpointing", seq, a.malloc)
        top = results[a.blocks]
        if not all(r["peak_reset"] for r in top.values()):
            print("note: /proc/self/clear_refs was refused: RSS Δ is ru_maxrss growth (a loading peak can hide it)")
        runs = [r for rs in results.values() for r in rs.values()]
        same = sum(abs(r["maxrss"] - r["rss"]) <= 0.01 * r["rss"] for r in runs)
        print(f"RSS Δ from VmHWM after a reset (malloc: {a.malloc}); ru_maxrss read the same way agrees within 1% "
              f"in {same} of {len(runs)} runs (it also keeps the peak recorded when a thread exits, e.g. a loader's)")
        per_block = memory_tables(results, a.blocks, a.seqs, diff)
        for seq in a.speed_seq:
            speed(folders[a.blocks], seq, a.repeats)
        estimate(per_block, results, a.blocks, max(a.seqs))
    print(f"\n(total {time.perf_counter() - t_start:.0f} s)")


if __name__ == "__main__":
    main()
