"""``heal compare``: steering methods side by side at the same KL dose, beside simply asking the model.

    heal compare --config compare

Steps:

1. **Each method** of ``methods`` (mean_diff, pca, directional_ablation, adapter) runs ``heal survival``
   (:func:`heal_pl.survival.run.run_survival`) into ``out_dir/<method>/``: calibrated to the same ``target`` /
   ``stat`` / ``layers`` (``out_dir/<method>/calibrate/``), then swept over the same α · c* grid with the same
   :class:`~heal_pl.survival.config.SweepConfig`, hence the same evaluation prompts and the same forks. The first
   method's probe check stops the comparison, before any calibration, when the probe does not suit the model.
2. **Prompt baseline** (``prompt_baseline: true``): the KL footprint of the system prompt ``system`` (default the
   calibration's ``pos_system``, the persona the vectors are fitted from) against none, at its one natural dose
   (:mod:`heal_pl.steering.prompt_baseline`): greedy rollouts WITH the system prompt on the same evaluation
   questions, per-token KL(with ‖ without) on the same tokens, and the forced-choice probe at the same forks with
   the system prompt present (:func:`prompt_survival`; files in ``out_dir/prompt/``).
3. **One table** (method × α label, plus the row ``prompt``) and one Kaplan–Meier figure per α label with a curve
   per method and the prompt's curve.

Files in ``out_dir``: ``compare.md``, ``compare.csv``, ``compare.json`` (config, per-method calibration, table),
``figures/compare_<label>.png`` (``0``, ``plus_1``, ``minus_0.5``, …; the prompt's curve dashed on each),
``prompt/prompt.json`` and ``prompt/figures/spaghetti_prompt.png``. TensorBoard in ``out_dir``: figures
``compare/curves/<label>`` and ``compare/spaghetti/prompt``; scalars
``compare/<method>/<sign>/{S_mid,S_end,died,kl_p95,kl_mean}`` at step round(100 α) and ``compare/prompt/{...}`` at
step 0 (each method's own ``survival/`` tags are in its folder). The prompt row has no coefficient: its ``alpha``,
``coeff`` and ``c_star`` read ``-`` (``null`` in the JSON); compare.csv holds unrounded values, compare.md rounds.

Resume: every method keeps its ``heal survival`` journals (``out_dir/<method>/journal/``,
``out_dir/<method>/calibrate/journal/``) and the prompt baseline its own (``out_dir/prompt/journal/``); a rerun
with the same arguments and ``out_dir`` measures only what is missing.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn
from torch.utils.tensorboard import SummaryWriter
from transformers import PreTrainedTokenizerBase

from heal_pl import shards
from heal_pl.checks import command
from heal_pl.hardware import load_on
from heal_pl.journal import Journal, journaled
from heal_pl.models.generate import eos_ids
from heal_pl.models.load import Dtype, load_tokenizer
from heal_pl.steering.isokl import IsoKLResult, sign_name
from heal_pl.steering.prompt_baseline import SystemPrompt
from heal_pl.survival.args import CompareArgs, SweepArgs, methods_problems
from heal_pl.survival.config import SweepConfig
from heal_pl.survival.plotting import save_figure, spaghetti_figure, survival_figure
from heal_pl.survival.probes import answer_token_ids
from heal_pl.survival.run import run_survival
from heal_pl.survival.stored import fmt_cell
from heal_pl.survival.sweep import eval_prompts, file_slug, measure_alpha, nan_to_none
from heal_pl.survival.table import survival_table

log = logging.getLogger("heal_pl")
PROMPT = "prompt"  # the method name and label of the prompt baseline's row
COMPARE_COLUMNS = ("method", "label", "alpha", "coeff", "c_star", "n", "died", "censored", "S_mid", "S_end", "t_half",
                   "kl_p95", "kl_mean", "kl_max")  # fmt: skip
SCALARS = ("S_mid", "S_end", "died", "kl_p95", "kl_mean")
# the heal survival arguments every method shares: SweepArgs' fields (method and adapter_dir are set per method)
SURVIVAL_ARGS = [f.name for f in fields(SweepArgs) if f.name != "adapter_dir"]


def check_methods(methods: Sequence[str], adapter_dir: str | None) -> None:
    """Raise one ``ValueError`` naming every problem of ``methods`` / ``adapter_dir`` (unknown, empty, twice, …;
    :func:`heal_pl.survival.args.methods_problems`)."""
    problems = methods_problems(methods, adapter_dir)
    if problems:
        raise ValueError(f"{CompareArgs.where}: " + "; ".join(problems))


def prompt_survival(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, system: str, config: SweepConfig,
    answer_ids: Mapping[str, Sequence[int]], journal: Journal | None = None,
) -> dict[str, Any]:
    """The prompt baseline on the evaluation questions: rollouts, KL(with ``system`` ‖ without) and probes.

    Rollouts and probes run with the system prompt present; the KL's base is the same question without it,
    scored on the same tokens (:mod:`heal_pl.steering.prompt_baseline`); the forks are ``config``'s.

    Returns:
        ``{"row": table row, "stats": all KL statistics, "table": the survival table, "trajectories": [...]}``.
    """
    method = SystemPrompt(system)
    config = config.resolved(tokenizer)  # splice "auto": the model's own probe turn
    evals, with_system = eval_prompts(model, tokenizer, config, system)  # checks the (longer) prompts' window
    _, without = eval_prompts(model, tokenizer, config)
    forks = config.fork_points()
    m = journaled(journal, PROMPT, {"system": system}, lambda: {"system": system, **measure_alpha(
        model, tokenizer, method, with_system, 1.0, config, forks, answer_ids, PROMPT, base_prompts=without)})
    table = survival_table(np.asarray(m["pmass"], dtype=np.float64), np.asarray(m["gen_len"]), forks,
                           config.threshold)  # fmt: skip
    eos = set(eos_ids(tokenizer, model, None).tolist())
    trajectories = [{"label": PROMPT, "prompt_index": i, "question": q["prompt"], "answer": q["answer"],
                     "gen_len": m["gen_len"][i], "eos": bool(toks and toks[-1] in eos), "text": tokenizer.decode(toks),
                     "tokens": toks, "kl": m["kl"][i], "pmass": m["pmass"][i], "p_true": m["p_true"][i],
                     "duration": int(table["durations"][i]), "died": bool(table["observed"][i])}
                    for i, (q, toks) in enumerate(zip(evals, m["tokens"], strict=True))]  # fmt: skip
    row = {"method": PROMPT, "label": PROMPT, "alpha": None, "coeff": None, "c_star": None,
           **{k: table[k] for k in ("n", "died", "censored", "S_mid", "S_end", "t_half")},
           "kl_p95": m["stats"]["p95"], "kl_mean": m["stats"]["mean"], "kl_max": m["stats"]["max"]}  # fmt: skip
    return {"row": row, "stats": m["stats"], "table": table, "trajectories": trajectories}


def method_tables(summary: Mapping[str, Any], config: SweepConfig) -> dict[str, dict]:
    """Per α label of one method's ``heal survival`` summary: its survival table, rebuilt from the trajectories."""
    forks, out = np.asarray(summary["fork_points"]), {}
    for label in (r["label"] for r in summary["table"]):
        trs = [t for t in summary["trajectories"] if t["label"] == label]
        pmass = np.array([[np.nan if p is None else p for p in t["pmass"]] for t in trs], dtype=np.float64)
        out[label] = survival_table(pmass, np.asarray([t["gen_len"] for t in trs]), forks, config.threshold)
    return out


