"""``heal calibrate``: fit a steering vector (or take an adapter), find c* per sign at equal KL dose, audit.

    heal calibrate --config calibrate

Steps (docs/maths.md §3): (1) contrastive prompts = the same questions under the ``pos_system`` persona and the
``neg_system`` prompt; fit ``method`` at ``layers`` on the first ``n_fit`` questions (skipped for
``adapter``); (2) for each sign, ``heal_pl.steering.isokl.calibrate_method`` finds c with ``stat`` of
KL(steered ‖ base) along the greedy trajectory of the next ``n_calib`` questions equal to ``target``;
(3) re-measure at c* on ``n_audit`` held-out questions. Questions come from the bundled persona set
(``heal_pl/data/assets/persona_*.jsonl``), or from your own file ``prompts`` in file order
(:mod:`heal_pl.data.prompt_files`), and are shown with no system prompt of ours at measurement time.

Writes into ``out_dir``: ``calib.json`` (config, the questions used, full results), ``history.csv`` (every evaluation),
``summary.csv`` (one row per sign), ``audit.csv``, ``vector.safetensors`` (when a vector was fitted)
and TensorBoard scalars under ``calibrate/``. Every finished evaluation is recorded in ``out_dir/journal/``
(:mod:`heal_pl.journal`): rerun the same config with the same ``out_dir`` after a kill and it continues from them.

The arguments are :class:`heal_pl.steering.args.CalibrateArgs` (flat: ``run_calibration(model=..., stat=...)`` and
``--model ... --stat ...``), checked before any work.
"""

from __future__ import annotations

import csv
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.utils.tensorboard import SummaryWriter
from transformers import PreTrainedTokenizerBase

from heal_pl import shards
from heal_pl.checks import command
from heal_pl.data.prompts import chat_prompt
from heal_pl.hardware import load_on
from heal_pl.journal import Journal, atomic_path, fingerprint, write_json
from heal_pl.models.load import load_tokenizer
from heal_pl.progress import Progress, progress
from heal_pl.steering.adapter import AdapterSteering
from heal_pl.steering.args import CalibrateArgs
from heal_pl.steering.isokl import IsoKLResult, calibrate_method, sign_name
from heal_pl.steering.trajectory import STATS
from heal_pl.steering.vectors import SteeringVector

log = logging.getLogger("heal_pl")


class Calibrated(NamedTuple):
    """What :func:`calibrate_on` gives: the results per sign name, the steering method and the model it steers
    (``lm`` itself for a vector; the peft model wrapping it for an adapter)."""

    results: dict[str, IsoKLResult]
    steering: Any
    model: nn.Module


@command(CalibrateArgs)
def run_calibration(args: CalibrateArgs) -> dict[str, IsoKLResult]:
    """Calibrate a steering method per sign to an equal KL dose and audit it on held-out prompts.

    Called with :class:`~heal_pl.steering.args.CalibrateArgs`' fields as keywords; returns the result per sign
    name (``"+"``, ``"-"``), as written to ``calib.json``. Under ``torchrun`` the prompts are shared by the
    processes and rank 0 writes (:mod:`heal_pl.shards`).
    """
    shards.init()
    with shards.sharded():
        journal = calibration_journal(args)  # other arguments in the same out_dir: refused before the model loads
        lm = load_on(args.model, args.device, args.dtype)
        return calibrate_on(args, lm, load_tokenizer(args.model), journal).results


def calibration_journal(args: CalibrateArgs) -> Journal:
    """The journal of ``args.out_dir`` (created), refusing a rerun with other arguments; under ``torchrun`` also
    checks that every process has calibration and audit prompts."""
    config = asdict(args)
    journaled = {k: v for k, v in config.items() if k != "out_dir"}
    if args.prompts is not None:  # an edited file under the same name is another config
        journaled["prompts_digest"] = fingerprint({"questions": args.questions()})
    journal = Journal(Path(args.out_dir) / "journal", journaled, "heal calibrate")
    for n, what in ((args.n_calib, "calibration prompts (n_calib)"), (args.n_audit, "audit prompts (n_audit)")):
        shards.block(n, what)
    return journal


