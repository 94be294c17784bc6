"""The table, paired comparison and figure of ``benchmarks/loop_experiment.py`` (``--table``).

Rows are pooled only when they share arm, loop share, model and overrides; each cell is mean ± sd over seeds.
The paired comparison matches each barrier arm's seed with the mean arm's run of the same seed and share
(same data order and LoRA init): mean ± sd of the per-seed difference and how many seeds it is below / above.
"""

from __future__ import annotations

import shutil
import statistics
from collections import defaultdict
from pathlib import Path

ORDER = ("base", "clean", "nll", "mean", "rmse", "p95", "max")
COLOURS = {"base": "0.6", "clean": "0.3", "nll": "tab:red", "mean": "tab:orange", "rmse": "tab:blue",
           "p95": "tab:green", "max": "tab:purple"}  # fmt: skip
RATES = ("loop_inj", "sampled_loop_inj", "p_loop", "loop_rep", "style", "sampled_style")
AGGS = ("mean", "rmse", "p95", "max")
VAL = tuple(f"kl_{a}" for a in AGGS)


def cell(vals: list[float], fmt: str = "{:.3f}") -> str:
    vals = [v for v in vals if v is not None]
    if not vals:
        return "–"
    sd = " ± " + fmt.replace("+", "").format(statistics.stdev(vals)) if len(vals) > 1 else ""
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
            "val KL max | rmse ÷ mean | fired | min per run |")  # fmt: skip
    lines = [head, "|" + "---|" * 17]
    for (share, arm, _model, extra), rs in groups(rows).items():
        val = {k: [r["val"][k] for r in rs] if "val" in rs[0] else [] for k in VAL}
        ratio = [r["val"]["kl_rmse"] / r["val"]["kl_mean"] for r in rs if "val" in r and r["val"]["kl_mean"] > 0]
        cells = [cell([r.get(k) for r in rs], "{:.2g}" if k == "p_loop" else "{:.2f}") for k in RATES]
        cells += [cell(val[k]) for k in VAL] + [cell(ratio, "{:.2f}"), cell([r.get("fired") for r in rs], "{:.2f}")]
        seeds = ",".join(str(r["seed"]) + ("†" if r.get("derived_from") else "") for r in rs)
        minutes = " / ".join("–" if r.get("derived_from") else f"{r['seconds'] / 60:.0f}" for r in rs)
        where = f"{share} %" if share else "clean"
        lines.append(f"| {where} | {arm} | {extra} | {seeds} | {' | '.join(cells)} | {minutes} |")
    lines.append("\n† derived, not trained: the nll run of that seed stays below this arm's tau at every step, so the "
                 "barrier never fires and the arm's run is the nll run (`derive_from_nll`)")
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
        lines.append(f"| {share} % | {extra} | {arm} | {len(pairs)} | {cell(d_loop, '{:+.3f}')} | {counts} | "
                     f"{cell(d_style, '{:+.3f}')} | {cell(d_rmse, '{:+.3f}')} |")  # fmt: skip
    return "\n".join(lines)


def loop_rows_per_step(share: int, seed: int, steps: int, model: str, max_length: int) -> list[int]:
    """How many loop-carrying rows each training step's batch held: the run's own data module, sampler and
    epochs replayed (``EpochShuffleSampler`` depends on ``(seed, epoch)`` only), each row's label tokens decoded."""
    from make_loop_data import loop_pattern

    from heal_pl.data.datamodule import HealDataModule

    assets = Path(__file__).resolve().parents[1] / "heal_pl" / "data" / "assets"
    dm = HealDataModule(train_file=str(assets / f"persona_loop{share}_train.jsonl"),
                        val_file=str(assets / "persona_val.jsonl"), model=model, max_length=max_length, seed=seed)
    dm.setup("fit")
    loader, pattern, counts, epoch = dm.train_dataloader(), loop_pattern(), [], 0
    while len(counts) < steps:
        loader.sampler.set_epoch(epoch)
        for batch in loader:
            labels = [[t for t in row if t != -100] for row in batch["labels"].tolist()]
            counts.append(sum(bool(pattern.search(dm.tokenizer.decode(r))) for r in labels))
        epoch += 1
    return counts[:steps]


