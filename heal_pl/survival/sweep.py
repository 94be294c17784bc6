"""The α sweep of a survival run (docs/maths.md §4.6): rollouts, forks, Kaplan–Meier per dose, figures, files.

For each sign ``σ`` with calibrated ``c*_σ`` and each ``α`` of the grid (default 0, .25, .5, .75, 1, 1.5, 2, 4;
``α = 0`` is run once and shared by both signs), at ``coeff = σ · α · c*_σ``:

1. :func:`heal_pl.steering.trajectory.measure_kl` greedy-rolls out ``w`` tokens per evaluation prompt under the
   steering and records KL_t(steered ‖ base) at every generated position (the spaghetti figure);
2. :func:`heal_pl.survival.forks.probe_forks` reads the forced-choice probe at the fork points of each of those same
   trajectories (cached, packed forks; the probe is read under the same steering);
3. :func:`heal_pl.survival.table.survival_table`: alive while ``pmass ≥ threshold``, absorbing death, censoring at
   EOS; Kaplan–Meier through lifelines.

Before the sweep a probe check reads the unsteered probe right after the prompt (fork 0) on the probe check
questions (bundled ``yesno_calib.jsonl``, or ``check_prompts`` / a part of ``prompts``; never the evaluation
ones): mean pmass, share with ``pmass ≥ threshold``, and accuracy of ``p_true > 0.5`` against the answers. A
low share says the splice or the threshold does not suit the model, whatever the steering.

Files written into ``out_dir`` by :func:`write_outputs`: ``summary.json``, ``survival.csv``, ``survival.md``,
``trajectories.json``, ``trajectories.csv`` (one row per trajectory and fork), ``kl.csv`` (one row per
trajectory and generated token), ``figures/spaghetti_<label>.png`` and ``figures/survival_<sign>.png``; from the
records alone (:mod:`heal_pl.survival.analyses`): ``attribution.csv``, ``attribution.md``,
``attribution_deaths.csv``, ``figures/attribution_<sign>.png`` (:mod:`heal_pl.survival.attribution`),
``figures/fan_<sign>.png`` (:mod:`heal_pl.survival.fan`) and, with ``thresholds``, ``thresholds.csv``,
``thresholds.md``, ``figures/thresholds_<sign>.png`` (:mod:`heal_pl.survival.thresholds`).
TensorBoard (when a writer is given): figures ``survival/spaghetti/<label>``, ``survival/curves/<sign>``,
``survival/attribution/<sign>``, ``survival/fan/<sign>`` (and ``survival/thresholds/<sign>``); scalars
``survival/<sign>/{S_mid,S_end,died,censored,kl_p95}`` and ``survival/attribution/<sign>/{spike,no_spike,
died_at_0,pct_rank}`` at step ``round(100 α)``.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn
from transformers import PreTrainedTokenizerBase

from heal_pl import shards
from heal_pl.data.prompts import chat_prompt
from heal_pl.journal import Journal, journaled
from heal_pl.models.generate import eos_ids
from heal_pl.progress import progress
from heal_pl.steering.hooks import SteeringMethod
from heal_pl.steering.trajectory import measure_kl
from heal_pl.survival.analyses import write_analyses
from heal_pl.survival.batch_forks import batch_fork_reader
from heal_pl.survival.config import SweepConfig
from heal_pl.survival.forks import check_window, fork_probe, probe_forks
from heal_pl.survival.plotting import save_figure, spaghetti_figure, survival_figure
from heal_pl.survival.probes import THINK_OPEN, has_thinking_tokens, splice_text
from heal_pl.survival.stored import SIGN_WORD, fmt_cell, markdown_rows
from heal_pl.survival.table import survival_table

log = logging.getLogger("heal_pl")
TABLE_COLUMNS = ("label", "sign", "alpha", "coeff", "n", "died", "censored", "t_mid", "S_mid", "S_end", "t_half",
                 "kl_p95", "kl_mean")  # fmt: skip


def label_of(sign: str, alpha: float) -> str:
    """``"0"`` for α = 0, else the sign and α: ``"+0.25"``, ``"-4"``."""
    return "0" if alpha == 0 else f"{sign}{alpha:g}"


def file_slug(label: str) -> str:
    """The file-name form of an α label: ``0``, ``plus_1``, ``minus_0.5``."""
    return label if label == "0" else f"{SIGN_WORD[label[0]]}_{label[1:]}"


def probe_check(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, method: SteeringMethod, config: SweepConfig,
    answer_ids: Mapping[str, Sequence[int]], strict: bool = False,
) -> dict[str, float]:
    """The probe at fork 0 (``method`` at coefficient 0) on the probe check questions (``config.question_sets()[0]``,
    chat-formatted): ``n``, ``mean_pmass``, ``share_alive`` (pmass ≥ threshold), ``accuracy`` (``p_true > 0.5``).

    When fewer than :data:`~heal_pl.survival.config.MIN_SHARE_ALIVE` of them are alive it raises the ``ValueError`` of
    :meth:`~heal_pl.survival.config.SweepConfig.probe_check_problem` if ``strict`` (``heal survival``), else logs it.
    """
    questions = config.question_sets()[0]
    pm, pt = [], []
    for q in questions:
        r = fork_probe(model, tokenizer, chat_prompt(tokenizer, q["prompt"], None), method, 0.0, 1, [0],
                       config.splice, answer_ids)  # fmt: skip
        pm.append(r.pmass[0])
        pt.append(r.p_true[0])
    pm_a, pt_a, answers = np.asarray(pm), np.asarray(pt), np.asarray([q["answer"] for q in questions], dtype=bool)
    check = {"n": len(questions), "mean_pmass": float(pm_a.mean()),
             "share_alive": float(np.mean(pm_a >= config.threshold)),
             "accuracy": float(np.mean((pt_a > 0.5) == answers))}  # fmt: skip
    problem = config.probe_check_problem(check)
    if problem is not None and strict:
        raise ValueError(problem)
    if problem is not None:
        log.warning("survival: %s", problem)
    return check


def eval_prompts(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, config: SweepConfig, system: str | None = None
) -> tuple[list[dict[str, Any]], list[str]]:
    """The evaluation questions and their chat prompts (under ``system``, if given); ``ValueError`` (naming ``w``)
    when prompt + ``w`` + splice do not fit the model's context."""
    evals = config.eval_questions()
    prompts = [chat_prompt(tokenizer, q["prompt"], system) for q in evals]
    splice = config.resolved(tokenizer).splice  # the probe turn's own length, also for splice: auto
    splice = splice_text(THINK_OPEN, splice) if has_thinking_tokens(tokenizer) else splice
    n_splice = len(tokenizer(splice, add_special_tokens=False)["input_ids"])
    n_prompt = max(len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts)
    check_window(model, n_prompt, config.w, n_splice)
    return evals, prompts


