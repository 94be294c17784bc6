"""The table, paired comparison and figure of ``benchmarks/loop_experiment.py`` (``--table``).

Rows are pooled only when they share arm, loop share, model and overrides; each cell is mean ± sd over seeds.
The paired comparison matches each barrier arm's seed with the mean arm's run of the same seed and share
(same data order and LoRA init): mean ± sd of the per-seed difference and how many seeds it is below / above.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from pathlib import Path

ORDER = ("base", "clean", "nll", "mean", "rmse", "p95", "max")
COLOURS = {"base": "0.6", "clean": "0.3", "nll": "tab:red", "mean": "tab:orange", "rmse": "tab:blue",
           "p95": "tab:green", "max": "tab:purple"}  # fmt: skip
RATES = ("loop_inj", "sampled_loop_inj", "p_loop", "loop_rep", "style", "sampled_style")
VAL = ("kl_mean", "kl_rmse", "kl_p95", "kl_max")


def _cell(vals: list[float], fmt: str = "{:.3f}") -> str:
    vals = [v for v in vals if v is not None]
    if not vals:
        return "–"
    sd = f" ± {fmt.format(statistics.stdev(vals))}" if len(vals) > 1 else ""
    return fmt.format(statistics.fmean(vals)) + sd


def groups(rows: list[dict]) -> dict[tuple, list[dict]]:
    """Rows keyed by (share, arm, model, overrides + steps), seeds in order."""
    out: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        steps = f"steps {r.get('steps', 36)}" if r["arm"] != "base" else "untrained"
        steps += f", m {r['m']:g}" if r.get("m", 1.5) != 1.5 else ""  # a second matched-tau setting
        out[(r["share"] or 0, r["arm"], r["model"], " ".join([steps, *r["extra"]]))].append(r)
    for rs in out.values():
        rs.sort(key=lambda r: r["seed"])
    return dict(sorted(out.items(), key=lambda kv: (kv[0][2], kv[0][3], kv[0][0], ORDER.index(kv[0][1]))))


def main_table(rows: list[dict]) -> str:
    head = ("| loop share | arm | schedule | seeds | injected loop, greedy | injected loop, sampled | p_loop | "
            "repetition > rep_tau | pirate style | pirate style, sampled | val KL mean | val KL rmse | val KL p95 | "
            "val KL max | rmse ÷ mean | fired | min/run |")  # fmt: skip
    lines = [head, "|" + "---|" * 17]
    for (share, arm, _model, extra), rs in groups(rows).items():
        val = {k: [r["val"][k] for r in rs] if "val" in rs[0] else [] for k in VAL}
        ratio = [r["val"]["kl_rmse"] / r["val"]["kl_mean"] for r in rs if "val" in r and r["val"]["kl_mean"] > 0]
        cells = [_cell([r.get(k) for r in rs], "{:.2g}" if k == "p_loop" else "{:.2f}") for k in RATES]
        cells += [_cell(val[k]) for k in VAL] + [_cell(ratio, "{:.2f}"), _cell([r.get("fired") for r in rs], "{:.2f}")]
        seeds = ",".join(str(r["seed"]) for r in rs)
        minutes = statistics.fmean(r["seconds"] for r in rs) / 60
        where = f"{share} %" if share else "clean"
        lines.append(f"| {where} | {arm} | {extra} | {seeds} | {' | '.join(cells)} | {minutes:.1f} |")
    return "\n".join(lines)


def paired_table(rows: list[dict]) -> str:
    """Each arm minus the mean arm, seed by seed (same share, model, overrides)."""
    g = groups(rows)
    lines = ["| loop share | schedule | arm − mean | seeds paired | Δ injected loop, sampled | below / above / equal | "
             "Δ pirate style | Δ val KL rmse |", "|" + "---|" * 8]  # fmt: skip
    for (share, arm, model, extra), rs in g.items():
        ref = {r["seed"]: r for r in g.get((share, "mean", model, extra), [])}
        pairs = [(r, ref[r["seed"]]) for r in rs if r["seed"] in ref]
        if arm == "mean" or not share or not pairs:
            continue
        d_loop = [a["sampled_loop_inj"] - b["sampled_loop_inj"] for a, b in pairs]
        d_style = [a["style"] - b["style"] for a, b in pairs]
        d_rmse = [a["val"]["kl_rmse"] - b["val"]["kl_rmse"] for a, b in pairs]
        counts = f"{sum(d < 0 for d in d_loop)} / {sum(d > 0 for d in d_loop)} / {sum(d == 0 for d in d_loop)}"
        lines.append(f"| {share} % | {extra} | {arm} | {len(pairs)} | {_cell(d_loop, '{:+.3f}')} | {counts} | "
                     f"{_cell(d_style, '{:+.3f}')} | {_cell(d_rmse, '{:+.3f}')} |")  # fmt: skip
    return "\n".join(lines)


def figure(rows: list[dict]):
    """Sampled injected-loop rate against pirate-style rate per arm, a panel per loop share and schedule."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    g = groups(rows)
    panels = sorted({(k[0], k[3]) for k in g if k[0]})
    n = max(len(panels), 1)
    fig, axes = plt.subplots(1, n, figsize=(5.2 * n, 4.2), squeeze=False)
    for ax, (share, schedule) in zip(axes[0], panels, strict=False):
        for (s, arm, _m, extra), rs in g.items():
            if not (s == share and extra == schedule) and not (s == 0 and (extra == schedule or arm == "base")):
                continue
            rs = [r for r in rs if "sampled_loop_inj" in r]
            if not rs:
                continue
            xs, ys = [r["style"] for r in rs], [r["sampled_loop_inj"] for r in rs]
            ax.scatter(xs, ys, color=COLOURS[arm], alpha=0.45, s=28)
            ax.scatter([statistics.fmean(xs)], [statistics.fmean(ys)], color=COLOURS[arm], s=110, marker="D",
                       edgecolor="black", label=f"{arm} (n={len(rs)})")  # fmt: skip
        ax.set(xlabel="pirate-style rate (held-out, greedy)", ylabel="injected-loop rate (sampled, T = 1)",
               xlim=(-0.03, 1.03), ylim=(-0.01, 0.3), title=f"{share} % loop data, {schedule}")  # fmt: skip
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper left")
    fig.suptitle("SmolLM2-135M: matched-tau barriers (points = seeds, diamond = their mean)")
    fig.tight_layout()
    return fig


def report(rows: list[dict], taus: dict[tuple[int, float], dict[str, float]], out: Path, figure_path: Path) -> str:
    """Write ``out/table.md``, the figure (``figure_path`` and TensorBoard ``loop_experiment/loop_vs_style``)."""
    from torch.utils.tensorboard import SummaryWriter

    from heal_pl.survival.plotting import save_figure

    fig = figure(rows)
    save_figure(fig, figure_path, dpi=90)
    fig = figure(rows)
    writer = SummaryWriter(str(out / "summary"))
    writer.add_figure("loop_experiment/loop_vs_style", fig, 0)
    writer.close()
    tau_line = "; ".join(f"{steps} steps, m {m:g}: " + ", ".join(f"{a} {t:.3g}" for a, t in by_agg.items())
                         for (steps, m), by_agg in taus.items())
    text = (f"{len(rows)} runs; matched taus: {tau_line}\n\n{main_table(rows)}\n\npaired against the mean arm:\n\n"
            f"{paired_table(rows)}\n\nfigure: {figure_path}; TensorBoard: {out / 'summary'}")  # fmt: skip
    (out / "table.md").write_text(text + "\n")
    return text
