"""``heal survival`` end to end, this checkout against an earlier commit: wall time and whether the tables agree.

    OMP_NUM_THREADS=2 python benchmarks/survival_speed.py --before 63bafbd --quick            # 5 repeats per arm
    OMP_NUM_THREADS=2 python benchmarks/survival_speed.py --before 63bafbd --repeats 1        # the shipped config, once

Each arm is the ``heal survival`` command of one checkout (the ``--before`` commit, checked out with ``git worktree``
into a temporary folder, or this one), run in a fresh subprocess with its own ``PYTHONPATH`` and ``out_dir`` and the
same model cache; the arms alternate (before, after, before, after, …) so a slow spell of a shared machine hits
both. Every run calibrates c* itself (no ``calib_json``), so the time is the whole command: model load,
calibration, probe check, every α of the sweep and the outputs. ``--quick`` runs a smaller sweep for the repeats
(α ∈ {0, 1}, the ``+`` sign only, 8 evaluation prompts, 3 calibration evaluations). Extra ``heal survival`` flags
after ``--`` go to both arms (e.g. ``-- --batch_size 24``).

The tables are compared α by α (deaths, censored, ``t_half``) and prompt by prompt: a death that flips between the
arms must have a pmass within ``--flip-tol`` (1e-5) of the threshold at the fork where it flips, else the script
says so and exits 1. The largest pmass and KL p95 differences are printed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
QUICK = ["--alphas", "[0.0, 1.0]", "--signs", "[1]", "--n_eval", "8", "--calibration.max_iters", "3"]


def run_arm(source: Path, out: Path, config: str, extra: list[str]) -> float:
    """Seconds of one ``heal survival`` run of the checkout at ``source`` (its outputs in ``out``)."""
    env = {**os.environ, "PYTHONPATH": str(source), "HF_HUB_OFFLINE": "1"}
    # PYTHONPATH (before an installed heal_pl on sys.path; the working folder is the run's own) picks the checkout
    code = (f"import sys, heal_pl; assert heal_pl.__file__.startswith({str(source)!r}), heal_pl.__file__; "
            "from heal_pl.cli import main; main(sys.argv[1:])")
    cmd = [sys.executable, "-c", code, "survival", "--config", config, "--out_dir", str(out), *extra]
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, cwd=out.parent, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"{source}: heal survival failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return seconds


def compare(before: Path, after: Path) -> list[str]:
    """Differences between two runs' tables that a pmass within the tolerance of the threshold does not explain."""
    a, b = (json.loads((p / "summary.json").read_text()) for p in (before, after))
    trs_a, trs_b = (json.loads((p / "trajectories.json").read_text())["trajectories"] for p in (before, after))
    threshold = b["config"]["threshold"]
    problems = []
    pairs = {(t["label"], t["prompt_index"]): t for t in trs_a}
    pm_diff, flips = 0.0, 0
    for t in trs_b:
        old = pairs[(t["label"], t["prompt_index"])]
        x, y = (np.array([np.nan if v is None else v for v in s["pmass"]]) for s in (old, t))
        both = ~np.isnan(x) & ~np.isnan(y)
        pm_diff = max(pm_diff, float(np.abs(x[both] - y[both]).max(initial=0.0)))
        if old["died"] != t["died"] or old["duration"] != t["duration"]:
            flips += 1
            near = np.abs(np.where(both, x, np.inf) - threshold) <= FLIP_TOL
            if not near.any():
                problems.append(f"{t['label']} prompt {t['prompt_index']}: died {old['died']}→{t['died']}, "
                                f"duration {old['duration']}→{t['duration']}, no pmass within {FLIP_TOL} of "
                                f"{threshold}")  # fmt: skip
    kl = max(abs(r["kl_p95"] - s["kl_p95"]) / max(abs(r["kl_p95"]), 1e-12)
             for r, s in zip(a["table"], b["table"], strict=True))  # fmt: skip
    print(f"  max |Δ pmass| {pm_diff:.2e}; max relative Δ kl_p95 {kl:.2e}; {flips} deaths flipped")
    for r, s in zip(a["table"], b["table"], strict=True):
        print(f"  α {r['label']:>5}: died {r['died']:>3} / {s['died']:<3} censored {r['censored']:>3} / "
              f"{s['censored']:<3} t_half {r['t_half']} / {s['t_half']}")  # fmt: skip
    return problems


def main() -> None:
    global FLIP_TOL
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", required=True, help="the commit to compare with (e.g. 63bafbd)")
    parser.add_argument("--config", default="survival")
    parser.add_argument("--quick", action="store_true", help="a smaller sweep (module docstring)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--flip-tol", type=float, default=1e-5)
    args, extra = parser.parse_known_args()
    FLIP_TOL = args.flip_tol
    extra = [x for x in extra if x != "--"] + (QUICK if args.quick else [])
    with tempfile.TemporaryDirectory(prefix="survival_speed_") as tmp:
        worktree = Path(tmp) / "before"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(worktree), args.before],
                       check=True, capture_output=True)  # fmt: skip
        try:
            times: dict[str, list[float]] = {"before": [], "after": []}
            problems: list[str] = []
            for r in range(args.repeats):
                outs = {}
                for arm, source in (("before", worktree), ("after", ROOT)):
                    outs[arm] = Path(tmp) / f"{arm}_{r}"
                    outs[arm].mkdir()
                    times[arm].append(run_arm(source, outs[arm], args.config, extra))
                    print(f"repeat {r + 1}: {arm} {times[arm][-1]:.1f} s", flush=True)
                problems += compare(outs["before"], outs["after"])
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(worktree)], check=False)
    print(f"\nheal survival --config {args.config} {' '.join(extra)}  ({args.repeats} run(s) per arm, alternated)")
    print("| arm | min s | median s | max s |\n|---|---|---|---|")
    for arm, ts in times.items():
        print(f"| {arm} ({args.before if arm == 'before' else 'this checkout'}) | {min(ts):.1f} | "
              f"{statistics.median(ts):.1f} | {max(ts):.1f} |")  # fmt: skip
    ratios = [b / a for b, a in zip(times["before"], times["after"], strict=True)]
    print(f"speed-up (before ÷ after): median {statistics.median(ratios):.2f}× "
          f"(per repeat {min(ratios):.2f}–{max(ratios):.2f}×)")  # fmt: skip
    if problems:
        print("\n".join(["UNEXPLAINED DIFFERENCES:", *problems]))
        sys.exit(1)


FLIP_TOL = 1e-5

if __name__ == "__main__":
    main()