def method_rows(method: str, summary: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One method's sweep table as compare rows (``kl_max`` pooled over each label's trajectories)."""
    rows = []
    for r in summary["table"]:
        kl = np.concatenate([np.asarray(t["kl"], dtype=np.float64) for t in summary["trajectories"]
                             if t["label"] == r["label"]])  # fmt: skip
        c_star = None if r["label"] == "0" else summary["c_star"][r["sign"]]
        rows.append({"method": method, **{k: r[k] for k in COMPARE_COLUMNS if k in r}, "c_star": c_star,
                     "kl_max": float(kl.max())})  # fmt: skip
    return rows


def _cell(row: Mapping[str, Any], column: str, rounded: bool = True) -> Any:
    """A table cell: ``-`` for no value (the prompt's alpha / coeff / c*), ``never`` for no t_half; numbers to 3
    significant digits when ``rounded`` (markdown), as they are otherwise (CSV)."""
    value = row[column]
    if value is None:
        return "never" if column == "t_half" else "-"
    return fmt_cell(value) if rounded else value


def compare_markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    """The compare table as markdown (see :func:`_cell` for the empty cells)."""
    lines = ["| " + " | ".join(COMPARE_COLUMNS) + " |", "|" + "---|" * len(COMPARE_COLUMNS)]
    lines += ["| " + " | ".join(_cell(r, c) for c in COMPARE_COLUMNS) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_compare(
    out: Path, report: Mapping[str, Any], tables: Mapping[str, Mapping[str, dict]], horizon: float, writer: Any = None,
) -> None:
    """compare.json / .csv / .md, one Kaplan–Meier figure per α label, TensorBoard (module docstring)."""
    rows = report["table"]
    (out / "compare.json").write_text(json.dumps(report, indent=2, default=str))
    with open(out / "compare.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(COMPARE_COLUMNS)
        w.writerows([_cell(r, c, rounded=False) for c in COMPARE_COLUMNS] for r in rows)
    cal = ["| method | sign | c* | stat at c* | converged | evaluations | audit ratio |", "|" + "---|" * 7]
    cal += [f"| {m} | {s} | {fmt_cell(c['c_star'])} | {fmt_cell(c['stat_star'])} | {c['converged']} | "
            f"{c['evaluations']} | {fmt_cell(c['audit_ratio'])} |"
            for m, signs in report["calibration"].items() for s, c in signs.items()]
    (out / "compare.md").write_text(compare_markdown(rows) + f"\nCalibration ({report['config']['stat']} of KL = "
                                    f"{report['config']['target']:g} nat):\n\n" + "\n".join(cal) + "\n")  # fmt: skip
    labels = list(dict.fromkeys(lab for per in tables.values() for lab in per if lab != PROMPT))
    for label in labels:
        curves = {m: per[label] for m, per in tables.items() if label in per}
        if PROMPT in tables:
            curves[PROMPT] = tables[PROMPT][PROMPT]
        fig = survival_figure(curves, title=f"Kaplan–Meier at α = {label} · c*  (prompt: its one dose)",
                              horizon=horizon)  # fmt: skip
        ax = fig.axes[0]
        for line in ax.lines:
            if line.get_label() == PROMPT:
                line.set_linestyle("--")  # the reference: dashed
        ax.legend(title="method", fontsize="small")
        save_figure(fig, out / "figures" / f"compare_{file_slug(label)}.png")
        if writer is not None:
            writer.add_figure(f"compare/curves/{label}", fig, 0)
    if writer is not None:
        for r in rows:
            if r["method"] == PROMPT:
                tags = [(f"compare/{PROMPT}/{k}", 0) for k in SCALARS]
            else:
                signs = [sign_name(s) for s in report["config"]["signs"]] if r["label"] == "0" else [r["label"][0]]
                tags = [(f"compare/{r['method']}/{s}/{k}", round(100 * r["alpha"])) for s in signs for k in SCALARS]
            for tag, step in tags:
                writer.add_scalar(tag, float(r[tag.rsplit("/", 1)[1]]), step)
        writer.flush()


@command(CompareArgs)
def run_compare(args: CompareArgs) -> dict[str, Any]:
    """Calibrate and sweep every method of ``methods`` alike, run the prompt baseline, write one table and figures.

    Called with :class:`~heal_pl.survival.args.CompareArgs`' fields as keywords (``adapter_dir``, ``layers``,
    ``target``, ``stat``, ``signs``, ``calibration`` and the sweep's are those of ``heal survival``, the same for
    every method). Under ``torchrun`` the prompts are shared by the processes and rank 0 writes
    (:mod:`heal_pl.shards`).

    Returns:
        the ``compare.json`` content plus ``summaries`` (each method's ``heal survival`` summary) and ``prompt``.
    """
    shards.init()
    with shards.sharded():
        return _compare(args)


def _compare(args: CompareArgs) -> dict[str, Any]:
    config = args.sweep_config().resolved(load_tokenizer(args.model))  # splice "auto": the model's own probe turn
    system = args.baseline_system
    out = Path(args.out_dir)
    shared = {k: getattr(args, k) for k in SURVIVAL_ARGS}
    summaries, tables, rows, calib = {}, {}, [], {}
    for m in args.methods:
        log.info("heal compare: method %s (%d of %d)", m, len(summaries) + 1, len(args.methods))
        adapter_dir = args.adapter_dir if m == "adapter" else None
        summary = run_survival(method=m, adapter_dir=adapter_dir, out_dir=str(out / m), **shared)
        summaries[m], tables[m] = summary, method_tables(summary, config)
        rows += method_rows(m, summary)
        results = json.loads(Path(summary["calib_json"]).read_text())["results"]
        calib[m] = {s: IsoKLResult.from_dict(results[s]).summary() for s in summary["c_star"]}
    writer = shards.on_writer(SummaryWriter, str(out))
    prompt = None
    try:
        if args.prompt_baseline:
            prompt = _run_prompt(args.model, args.device, args.dtype, system, args.target, config, out / PROMPT,
                                 writer)  # fmt: skip
            tables[PROMPT] = {PROMPT: prompt["table"]}
            rows.append(prompt["row"])
        report = {"config": {**asdict(args), "splice": config.splice, "system": system},
                  "fork_points": config.fork_points().tolist(), "calibration": calib, "table": rows,
                  "prompt": None if prompt is None else {"system": system, "stats": prompt["stats"]}}  # fmt: skip
        if shards.is_writer():
            write_compare(out, report, tables, float(config.fork_points()[-1]), writer)
    finally:
        writer.close()
    log.info("heal compare (threshold %g, w %d)\n%s", config.threshold, config.w, compare_markdown(rows))
    return {**report, "summaries": summaries, "prompt": prompt}


def _run_prompt(
    model_name: str, device: str, dtype: Dtype, system: str, target: float, config: SweepConfig, out: Path,
    writer: Any,
) -> dict[str, Any]:
    """:func:`prompt_survival` on a freshly loaded model, journaled in ``out/journal``; writes ``out/prompt.json``
    and ``out/figures/spaghetti_prompt.png`` (TensorBoard ``compare/spaghetti/prompt``)."""
    journal = Journal(out / "journal", {"model": model_name, "device": device, "dtype": dtype, "system": system,
                                        "sweep": asdict(config), **config.prompts_digest()},
                      "heal compare (prompt baseline)")  # fmt: skip
    tokenizer = load_tokenizer(model_name)
    answer_ids = answer_token_ids(tokenizer, config.answer_sets())
    lm = load_on(model_name, device, dtype)
    result = prompt_survival(lm, tokenizer, system, config, answer_ids, journal)
    if not shards.is_writer():
        return result
    trs = result["trajectories"]
    strict = [{**t, "pmass": nan_to_none(t["pmass"]), "p_true": nan_to_none(t["p_true"])} for t in trs]
    (out / "prompt.json").write_text(json.dumps({"system": system, "row": result["row"], "stats": result["stats"],
                                                 "fork_points": config.fork_points().tolist(), "trajectories": strict},
                                                indent=2, allow_nan=False))  # fmt: skip
    fig = spaghetti_figure([t["kl"] for t in trs], [t["duration"] if t["died"] else None for t in trs],
                           [t["gen_len"] - 1 if t["eos"] else None for t in trs], target=target, smooth=config.smooth,
                           normalise=config.normalise, title=f"prompt baseline: KL(system prompt ‖ none)  (red: "
                           f"after death, pmass < {config.threshold:g})")  # fmt: skip
    save_figure(fig, out / "figures" / "spaghetti_prompt.png")
    writer.add_figure(f"compare/spaghetti/{PROMPT}", fig, 0)
    log.info("prompt baseline: %d/%d died, S_end %.3f, kl_p95 %.3g, kl_mean %.3g, kl_max %.3g", result["row"]["died"],
             result["row"]["n"], result["row"]["S_end"], result["stats"]["p95"], result["stats"]["mean"],
             result["stats"]["max"])  # fmt: skip
    return result