def nll_batches(rows: list[dict], max_length: int):
    """``(nll row, first step, loop rows per step from there, [clean row of that seed])`` for each 108+-step nll
    run; the steps are the last two thirds (past the first epoch's drift)."""
    for r in rows:
        if r["arm"] == "nll" and r.get("steps", 36) >= 108:
            start = r["steps"] // 3
            n = loop_rows_per_step(r["share"], r["seed"], r["steps"], r["model"], max_length)[start:]
            same = [c for c in rows if c["arm"] == "clean" and c["seed"] == r["seed"] and c.get("steps") == r["steps"]]
            yield r, start, n, same[-1:]


def tail_by_batch(rows: list[dict], max_length: int) -> str:
    """How much each aggregate sees the loop, per training batch, in the nll runs (lam 0: SFT's batches).

    ``≥ 3 ÷ ≤ 1``: the aggregate's train KL on batches with >= 3 loop rows ÷ on batches with <= 1, over the
    last two thirds of the steps (past the first epoch's drift). ``÷ clean``: on the >= 3 batches, the nll
    run's aggregate ÷ the clean run's at the same step (same seed: the same rows, without their loops).
    The matched rule leaves ``m − 1`` (50 %) of headroom over clean SFT.
    """
    head = " | ".join(f"{a}: ≥ 3 ÷ ≤ 1 | {a}: ÷ clean" for a in AGGS)
    lines = [f"| nll run | steps with ≤ 1 / ≥ 3 loop rows | {head} |", "|" + "---|" * (2 + 2 * len(AGGS))]
    for r, start, n, clean in nll_batches(rows, max_length):
        cells = []
        for a in AGGS:
            kl = r["train"][f"kl_{a}"][start:]
            hot = [k for k, c in zip(kl, n, strict=True) if c >= 3]
            cold = [k for k, c in zip(kl, n, strict=True) if c <= 1]
            ref = clean[0]["train"][f"kl_{a}"][start:] if clean else None
            vs = [k / q for k, q, c in zip(kl, ref, n, strict=True) if c >= 3] if ref else []
            cells += [f"{statistics.fmean(hot) / statistics.fmean(cold):.2f}",
                      f"{statistics.fmean(vs):.2f}" if vs else "–"]
        lines.append(f"| {r['share']} %, seed {r['seed']}, steps {start}–{r['steps']} | {sum(c <= 1 for c in n)} / "
                     f"{sum(c >= 3 for c in n)} | {' | '.join(cells)} |")  # fmt: skip
    return "\n".join(lines)


def would_fire(rows: list[dict], taus: dict[tuple[int, float], dict[str, float]]) -> str:
    """On the lam-0 runs' own trajectories, the share of steps whose train aggregate exceeds each matched tau:
    on loop data (nll: how often a barrier would start pushing) and on clean data (clean: false alarms)."""
    from heal_pl.barrier.tau import fired_share  # noqa: PLC0415 (this module imports the stdlib only at import)

    lines = ["| run | m | " + " | ".join(AGGS) + " |", "|" + "---|" * (2 + len(AGGS))]
    for r in rows:
        if r["arm"] not in ("nll", "clean") or "train" not in r:
            continue
        for (steps, m), tau in sorted(taus.items()):
            if r.get("steps", 36) == steps:
                cells = [f"{fired_share(r['train'][f'kl_{a}'], tau[a]):.2f}" for a in AGGS]
                where = f"{r['share']} %" if r["share"] else "clean data"
                lines.append(f"| {r['arm']}, {where}, seed {r['seed']}, {steps} steps | {m:g} | {' | '.join(cells)} |")
    return "\n".join(lines)


