"""HealModule at Llama-3-8B's shape on one GPU: one training step of SFT and of SFT + rmse barrier, with activation
checkpointing, on a bf16 or an nf4 base. Peak memory and step time, the two arms side by side.

    python benchmarks/scale_step.py --build --folder /tmp/llama8b      # once: a random 8B model saved there (bf16)
    python benchmarks/scale_step.py --folder /tmp/llama8b              # bf16 base, batch 8 x 2048
    python benchmarks/scale_step.py --folder /tmp/llama8b --quantize nf4
    python benchmarks/scale_step.py --dry-run --build --folder /tmp/tiny8b && \\
        python benchmarks/scale_step.py --dry-run --folder /tmp/tiny8b    # the same on the CPU, tiny widths

The model is built from a config here (hidden 4096, MLP 14 336, 32 blocks, 32 / 8 heads, vocabulary 128 256,
untied head: Llama-3-8B's shape), randomly initialised, never downloaded. A step is ``HealModule.loss_terms`` on a
batch whose rows are a 64-token prompt and a completion up to ``--seq`` tokens, its backward and an AdamW step on
the adapter (LoRA r 16 on every linear layer of the blocks), under bf16 autocast. The arms alternate (SFT, barrier,
SFT, ...), one warm-up step each, then ``--repeats`` timed steps each: min / median / max seconds. Peak memory is
``torch.cuda.max_memory_allocated`` over each arm's steps (on the CPU: not measured). Prints one markdown table and
a ``RESULT {json}`` line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

LLAMA3_8B = {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
             "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 8192, "rope_theta": 500000.0,
             "tie_word_embeddings": False}  # fmt: skip
TINY = {**LLAMA3_8B, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 1024}  # fmt: skip


def build(folder: Path, dry: bool) -> None:
    """A random model of the chosen shape saved to ``folder`` in bf16 (built on the GPU when there is one)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**(TINY if dry else LLAMA3_8B), bos_token_id=0, eos_token_id=1, pad_token_id=2)
    torch.manual_seed(0)
    with torch.device("cpu" if dry else "cuda"):
        model = LlamaForCausalLM._from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder)


def batch(n: int, seq: int, vocab: int, device: torch.device) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (n, seq), generator=g)
    labels = ids.clone()
    labels[:, :64] = -100  # the prompt
    return {k: v.to(device) for k, v in
            {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}.items()}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--folder", required=True)
    p.add_argument("--build", action="store_true", help="build and save the random model, then exit")
    p.add_argument("--quantize", default="none", choices=["none", "nf4"])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--dry-run", action="store_true", help="tiny widths on the CPU (batch 2 x 128)")
    a = p.parse_args()
    if a.build:
        build(Path(a.folder), a.dry_run)
        return
    from heal_pl.adapters.lora import LoRASpec
    from heal_pl.barrier.kl import KLBarrier
    from heal_pl.module import HealModule

    device = torch.device("cpu" if a.dry_run else "cuda")
    n, seq = (2, 128) if a.dry_run else (a.batch, a.seq)
    t0 = time.perf_counter()
    module = HealModule(model=a.folder, dtype="bfloat16", quantize=a.quantize, gradient_checkpointing=True,
                        lora=LoRASpec(r=16, alpha=32.0))  # fmt: skip
    module.to(device).train()
    load_s = time.perf_counter() - t0
    arms = {"sft": KLBarrier(reg="nll"), "sft + rmse barrier": KLBarrier(reg="kl_rev", agg="rmse", tau=0.0)}
    opt = torch.optim.AdamW([q for q in module.parameters() if q.requires_grad], lr=1e-5)
    data = batch(n, seq, module.student.config.vocab_size, device)
    cuda = device.type == "cuda"
    times: dict[str, list[float]] = {k: [] for k in arms}
    peak: dict[str, float] = {k: 0.0 for k in arms}

    def step(arm: str) -> float:
        module.barrier = arms[arm]
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss, _, _ = module.loss_terms(data)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
            peak[arm] = max(peak[arm], torch.cuda.max_memory_allocated() / 2**30)
        return time.perf_counter() - start

    for arm in arms:  # warm-up
        step(arm)
    for _ in range(a.repeats):
        for arm in arms:
            times[arm].append(step(arm))
    rows = {arm: {"peak_gib": round(peak[arm], 2), "min": min(t), "median": statistics.median(t), "max": max(t)}
            for arm, t in times.items()}  # fmt: skip
    ratio = rows["sft + rmse barrier"]["median"] / rows["sft"]["median"]
    shape = "tiny (dry run)" if a.dry_run else "Llama-3-8B"
    print(f"\n{shape}, base {a.quantize if a.quantize != 'none' else 'bf16'}, checkpointing on, batch {n} x {seq}, "
          f"LoRA r 16 on every block linear; model loaded in {load_s:.0f} s\n")  # fmt: skip
    print("| arm | peak GiB | step s (min / median / max) |\n|---|---|---|")
    for arm, r in rows.items():
        print(f"| {arm} | {r['peak_gib']} | {r['min']:.2f} / {r['median']:.2f} / {r['max']:.2f} |")
    print(f"| barrier ÷ sft (median) | | {ratio:.2f} |")
    print("RESULT " + json.dumps({"rows": rows, "ratio": ratio, "quantize": a.quantize, "batch": n, "seq": seq}))


if __name__ == "__main__":
    main()
