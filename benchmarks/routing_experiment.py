"""Gradient routing on the bundled hackable task: vanilla vs erase vs route, delta_hack kept and ablated.

One command per arm and seed (each a real ``heal fit`` of SmolLM2-135M-Instruct on this CPU, a few minutes;
run it under the shared lock)::

    flock /tmp/heal_heavy.lock env OMP_NUM_THREADS=2 python benchmarks/routing_experiment.py --arm base
    flock /tmp/heal_heavy.lock env OMP_NUM_THREADS=2 python benchmarks/routing_experiment.py --arm vanilla --seed 0
    flock /tmp/heal_heavy.lock env OMP_NUM_THREADS=2 python benchmarks/routing_experiment.py --arm erase --seed 0
    flock /tmp/heal_heavy.lock env OMP_NUM_THREADS=2 python benchmarks/routing_experiment.py --arm route --seed 0
    python benchmarks/routing_experiment.py --table

The seed sets ``seed_everything``, the data order (``data.seed``) and the routed adapter's frozen random
frame (``model.routed.seed``); nothing else in these runs is random. ``vanilla`` / ``erase`` / ``route``
run ``heal_pl/configs/{vanilla,erase,route}.yaml`` (arms none / erase / route of ``RouteAblateEvalCallback``);
``base`` evaluates the untrained model with the same evaluation. Each run
appends one row to ``<out>/results.jsonl`` (the final evaluation: hack and solve rates with delta_hack kept
and ablated, on the held-out split) and prints the table of every row so far, averaged over the seeds of
rows that share arm, model and overrides (rows of other settings are never pooled).
Deployment means ablated: that is the column to compare across arms.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import defaultdict
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"vanilla": "vanilla", "erase": "erase", "route": "route"}
KEYS = ("kept_hack", "kept_solve", "ablated_hack", "ablated_solve")


def evaluate_spec(config: Path) -> dict:
    """The ``evaluate`` class path and init args of the RouteAblateEvalCallback in a config."""
    spec = yaml.safe_load(config.read_text())
    for cb in spec["trainer"]["callbacks"]:
        if cb["class_path"].endswith("RouteAblateEvalCallback"):
            return cb["init_args"]["evaluate"]
    raise ValueError(f"{config} has no RouteAblateEvalCallback")


def run_base(model: str) -> dict[str, float]:
    from heal_pl.callbacks.route_ablate import build_evaluate
    from heal_pl.models.load import load_model, load_tokenizer

    evaluate = build_evaluate(evaluate_spec(ROOT / "configs" / "route.yaml"))
    lm, tok = load_model(model).eval(), load_tokenizer(model)
    with torch.no_grad():
        res = evaluate(lm, tok)
    return {"step": 0, "kept_hack": res["hack"], "kept_solve": res["solve"], "ablated_hack": res["hack"],
            "ablated_solve": res["solve"]}  # fmt: skip


def run_arm(arm: str, seed: int, out: Path, extra: list[str]) -> dict[str, float]:
    from heal_pl.callbacks import RouteAblateEvalCallback
    from heal_pl.cli import build_cli

    args = [
        "fit", "--config", str(ROOT / "configs" / f"{CONFIGS[arm]}.yaml"), "--seed_everything", str(seed),
        "--trainer.logger.init_args.save_dir", str(out), "--trainer.logger.init_args.name", f"{arm}_seed{seed}",
        "--data.seed", str(seed), "--model.routed.seed", str(seed),  # data order and the frozen A of the knobs
        "--trainer.enable_progress_bar", "false", *extra,
    ]  # fmt: skip
    cli = build_cli(args)
    (cb,) = [c for c in cli.trainer.callbacks if isinstance(c, RouteAblateEvalCallback)]
    return {**cb.history[-1], "log_dir": cli.trainer.log_dir}


def table(rows: list[dict]) -> str:
    """Mean ± sd over seeds of the rows that share arm, model and overrides (one line per such group)."""
    groups: dict[tuple[str, str, str], list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["arm"], r.get("model", ""), " ".join(r.get("extra", [])))].append(r)
    lines = [
        "| arm | model | overrides | seeds | hack kept | solve kept | hack ablated | solve ablated | min/run |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    order = {arm: i for i, arm in enumerate(("base", "vanilla", "erase", "route"))}
    for (arm, model, extra), rs in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][2], order[kv[0][0]])):

        def cell(key: str, rs: list[dict] = rs) -> str:
            vals = [r[key] for r in rs]
            sd = f" ± {statistics.stdev(vals):.3f}" if len(vals) > 1 else ""
            return f"{statistics.fmean(vals):.3f}{sd}"

        seeds = ",".join(str(r["seed"]) for r in rs)
        minutes = statistics.fmean(r["seconds"] for r in rs) / 60
        cells = " | ".join(cell(k) for k in KEYS)
        lines.append(f"| {arm} | {model} | {extra or '–'} | {seeds} | {cells} | {minutes:.1f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arm", choices=["base", *CONFIGS], help="what to run (omit with --table)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "routing_experiment")
    p.add_argument("--table", action="store_true", help="only print the table of the results so far")
    p.add_argument("extra", nargs="*", help="more `heal fit` overrides, after --, e.g. -- --trainer.max_steps=10")
    a = p.parse_args()
    results = a.out / "results.jsonl"
    if not a.table:
        if a.arm is None:
            p.error("give --arm (or --table)")
        a.out.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        row = run_base(a.model) if a.arm == "base" else run_arm(a.arm, a.seed, a.out, ["--model.model", a.model,
                                                                                       *a.extra])  # fmt: skip
        row = {"arm": a.arm, "seed": a.seed, "model": a.model, "threads": torch.get_num_threads(),
               "seconds": time.perf_counter() - t0, "extra": a.extra, **row}  # fmt: skip
        with results.open("a") as f:
            f.write(json.dumps(row) + "\n")
    rows = [json.loads(line) for line in results.read_text().splitlines() if line.strip()] if results.is_file() else []
    print(f"{results} ({len(rows)} runs); rates on the held-out split, greedy decoding")
    print(table(rows))


if __name__ == "__main__":
    main()