def sweep_survival(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    method: SteeringMethod,
    c_stars: Mapping[str, float],
    config: SweepConfig,
    answer_ids: Mapping[str, Sequence[int]],
    out_dir: str | Path,
    kl_target: float = 1.0,
    writer: Any = None,
    tag_prefix: str = "survival/",
    step: int = 0,
    journal: Journal | None = None,
) -> dict[str, Any]:
    """Run the sweep of the module docstring, write every file (and TensorBoard, if ``writer``), return the summary.

    Args:
        model: the steered model (eval mode is set and restored by the measuring functions).
        method: the steering method; c_stars: ``{"+": c*, "-": c*}`` (either or both signs).
        answer_ids: from :func:`heal_pl.survival.probes.answer_token_ids` with ``config.answer_sets()``.
        kl_target: the calibration's KL target (the dotted line of the spaghetti figure).
        writer: a ``torch.utils.tensorboard.SummaryWriter`` (or ``None``); tag_prefix replaces ``survival/`` in
            its tags and the figures are written at ``step``.
        journal: where the probe check and each α are recorded as they finish and read back on a rerun
            (steps ``probe_check``, ``alpha_<label>``; :class:`heal_pl.journal.Journal`).

    Returns:
        ``{"table": [row per label], "trajectories": [...], "probe_check": {...}, "fork_points": [...]}``.
    """
    if not c_stars or set(c_stars) - set(SIGN_WORD):
        raise ValueError(f"c_stars={dict(c_stars)!r} must map '+' and/or '-' to c* > 0")
    bad = {k: v for k, v in c_stars.items() if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0)}
    if bad:
        raise ValueError(f"c_stars {bad} must be finite and > 0")
    config = config.resolved(tokenizer)  # splice "auto": the model's own probe turn, also in summary.json
    evals, prompts = eval_prompts(model, tokenizer, config)
    forks = config.fork_points()
    eos = set(eos_ids(tokenizer, model, None).tolist())
    check = journaled(journal, "probe_check", {}, lambda: probe_check(model, tokenizer, method, config, answer_ids))
    runs = [("+" if "+" in c_stars else "-", 0.0)]
    runs += [(s, a) for s in ("+", "-") if s in c_stars for a in config.alphas if a != 0]
    rows, trajectories, tables = [], [], {}
    for sign, alpha in progress(runs, desc="survival sweep", unit="α"):
        label = label_of(sign, alpha)
        coeff = (1.0 if sign == "+" else -1.0) * alpha * float(c_stars[sign])
        m = journaled(journal, f"alpha_{file_slug(label)}", {"coeff": coeff},
                      lambda c=coeff, lab=label: measure_alpha(model, tokenizer, method, prompts, c, config, forks,
                                                          answer_ids, lab))  # fmt: skip
        pmass = np.asarray(m["pmass"], dtype=np.float64)  # [prompts, forks]; a fork past the end is NaN
        gen_lens = np.asarray(m["gen_len"])
        table = survival_table(pmass, gen_lens, forks, config.threshold)
        tables[label] = table
        rows.append({"label": label, "sign": "0" if alpha == 0 else sign, "alpha": alpha, "coeff": coeff,
                     **{k: table[k] for k in ("n", "died", "censored", "t_mid", "S_mid", "S_end", "t_half")},
                     "kl_p95": m["stats"]["p95"], "kl_mean": m["stats"]["mean"]})  # fmt: skip
        log.info("survival α=%s (coeff %.4g): %d/%d died, S_end %.3f, t_half %s, kl_p95 %.3g", label, coeff,
                 table["died"], table["n"], table["S_end"], table["t_half"], m["stats"]["p95"])  # fmt: skip
        for i, (q, toks) in enumerate(zip(evals, m["tokens"], strict=True)):
            trajectories.append({
                "label": label, "sign": rows[-1]["sign"], "alpha": alpha, "coeff": coeff, "prompt_index": i,
                "question": q["prompt"], "answer": q["answer"], "gen_len": m["gen_len"][i],
                "eos": bool(toks and toks[-1] in eos), "text": tokenizer.decode(toks), "tokens": toks,
                "kl": m["kl"][i], "pmass": m["pmass"][i], "p_true": m["p_true"][i],
                "duration": int(table["durations"][i]), "died": bool(table["observed"][i]),
            })  # fmt: skip
    summary = {"fork_points": forks.tolist(), "c_star": dict(c_stars), "kl_target": kl_target,
               "config": asdict(config), "probe_check": check, "table": rows}  # fmt: skip
    if shards.is_writer():  # one writer in a sharded job (every process holds the same summary)
        write_outputs(Path(out_dir), summary, trajectories, tables, kl_target, config, writer, tag_prefix, step)
    return {**summary, "trajectories": trajectories}