def calibrate_on(
    args: CalibrateArgs, lm: nn.Module, tokenizer: PreTrainedTokenizerBase, journal: Journal | None = None
) -> Calibrated:
    """:func:`run_calibration` on a model already loaded (``heal survival`` calibrates on its own copy): the same
    steps, files and journal (:func:`calibration_journal` when ``journal`` is not given)."""
    journal = calibration_journal(args) if journal is None else journal
    config = asdict(args)  # the arguments, for calib.json
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    qs = args.questions()
    n_fit, n_calib = args.n_fit, args.n_calib
    fit_q, calib_q, audit_q = qs[:n_fit], qs[n_fit : n_fit + n_calib], qs[n_fit + n_calib :]
    if args.method == "adapter":
        steering: Any = AdapterSteering.from_pretrained(lm, args.adapter_dir)  # type: ignore[arg-type]
        target_model = steering.model
    else:
        pos = [chat_prompt(tokenizer, q, args.pos_system) for q in fit_q]
        neg = [chat_prompt(tokenizer, q, args.neg_system) for q in fit_q]
        if journal.get("vector") is not None and (out / "vector.safetensors").is_file():  # a rerun: the same vector
            steering = SteeringVector.load(out / "vector.safetensors")
        else:
            steering = SteeringVector.fit(lm, tokenizer, pos, neg, method=args.method, layers=args.layers,
                                          model_name=args.model)  # fmt: skip
            if shards.is_writer():
                with atomic_path(out / "vector.safetensors") as tmp:
                    steering.save(tmp)
            journal.record("vector", {"file": "vector.safetensors"})
        target_model = lm
    calib_prompts = [chat_prompt(tokenizer, q, None) for q in calib_q]
    audit_prompts = [chat_prompt(tokenizer, q, None) for q in audit_q]

    writer = shards.on_writer(SummaryWriter, str(out))
    stat = args.stat
    results: dict[str, IsoKLResult] = {}
    for sign in args.signs:
        name = sign_name(sign)
        bar = progress(total=args.max_iters, desc=f"calibrate {name}", unit="eval", disable=not shards.is_writer())

        def on_eval(entry: dict[str, Any], bar: Progress = bar, name: str = name) -> None:
            bar.set_postfix(c=f"{entry['c']:.3g}", **{stat: f"{entry[stat]:.3f}"})  # before update: on its line
            bar.update(1)
            step = bar.n
            writer.add_scalar(f"calibrate/{name}/c", entry["c"], step)
            writer.add_scalar(f"calibrate/{name}/{stat}", entry[stat], step)
            log.info("calibrate %s: evaluation %d: c=%.4g %s=%.4g (target %g)", name, step, entry["c"], stat,
                     entry[stat], args.target)  # fmt: skip

        with torch.no_grad():
            result = calibrate_method(
                target_model, tokenizer, steering, calib_prompts, audit_prompts, target=args.target, stat=stat,
                bracket=tuple(args.bracket), sign=sign, tol=args.tol, max_iters=args.max_iters,
                max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, on_evaluation=on_eval,
                journal=journal,
            )  # fmt: skip
        bar.close()
        log.info("calibrate %s: c*=%.4g %s=%.4g, %s after %d evaluations", name, result.c_star, stat,
                 result.stat_star, "converged" if result.converged else "NOT converged", result.evaluations)
        for key, value in result.scalars().items():
            writer.add_scalar(f"calibrate/{name}/{key}", value, 0)
        results[name] = result
    writer.close()
    if shards.is_writer():
        _write_outputs(out, config, results, stat, {"fit": fit_q, "calib": calib_q, "audit": audit_q})
    return Calibrated(results, steering, target_model)


def _write_outputs(out: Path, config: dict[str, Any], results: dict[str, IsoKLResult], stat: str,
                   used: dict[str, list[str]] | None = None) -> None:  # fmt: skip
    payload = {"config": config, **({} if used is None else {"questions": used}),
               "results": {n: r.to_dict() for n, r in results.items()}}  # fmt: skip
    write_json(out / "calib.json", payload, indent=2, default=str)  # atomic
    with open(out / "history.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["sign", "evaluation", "c", "coeff", *STATS])
        for name, r in results.items():
            for i, h in enumerate(r.history, 1):
                w.writerow([name, i, h["c"], h["coeff"], *(h[s] for s in STATS)])
    with open(out / "summary.csv", "w", newline="") as f:
        w = csv.writer(f)
        cols = ["sign", "stat", "target", "c_star", "coeff", "stat_star", "converged", "evaluations", "audit_ratio"]
        w.writerow(cols)
        for name, r in results.items():
            w.writerow([name, stat, *(r[c] for c in cols[2:])])
    with open(out / "audit.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["sign", "coeff", *STATS])
        for name, r in results.items():
            if r.audit is not None:
                w.writerow([name, r.coeff, *(r.audit[s] for s in STATS)])
    rows = [f"| {n} | {r.c_star:.3g} | {r.stat_star:.3f} | {r.converged} | {r.evaluations} | "
            f"{r.audit_ratio if r.audit_ratio is None else round(r.audit_ratio, 3)} |"
            for n, r in results.items()]  # fmt: skip
    log.info("calibration (%s = target)\n| sign | c* | stat | converged | evals | audit ratio |\n%s",
             stat, "\n".join(rows))  # fmt: skip
