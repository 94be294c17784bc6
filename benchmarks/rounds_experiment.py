"""Steer → heal rounds with matched barrier taus on the embedded SmolLM2 (record: docs/experiments/rounds.md).

One command per arm and seed, each a real ``heal rounds`` of ``heal_pl/configs/rounds_rmse.yaml`` with only the
barrier and the seed changed (run them one at a time; ~12–15 min each on 2 cores)::

    python benchmarks/rounds_experiment.py --arm nll --seed 0    # lam 0: the heals' own KL; sets the taus
    python benchmarks/rounds_experiment.py --arm mean --seed 0   # and rmse (p95, max); seeds 0 1 2
    python benchmarks/rounds_experiment.py --table               # the table, paired vs mean, the figure

**Matched taus**, the rule of ``benchmarks/loop_experiment.py``: ``tau_agg = M · mean(train/kl_<agg> over the
last quarter of round 0's heal steps of the nll seed-0 run)``, one ``M`` for every aggregator, so no arm is
looser by construction; ``lam = 1`` (scaled by the config's ``(1 + r)^lam_round_pow``) for all. The seed sets
the sampling noise, the fresh adapters' init and the heal data order.

Per round, besides the config's coherence / trait probes: ``loop`` = the share of the round's chosen-dose
samples whose repetition share exceeds the filter's ``rep_tau`` (the steered student's loop rate; those are
the samples the filter drops), ``rep`` = their mean repetition share, ``fired`` = the share of the heal's
steps with ``agg > tau``. ``--model tiny-llama`` is a smoke test (4 prompts, 2 heal steps, filter open).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import defaultdict
from pathlib import Path

import yaml
from loop_experiment import AGGS, LAM, M, read_scalars
from loop_report import cell

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "rounds_rmse.yaml"
ARMS = ("nll", *AGGS)
SMOKE = ["--sampling.n_prompts", "4", "--heal.steps", "2", "--filter.ppl_tau", "1e9", "--filter.rep_tau", "1.0"]


def matched_taus(rows: list[dict]) -> dict[str, float]:
    """``tau_agg = M · mean(round 0's train/kl_agg, last quarter of its steps)`` of the nll seed-0 run."""
    nll = [r for r in rows if r["arm"] == "nll" and r["seed"] == 0]
    if not nll or not nll[-1]["rounds"]:
        raise SystemExit("no finished nll seed-0 run yet: run `python benchmarks/rounds_experiment.py --arm nll "
                         "--seed 0` first (with the same --model)")  # fmt: skip
    train = nll[-1]["rounds"][0]["train"]
    return {a: M * statistics.fmean(train[f"kl_{a}"][-max(1, len(train[f"kl_{a}"]) // 4) :]) for a in AGGS}


def round_measures(run_dir: Path, metrics: dict, rep_tau: float) -> dict:
    """The round's metrics plus its samples' loop rate, the heal's per-step KL and how often it fired."""
    r = metrics["round"]
    rows = [json.loads(x) for x in (run_dir / f"round_{r:02d}" / "samples.jsonl").read_text().splitlines()]
    chosen = [s for s in rows if s["chosen"]]
    scalars = read_scalars(str(run_dir / "tb" / f"round_{r:02d}"))
    train = {k: scalars[k] for k in (*(f"kl_{a}" for a in AGGS), "barrier_fired")}
    return {**metrics, "loop": statistics.fmean(s["rep"] > rep_tau for s in chosen),
            "rep": statistics.fmean(s["rep"] for s in chosen), "fired": statistics.fmean(train["barrier_fired"]),
            "train": train}  # fmt: skip


def run_arm(arm: str, seed: int, out: Path, taus: dict[str, float] | None, extra: list[str]) -> dict:
    from heal_pl.cli import main

    config = yaml.safe_load(CONFIG.read_text())
    barrier = {"reg": "kl_rev", "agg": "mean", "tau": 0.0, "lam": 0.0, "lam_round_pow": 0.0}  # nll: KL logged
    if arm in AGGS:
        barrier = {**config["barrier"], "agg": arm, "tau": taus[arm], "lam": LAM}
    run_dir = out / f"{arm}_seed{seed}"
    main(["rounds", "--config", str(CONFIG), "--barrier", json.dumps(barrier), "--seed", str(seed),
          "--out_dir", str(run_dir), "--progress", "false", *extra])  # fmt: skip
    state = json.loads((run_dir / "state.json").read_text())
    given = extra.index("--filter.rep_tau") + 1 if "--filter.rep_tau" in extra else None
    rep_tau = float(extra[given]) if given else config["filter"]["rep_tau"]
    rounds = [round_measures(run_dir, m, rep_tau) | ({"fired": None} if arm == "nll" else {})
              for m in state["finished"]]  # fmt: skip
    return {"barrier": barrier, "rounds": rounds, "stopped": state["stopped"], "run_dir": str(run_dir)}


def by_arm(rows: list[dict]) -> dict[tuple, list[dict]]:
    out: dict[tuple, list[dict]] = defaultdict(list)
    for r in sorted(rows, key=lambda r: r["seed"]):
        out[(r["model"], " ".join(r["extra"]), r["arm"])].append(r)
    return dict(sorted(out.items(), key=lambda kv: (kv[0][:2], ARMS.index(kv[0][2]))))


def _at(rs: list[dict], r: int, key: str) -> list[float]:
    return [run["rounds"][r][key] for run in rs if r < len(run["rounds"])]


def table(rows: list[dict]) -> str:
    keys = ("coherence_healed", "trait_healed", "loop", "rep", "kept", "fired")
    lines = ["| model | arm | round | seeds | coherence healed | trait healed | loop rate of samples | "
             "repetition share | kept | fired | min/run |", "|" + "---|" * 11]  # fmt: skip
    for (model, _extra, arm), rs in by_arm(rows).items():
        minutes = statistics.fmean(r["seconds"] for r in rs) / 60
        for r in range(max(len(run["rounds"]) for run in rs)):
            cells = [cell(_at(rs, r, k), "{:.2f}" if k != "coherence_healed" else "{:.3f}") for k in keys]
            lines.append(f"| {model} | {arm} | {r} | {len(_at(rs, r, 'loop'))} | {' | '.join(cells)} | {minutes:.1f} |")
    return "\n".join(lines)


def paired(rows: list[dict]) -> str:
    """Each arm minus the mean arm of the same seed: coherence after the last round both finished, loop rate
    summed over the rounds both finished."""
    g = by_arm(rows)
    lines = ["| model | arm − mean | seeds paired | Δ coherence healed, last common round | Δ Σ loop rate | "
             "below / above / equal (Σ loop) |", "|" + "---|" * 6]  # fmt: skip
    for (model, extra, arm), rs in g.items():
        ref = {r["seed"]: r for r in g.get((model, extra, "mean"), [])}
        pairs = [(a, ref[a["seed"]]) for a in rs if a["seed"] in ref and arm != "mean"]
        pairs = [(a, b, min(len(a["rounds"]), len(b["rounds"]))) for a, b in pairs]
        pairs = [(a, b, n) for a, b, n in pairs if n]
        if not pairs:
            continue
        d_coh = [a["rounds"][n - 1]["coherence_healed"] - b["rounds"][n - 1]["coherence_healed"] for a, b, n in pairs]
        d_loop = [sum(a["rounds"][i]["loop"] - b["rounds"][i]["loop"] for i in range(n)) for a, b, n in pairs]
        counts = f"{sum(d < 0 for d in d_loop)} / {sum(d > 0 for d in d_loop)} / {sum(d == 0 for d in d_loop)}"
        lines.append(f"| {model} | {arm} | {len(pairs)} | {cell(d_coh, '{:+.3f}')} | {cell(d_loop, '{:+.2f}')} | "
                     f"{counts} |")  # fmt: skip
    return "\n".join(lines)


def report(rows: list[dict], out: Path, figure_path: Path) -> str:
    """``out/table.md`` and the trajectory figure (each arm's per-round means over its seeds)."""
    from heal_pl.rounds.report import trajectory_figure
    from heal_pl.survival.plotting import save_figure

    runs = {}
    for (_model, _extra, arm), rs in by_arm(rows).items():
        n = max(len(run["rounds"]) for run in rs)
        keys = [k for k in rs[0]["rounds"][0] if k.startswith(("trait_", "coherence_"))] if rs[0]["rounds"] else []
        runs[f"{arm} (n={len(rs)})"] = [{"round": r, **{k: statistics.fmean(_at(rs, r, k)) for k in keys}}
                                        for r in range(n)]  # fmt: skip
    floor = yaml.safe_load(CONFIG.read_text())["coh_floor"]
    fig = trajectory_figure(runs, coh_floor=floor, title="SmolLM2-135M: steer → heal rounds, matched-tau barriers")
    save_figure(fig, figure_path, dpi=90)
    taus = ", ".join(f"{a} {t:.3g}" for a, t in matched_taus(rows).items())
    text = (f"{len(rows)} runs; matched taus (M = {M}): {taus}\n\n{table(rows)}\n\npaired against the mean arm:\n\n"
            f"{paired(rows)}\n\nfigure: {figure_path}")  # fmt: skip
    (out / "table.md").write_text(text + "\n")
    return text


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arm", choices=ARMS, help="what to run (omit with --table)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default="smollm2-135m-instruct", help="tiny-llama: a smoke test")
    p.add_argument("--rounds", type=int, default=None, help="override the config's rounds")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "rounds_experiment")
    p.add_argument("--table", action="store_true", help="print the table, draw the figure (no training)")
    p.add_argument("--figure", type=Path, default=ROOT / "docs" / "figures" / "rounds_trajectory.png")
    a = p.parse_args()
    results = a.out / "results.jsonl"
    rows = [json.loads(x) for x in results.read_text().splitlines() if x.strip()] if results.is_file() else []
    if a.table:
        print(report(rows, a.out, a.figure))
        return
    if a.arm is None:
        p.error("give --arm (or --table)")
    extra = ["--model", a.model, *(["--rounds", str(a.rounds)] if a.rounds else [])]
    extra += SMOKE if a.model.startswith("tiny-") else []
    mine = [r for r in rows if r["model"] == a.model and r["extra"] == extra]
    taus = matched_taus(mine) if a.arm in AGGS else None
    a.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    row = run_arm(a.arm, a.seed, a.out, taus, extra)
    row = {"arm": a.arm, "seed": a.seed, "model": a.model, "extra": extra, "seconds": time.perf_counter() - t0,
           **row}  # fmt: skip
    with results.open("a") as f:
        f.write(json.dumps(row) + "\n")
    last = row["rounds"][-1] if row["rounds"] else {}
    print(json.dumps({"arm": a.arm, "seed": a.seed, "seconds": round(row["seconds"]), "rounds": len(row["rounds"]),
                      **{k: last.get(k) for k in ("coherence_healed", "trait_healed", "loop", "fired")}}))  # fmt: skip


if __name__ == "__main__":
    main()
