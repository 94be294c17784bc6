"""Throughput of `heal fit` with DDP on N CPU processes (gloo) ÷ one process, at the same global batch.

    python benchmarks/ddp_throughput.py --steps 6 --global-batch 8 --repeats 5

Runs `heal fit --config rmse` in subprocesses, the two arms alternated `--repeats` times: one process with batch B
and all the machine's threads, then `--trainer.strategy ddp --trainer.devices N` with batch B / N per process and
threads / N each. Seconds per step of a run are the median over its steps of the TensorBoard wall times of
`train/loss` (the first step, which includes warm-up, is left out); the table gives min / median / max over the
repeats, and the ratio of the medians.
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
    p.add_argument("--repeats", type=int, default=5, help="alternating runs of each arm")
    p.add_argument("--global-batch", type=int, default=8)
    p.add_argument("--devices", type=int, default=2)
    p.add_argument("--model", default="smollm2-135m-instruct")
    a = p.parse_args()
    threads = os.cpu_count() or 1
    common = ["--trainer.max_steps", str(a.steps), "--model.model", a.model]
    per = max(1, threads // a.devices)
    ddp_args = [*common, "--data.batch_size", str(a.global_batch // a.devices), "--trainer.strategy", "ddp",
                "--trainer.devices", str(a.devices)]  # fmt: skip
    one: list[float] = []
    ddp: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.repeats):
            one.append(seconds_per_step([*common, "--data.batch_size", str(a.global_batch)], threads,
                                        Path(tmp) / f"one{r}"))  # fmt: skip
            ddp.append(seconds_per_step(ddp_args, per, Path(tmp) / f"ddp{r}"))
    print(f"model={a.model} global batch={a.global_batch} steps={a.steps} cpu threads={threads} repeats={a.repeats}")
    print("| run | min s / step | median | max | steps/s ÷ one process (medians) |\n|---|---|---|---|---|")
    for name, ts in ((f"1 process, {threads} threads", one), (f"DDP {a.devices} processes (gloo), {per} thread(s) "
                                                               "each", ddp)):  # fmt: skip
        ratio = statistics.median(one) / statistics.median(ts)
        print(f"| {name} | {min(ts):.2f} | {statistics.median(ts):.2f} | {max(ts):.2f} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
