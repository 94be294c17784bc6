"""Throughput of `heal fit` with DDP on N CPU processes (gloo) ÷ one process, at the same global batch.

    python benchmarks/ddp_throughput.py --steps 6 --global-batch 8

Runs `heal fit --config rmse` twice in subprocesses: one process with batch B and all the
machine's threads, then `--trainer.strategy ddp --trainer.devices N` with batch B / N per process and
threads / N each. Seconds per step are taken from the TensorBoard wall times of `train/loss`
(the first step, which includes warm-up, is left out).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

ROOT = Path(__file__).resolve().parents[1]


def seconds_per_step(args: list[str], threads: int, out: Path) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    cmd = [
        sys.executable, "-m", "heal_pl.cli", "fit", "--config", str(ROOT / "configs" / "rmse.yaml"),
        "--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar", "false",
        "--trainer.logger.init_args.save_dir", str(out), *args,
    ]  # fmt: skip
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    events = EventAccumulator(str(next(out.rglob("events.out.tfevents.*")).parent))
    events.Reload()
    walls = [e.wall_time for e in events.Scalars("train/loss")]
    return statistics.median(b - a for a, b in zip(walls[1:], walls[2:], strict=False))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--global-batch", type=int, default=8)
    p.add_argument("--devices", type=int, default=2)
    p.add_argument("--model", default="smollm2-135m-instruct")
    a = p.parse_args()
    threads = os.cpu_count() or 1
    common = ["--trainer.max_steps", str(a.steps), "--model.model", a.model]
    with tempfile.TemporaryDirectory() as tmp:
        one = seconds_per_step([*common, "--data.batch_size", str(a.global_batch)], threads, Path(tmp) / "one")
        ddp = seconds_per_step(
            [*common, "--data.batch_size", str(a.global_batch // a.devices), "--trainer.strategy", "ddp",
             "--trainer.devices", str(a.devices)],
            max(1, threads // a.devices), Path(tmp) / "ddp",
        )  # fmt: skip
    print(f"model={a.model} global batch={a.global_batch} steps={a.steps} cpu threads={threads}")
    print("| run | s / step | steps/s ÷ one process |\n|---|---|---|")
    print(f"| 1 process, {threads} threads | {one:.2f} | 1.00 |")
    per = max(1, threads // a.devices)
    print(f"| DDP {a.devices} processes (gloo), {per} thread(s) each | {ddp:.2f} | {one / ddp:.2f} |")


if __name__ == "__main__":
    main()