def measure_alpha(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, method: SteeringMethod, prompts: Sequence[str],
    coeff: float, config: SweepConfig, forks: np.ndarray, answer_ids: Mapping[str, Sequence[int]], label: str,
    base_prompts: Sequence[str] | None = None,
) -> dict[str, Any]:
    """One α: the rollouts and the probes at their forks, as JSON-ready lists (one entry per prompt); the KL's base
    reads ``base_prompts`` when given (:func:`heal_pl.steering.trajectory.measure_kl`)."""
    batched = batch_fork_reader(model, tokenizer, prompts, method, coeff, config.w, forks, config.splice, answer_ids,
                                config.fork_batch)  # the forks read on the KL's own cache (attention-only models)
    cache, on_rollout, results = batched if batched is not None else (None, None, [])
    traj = measure_kl(model, tokenizer, prompts, method, coeff, config.w, config.batch_size,
                      eos_token_id=None if config.stop_at_eos else [], base_prompts=base_prompts, cache=cache,
                      on_rollout=on_rollout)  # fmt: skip
    own = shards.block(len(prompts))  # this process's prompts (all of them outside a sharded job)
    if batched is None:  # recurrent layers, or no exact fork plan: one prompt at a time
        results = [probe_forks(model, tokenizer, prompts[i], traj.tokens[i], method, coeff, config.w, forks,
                               config.splice, answer_ids, fork_batch=config.fork_batch)
                   for i in progress(own, desc=f"forks {label}", unit="prompt", leave=False)]  # fmt: skip
    else:
        results = [results[i] for i in own]
    results = shards.gather(results)
    return {"coeff": coeff, "stats": traj.stats, "kl": [kl.tolist() for kl in traj.kl],
            "tokens": [r.tokens.tolist() for r in results], "gen_len": [int(r.gen_len) for r in results],
            "pmass": [r.pmass.tolist() for r in results], "p_true": [r.p_true.tolist() for r in results]}