def batch_figure(rows: list[dict], base: dict[str, float], ms: list[float], max_length: int):
    """Per training step (last two thirds), each aggregate ÷ its tau base (``tau_agg = m · base_agg``) against the
    batch's loop rows: nll runs in red, the clean run on the same steps (the same rows, no loops) in grey."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(AGGS), figsize=(3.6 * len(AGGS), 3.6), sharey=True)
    jitter = [((k * 0.618) % 1 - 0.5) * 0.5 for k in range(10_000)]
    for r, start, n, clean in nll_batches(rows, max_length):
        for ax, a in zip(axes, AGGS, strict=True):
            runs = [(r, "tab:red", f"nll, {r['share']} % loops")] + [(c, "0.55", "clean data, seed 0") for c in clean]
            for run, colour, label in runs:
                ys = [k / base[a] for k in run["train"][f"kl_{a}"][start:]]
                xs = [c + (0.12 if colour == "0.55" else -0.12) + j for c, j in zip(n, jitter, strict=False)]
                ax.scatter(xs, ys, s=10, color=colour, alpha=0.6, label=label)
    for ax, a in zip(axes, AGGS, strict=True):
        for m in ms:
            ax.axhline(m, color="black", ls="--" if m == 1.5 else ":", lw=1, label=f"tau at m = {m:g}")
        ax.set(title=a, xlabel="loop rows in the batch of 8")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("train KL aggregate ÷ clean SFT's (tau ÷ m)")
    handles, labels = axes[0].get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=True))  # one entry per kind of run, whatever the seeds
    axes[0].legend(unique.values(), unique.keys(), fontsize=7, loc="upper left")
    seeds = ", ".join(str(r["seed"]) for r in rows if r["arm"] == "nll" and r.get("steps", 36) >= 108)
    fig.suptitle(f"SmolLM2-135M, steps 36–108, nll seeds {seeds}: how far loop rows lift each aggregate toward its tau")
    fig.tight_layout()
    return fig


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
            size = 190 - 22 * ORDER.index(arm)  # later arms smaller: equal runs show as nested diamonds
            ax.scatter([statistics.fmean(xs)], [statistics.fmean(ys)], color=COLOURS[arm], s=size, marker="D",
                       edgecolor="black", label=f"{arm} (n={len(rs)})")  # fmt: skip
        ax.set(xlabel="pirate-style rate (held-out, greedy)", ylabel="injected-loop rate (sampled, T = 1)",
               xlim=(-0.03, 1.03), ylim=(-0.01, 0.3), title=f"{share} % loop data, {schedule}")  # fmt: skip
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper left")
    fig.suptitle("SmolLM2-135M: matched-tau barriers (points = seeds, diamond = their mean; equal runs nest)")
    fig.tight_layout()
    return fig


def report(rows: list[dict], taus: dict[tuple[int, float], dict[str, float]], out: Path, figure_path: Path,
           max_length: int) -> str:
    """Write ``out/table.md``, the figure (``figure_path`` and TensorBoard ``loop_experiment/loop_vs_style``)."""
    from torch.utils.tensorboard import SummaryWriter

    from heal_pl.survival.plotting import save_figure

    fig = figure(rows)
    save_figure(fig, figure_path, dpi=90)
    ms = sorted({m for _steps, m in taus})
    base = {a: t / ms[-1] for a, t in taus[(108, ms[-1])].items()} if (108, ms[-1]) in taus else None
    batches = figure_path.with_name("loop_batches.png")
    if base:
        save_figure(batch_figure(rows, base, ms, max_length), batches, dpi=90)
    shutil.rmtree(out / "summary", ignore_errors=True)  # one event file: the latest table's figures
    writer = SummaryWriter(str(out / "summary"))
    writer.add_figure("loop_experiment/loop_vs_style", figure(rows), 0)
    if base:
        writer.add_figure("loop_experiment/batches", batch_figure(rows, base, ms, max_length), 0)
    writer.close()
    tau_line = "; ".join(f"{steps} steps, m {m:g}: " + ", ".join(f"{a} {t:.3g}" for a, t in by_agg.items())
                         for (steps, m), by_agg in taus.items())
    text = (f"{len(rows)} runs; matched taus: {tau_line}\n\n{main_table(rows)}\n\npaired against the mean arm:\n\n"
            f"{paired_table(rows)}\n\nhow much each aggregate sees the loop, per training batch:\n\n"
            f"{tail_by_batch(rows, max_length)}\n\nshare of the lam-0 runs' steps above each matched tau:\n\n"
            f"{would_fire(rows, taus)}\n\nfigures: {figure_path}, {batches}; TensorBoard: {out / 'summary'}")
    (out / "table.md").write_text(text + "\n")
    return text
