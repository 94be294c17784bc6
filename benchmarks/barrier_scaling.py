"""How the barrier's cost grows: step-cost ratio against sequence length, loss memory and time against vocabulary.

    OMP_NUM_THREADS=2 python benchmarks/barrier_scaling.py

Two tables, each cell from the benchmark named, run as a subprocess with the same settings:

- sequence length (64 → 1024, SmolLM2, batch 2): ``barrier_cost.py --two-arms``: median step time of SFT and of
  SFT + rmse barrier (5 timed steps after one warm-up, alternated), their ratio, and the counted rows;
- vocabulary (32k → 262k, a random ``V × 576`` head, 3072 counted rows): ``barrier_memory.py``: peak memory of
  heal_pl's fused head and of the lean naive arm (each in a fresh process), and the fused head's time per
  forward + backward (``--speed``, 3 timed runs).

The goal is a cost linear in the work: the ratio flat in sequence length (both arms grow alike), the fused head's
memory flat in the number of rows and linear in V (one ``[3 · 256, V]`` workspace), its time linear in rows × V.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
HEAL, LEAN = "heal_pl token_stats", "lean naive (counted rows)"


def run(script: str, *args: str) -> str:
    out = subprocess.run([sys.executable, str(HERE / script), *args], capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"{script} {' '.join(args)} failed:\n{out.stderr[-3000:]}")
    return out.stdout


def cell(table: str, arm: str, column: int) -> float:
    """The ``column``-th number of the markdown row of ``arm``."""
    row = next(line for line in table.splitlines() if line.startswith(f"| {arm} |"))
    return float(row.strip("|").split("|")[column].strip())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--seqs", type=int, nargs="*", default=[64, 256, 1024])
    p.add_argument("--vocabs", type=int, nargs="*", default=[32768, 65536, 131072, 262144])
    a = p.parse_args()
    print("| sequence length | counted rows | sft (s) | sft + barrier (s) | ratio |\n|---|---|---|---|---|")
    for seq in a.seqs:
        out = run("barrier_cost.py", "--model", a.model, "--batch", "2", "--seq", str(seq), "--steps", "5",
                  "--two-arms")  # fmt: skip
        rows = re.search(r"counted rows=(\d+)", out).group(1)
        sft, bar = cell(out, "sft", 2), cell(out, "barrier", 2)
        print(f"| {seq} | {rows} | {sft:.2f} | {bar:.2f} | {bar / sft:.2f} |", flush=True)
    print("\n| vocabulary | fused head peak (MiB) | lean naive peak (MiB) | ÷ | fused head s / fwd+bwd |")
    print("|---|---|---|---|---|")
    for vocab in a.vocabs:
        mem = run("barrier_memory.py", "--vocab", str(vocab), "--arms", LEAN, HEAL)
        speed = run("barrier_memory.py", "--vocab", str(vocab), "--arms", HEAL, "--speed", "--repeats", "3")
        heal, lean = cell(mem, HEAL, 1), cell(mem, LEAN, 1)
        print(f"| {vocab} | {heal:.0f} | {lean:.0f} | {heal / lean:.3f} | {cell(speed, HEAL, 2):.2f} |", flush=True)


if __name__ == "__main__":
    main()
