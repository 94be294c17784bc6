"""rmse vs mean KL barrier over steer → heal rounds on the embedded SmolLM2 (issue 6's experiment).

Runs ``heal rounds`` with ``configs/rounds_rmse.yaml`` and ``configs/rounds_mean.yaml`` (same everything but
the barrier's aggregator and tau), then prints one table with the two runs side by side per round, and
writes the joint trajectory figure.

    flock /tmp/heal_heavy.lock env OMP_NUM_THREADS=2 HF_HUB_OFFLINE=1 python benchmarks/rounds_experiment.py

Re-running continues the saved runs (``--resume true``) instead of starting over.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import yaml

from heal_pl.cli import main
from heal_pl.rounds.report import trajectory_figure
from heal_pl.survival.plotting import save_figure

ROOT = Path(__file__).resolve().parents[1]


def _cell(row: dict | None, key: str, fmt: str = "{:.3f}") -> str:
    return fmt.format(row[key]) if row and key in row else "—"


def main_experiment() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=None, help="override the configs' rounds")
    parser.add_argument("--model", default=None, help="override the configs' model (tiny-llama: a smoke test)")
    parser.add_argument("--out", default="runs/rounds_experiment")
    parser.add_argument("--figure", default=str(ROOT / "docs" / "figures" / "rounds_trajectory.png"))
    args = parser.parse_args()
    out = Path(args.out)
    runs, walls, floor = {}, {}, None
    for agg in ("rmse", "mean"):
        config = ROOT / "configs" / f"rounds_{agg}.yaml"
        floor = yaml.safe_load(config.read_text())["coh_floor"]
        extra = ["--rounds", str(args.rounds)] if args.rounds else []
        extra += ["--model", args.model, "--sampling.n_prompts", "4", "--heal.steps", "2",
                  "--filter.ppl_tau", "1e9", "--filter.rep_tau", "1.0"] if args.model else []
        start = time.perf_counter()
        main(["rounds", "--config", str(config), "--out_dir", str(out / agg), "--resume", "true",
              "--progress", "false", *extra])  # fmt: skip
        walls[agg] = time.perf_counter() - start
        state = json.loads((out / agg / "state.json").read_text())
        runs[agg] = state["finished"]
        if state["stopped"]:
            print(f"{agg}: stopped at round {state['stopped']['round']}: {state['stopped']['reason']}")
    fig = trajectory_figure(runs, coh_floor=floor, title="SmolLM2-135M: steer → heal rounds, rmse vs mean barrier")
    path = save_figure(fig, out / "rounds_trajectory.png", dpi=90)
    Path(args.figure).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(path, args.figure)

    n = max(len(r) for r in runs.values())
    lines = [
        "| round | coherence healed rmse | coherence healed mean | (1−coh) mean ÷ rmse | trait healed rmse | "
        "trait healed mean | trait steered rmse | trait steered mean | κ rmse | κ mean | kept rmse | kept mean |",
        "|" + "---|" * 12,
    ]
    for r in range(n):
        a, b = (runs[k][r] if r < len(runs[k]) else None for k in ("rmse", "mean"))
        ratio = (1 - b["coherence_healed"]) / (1 - a["coherence_healed"]) if a and b else float("nan")
        lines.append(
            f"| {r} | {_cell(a, 'coherence_healed')} | {_cell(b, 'coherence_healed')} | {ratio:.2f} | "
            f"{_cell(a, 'trait_healed')} | {_cell(b, 'trait_healed')} | {_cell(a, 'trait_steered')} | "
            f"{_cell(b, 'trait_steered')} | {_cell(a, 'kappa', '{:.2f}')} | {_cell(b, 'kappa', '{:.2f}')} | "
            f"{_cell(a, 'kept', '{:d}')} | {_cell(b, 'kept', '{:d}')} |"
        )
    base = runs["rmse"][0] if runs["rmse"] else None
    table = "\n".join(lines)
    summary = (f"{table}\n\nround-0 base: coherence {_cell(base, 'coherence_base')}, trait {_cell(base, 'trait_base')}"
               f"\nwall: rmse {walls['rmse']:.0f} s, mean {walls['mean']:.0f} s; figure: {args.figure}")  # fmt: skip
    (out / "table.md").write_text(summary + "\n")
    print(summary)


if __name__ == "__main__":
    main_experiment()