def markdown_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """The per-α table as markdown; ``t_half`` ``None`` reads ``never``."""
    return markdown_rows(rows, TABLE_COLUMNS)


def nan_to_none(xs: Sequence[float]) -> list[float | None]:
    """Standard JSON has no NaN: a fork past the trajectory's end is written as null."""
    return [None if x != x else x for x in xs]


def write_outputs(
    out: Path, summary: Mapping[str, Any], trajectories: Sequence[Mapping[str, Any]], tables: Mapping[str, Mapping],
    kl_target: float, config: SweepConfig, writer: Any = None, tag_prefix: str = "survival/", step: int = 0,
) -> None:
    """Write the files (and TensorBoard entries) listed in the module docstring."""
    out.mkdir(parents=True, exist_ok=True)
    rows = summary["table"]
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    strict = [{**t, "pmass": nan_to_none(t["pmass"]), "p_true": nan_to_none(t["p_true"])} for t in trajectories]
    (out / "trajectories.json").write_text(
        json.dumps({"fork_points": summary["fork_points"], "trajectories": strict}, allow_nan=False)
    )
    with open(out / "survival.csv", "w", newline="") as f:
        w = csv.DictWriter(f, TABLE_COLUMNS)
        w.writeheader()
        w.writerows({**{c: r[c] for c in TABLE_COLUMNS}, "t_half": fmt_cell(r["t_half"])} for r in rows)
    (out / "survival.md").write_text(markdown_table(rows))
    forks = summary["fork_points"]
    with open(out / "trajectories.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["label", "alpha", "coeff", "prompt_index", "gen_len", "fork", "t", "pmass", "p_true"])
        for tr in trajectories:
            for j, t in enumerate(forks):
                w.writerow([tr["label"], tr["alpha"], tr["coeff"], tr["prompt_index"], tr["gen_len"], j, t,
                            tr["pmass"][j], tr["p_true"][j]])  # fmt: skip
    with open(out / "kl.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["label", "prompt_index", "position", "kl"])
        for tr in trajectories:
            w.writerows([tr["label"], tr["prompt_index"], p, v] for p, v in enumerate(tr["kl"]))
    figures = out / "figures"
    for label in tables:
        trs = [t for t in trajectories if t["label"] == label]
        fig = spaghetti_figure([t["kl"] for t in trs], [t["duration"] if t["died"] else None for t in trs],
                               [t["gen_len"] - 1 if t["eos"] else None for t in trs], target=kl_target,
                               smooth=config.smooth, normalise=config.normalise,
                               title=f"α = {label} · c*  (red: after death, pmass < {config.threshold:g})")  # fmt: skip
        save_figure(fig, figures / f"spaghetti_{file_slug(label)}.png")
        if writer is not None:
            writer.add_figure(f"{tag_prefix}spaghetti/{label}", fig, step)
    for sign in (s for s in SIGN_WORD if s in summary["c_star"]):
        mine = {lab: t for lab, t in tables.items() if lab == "0" or lab.startswith(sign)}
        fig = survival_figure(mine, title=f"Kaplan–Meier, sign {sign}, c* = {summary['c_star'][sign]:.3g}",
                              horizon=float(forks[-1]))
        save_figure(fig, figures / f"survival_{SIGN_WORD[sign]}.png")
        if writer is not None:
            writer.add_figure(f"{tag_prefix}curves/{sign}", fig, step)
            for r in rows:
                if r["label"] == "0" or r["sign"] == sign:
                    for key in ("S_mid", "S_end", "died", "censored", "kl_p95"):
                        writer.add_scalar(f"{tag_prefix}{sign}/{key}", float(r[key]), round(100 * r["alpha"]))
    write_analyses(out, forks, trajectories, [s for s in SIGN_WORD if s in summary["c_star"]], config.threshold,
                   kl_target, config.thresholds, writer=writer, tag_prefix=tag_prefix, step=step)
    if writer is not None:
        writer.flush()
