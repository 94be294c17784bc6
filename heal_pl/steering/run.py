"""``heal calibrate``: fit a steering vector (or take an adapter), find c* per sign at equal KL dose, audit.

    heal calibrate --config configs/calibrate.yaml

Steps (SPEC §3): (1) contrastive prompts = the same questions under the ``pos_system`` persona and the
``neg_system`` prompt; fit ``method`` at ``layers`` on the first ``n_fit`` questions (skipped for
``adapter``); (2) for each sign, ``heal_pl.steering.isokl.calibrate_method`` finds c with ``stat`` of
KL(steered ‖ base) along the greedy trajectory of the next ``n_calib`` questions equal to ``target``;
(3) re-measure at c* on ``n_audit`` held-out questions. Questions come from the bundled persona set
(``heal_pl/data/assets/persona_*.jsonl``) and are shown with no system prompt of ours at measurement time.

Writes into ``out_dir``: ``calib.json`` (config + full results), ``history.csv`` (every evaluation),
``summary.csv`` (one row per sign), ``audit.csv``, ``vector.safetensors`` (when a vector was fitted)
and TensorBoard scalars under ``calibrate/``. Every finished evaluation is recorded in ``out_dir/journal/``
(:mod:`heal_pl.journal`): rerun the same config with the same ``out_dir`` after a kill and it continues from them.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Any, Literal

import torch
from torch.utils.tensorboard import SummaryWriter
from tqdm.auto import tqdm

from heal_pl.data.prompts import NEUTRAL, PIRATE, chat_prompt, questions
from heal_pl.hardware import load_on
from heal_pl.journal import Journal, atomic_path, write_json
from heal_pl.models.load import Dtype, load_tokenizer
from heal_pl.steering.adapter import AdapterSteering
from heal_pl.steering.isokl import calibrate_method
from heal_pl.steering.trajectory import STATS
from heal_pl.steering.vectors import SteeringVector

log = logging.getLogger("heal_pl")

def run_calibration(
    model: str = "smollm2-135m-instruct",
    device: str = "auto",
    dtype: Dtype = "float32",
    method: Literal["mean_diff", "pca", "directional_ablation", "adapter"] = "mean_diff",
    adapter_dir: str | None = None,
    layers: list[float] | list[int] | float | int = 0.5,
    pos_system: str = PIRATE,
    neg_system: str = NEUTRAL,
    n_fit: int = 16,
    n_calib: int = 8,
    n_audit: int = 8,
    target: float = 1.0,
    stat: Literal["mean", "p50", "p90", "p95", "p99", "max", "rms"] = "p95",
    bracket: tuple[float, float] = (0.5, 64.0),
    signs: list[int] = [1, -1],  # noqa: B006 (jsonargparse reads the default)
    tol: float = 0.05,
    max_iters: int = 10,
    max_new_tokens: int = 32,
    batch_size: int = 8,
    out_dir: str = "runs/calibrate",
) -> dict[str, Any]:
    """Calibrate a steering method per sign to an equal KL dose and audit it on held-out prompts.

    Args:
        model: model alias, folder or Hugging Face id.
        device: ``auto`` (CUDA when present, else CPU), ``cpu``, ``cuda`` or ``cuda:N`` (:mod:`heal_pl.hardware`).
        dtype: the dtype the weights are loaded in: ``float32``, ``bfloat16`` or ``float16``.
        method: a vector to fit (mean_diff | pca | directional_ablation) or ``adapter`` (needs ``adapter_dir``).
        adapter_dir: a peft adapter folder (e.g. ``runs/rmse/version_0/adapter``) for ``method: adapter``.
        layers: decoder blocks to steer, as depth fractions (floats) or indices (ints).
        pos_system, neg_system: the persona pair whose contrast defines the vector.
        n_fit, n_calib, n_audit: bundled questions used to fit, to calibrate and to audit (disjoint).
        target: the KL budget in nats; stat: which trajectory statistic must equal it.
        bracket: the search range of ``c > 0``; signs: which signs to calibrate (+1, -1).
        tol, max_iters: the root finder's stopping rules (absolute nats; evaluations).
        max_new_tokens, batch_size: the greedy trajectory length and the prompts per forward.
        out_dir: where calib.json, history.csv, summary.csv, audit.csv and TensorBoard events go.
    """
    config = dict(locals())  # the arguments, for calib.json
    problems = []
    if not signs or set(signs) - {1, -1}:
        problems.append(f"signs={signs} must hold +1 and/or -1")
    if method == "adapter" and not adapter_dir:
        problems.append("method='adapter' needs adapter_dir (a peft adapter folder)")
    if method != "adapter" and adapter_dir:
        problems.append(f"adapter_dir is only read with method='adapter', got method={method!r}")
    problems += [f"{k}={v} must be >= 1" for k, v in (("n_calib", n_calib), ("n_audit", n_audit)) if v < 1]
    if method != "adapter" and n_fit < 1:
        problems.append(f"n_fit={n_fit} must be >= 1")
    if problems:
        raise ValueError("heal calibrate: " + "; ".join(problems))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    journal = Journal(out / "journal", {k: v for k, v in config.items() if k != "out_dir"}, "heal calibrate")
    lm = load_on(model, device, dtype)  # device and dtype checked before any other work
    tokenizer = load_tokenizer(model)
    qs = questions(n_fit + n_calib + n_audit)
    fit_q, calib_q, audit_q = qs[:n_fit], qs[n_fit : n_fit + n_calib], qs[n_fit + n_calib :]
    if method == "adapter":
        steering: Any = AdapterSteering.from_pretrained(lm, adapter_dir)  # type: ignore[arg-type]
        target_model = steering.model
    else:
        pos = [chat_prompt(tokenizer, q, pos_system) for q in fit_q]
        neg = [chat_prompt(tokenizer, q, neg_system) for q in fit_q]
        if journal.get("vector") is not None and (out / "vector.safetensors").is_file():  # a rerun: the same vector
            steering = SteeringVector.load(out / "vector.safetensors")
        else:
            steering = SteeringVector.fit(lm, tokenizer, pos, neg, method=method, layers=layers, model_name=model)
            with atomic_path(out / "vector.safetensors") as tmp:
                steering.save(tmp)
            journal.record("vector", {"file": "vector.safetensors"})
        target_model = lm
    calib_prompts = [chat_prompt(tokenizer, q, None) for q in calib_q]
    audit_prompts = [chat_prompt(tokenizer, q, None) for q in audit_q]

    writer = SummaryWriter(str(out))
    results: dict[str, Any] = {}
    for sign in signs:
        name = "+" if sign > 0 else "-"
        bar = tqdm(total=max_iters, desc=f"calibrate {name}", unit="eval")

        def on_eval(entry: dict[str, Any], bar: tqdm = bar, name: str = name) -> None:
            bar.update(1)
            bar.set_postfix(c=f"{entry['c']:.3g}", **{stat: f"{entry[stat]:.3f}"})
            step = bar.n
            writer.add_scalar(f"calibrate/{name}/c", entry["c"], step)
            writer.add_scalar(f"calibrate/{name}/{stat}", entry[stat], step)
            log.info("calibrate %s: evaluation %d: c=%.4g %s=%.4g (target %g)", name, step, entry["c"], stat,
                     entry[stat], target)  # fmt: skip

        with torch.no_grad():
            result = calibrate_method(
                target_model, tokenizer, steering, calib_prompts, audit_prompts, target=target, stat=stat,
                bracket=tuple(bracket), sign=sign, tol=tol, max_iters=max_iters, max_new_tokens=max_new_tokens,
                batch_size=batch_size, on_evaluation=on_eval, journal=journal,
            )  # fmt: skip
        bar.close()
        log.info("calibrate %s: c*=%.4g %s=%.4g, %s after %d evaluations", name, result["c_star"], stat,
                 result["stat_star"], "converged" if result["converged"] else "NOT converged", result["evaluations"])
        for key in ("c_star", "stat_star", "evaluations", "audit_ratio"):
            if result.get(key) is not None:
                writer.add_scalar(f"calibrate/{name}/{key}", float(result[key]), 0)
        writer.add_scalar(f"calibrate/{name}/converged", float(result["converged"]), 0)
        results[name] = result
    writer.close()
    _write_outputs(out, config, results, stat)
    return results


def _write_outputs(out: Path, config: dict[str, Any], results: dict[str, Any], stat: str) -> None:
    write_json(out / "calib.json", {"config": config, "results": results}, indent=2, default=str)  # atomic
    with open(out / "history.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["sign", "evaluation", "c", "coeff", *STATS])
        for name, r in results.items():
            for i, h in enumerate(r["history"], 1):
                w.writerow([name, i, h["c"], h["coeff"], *(h[s] for s in STATS)])
    with open(out / "summary.csv", "w", newline="") as f:
        w = csv.writer(f)
        cols = ["sign", "stat", "target", "c_star", "coeff", "stat_star", "converged", "evaluations", "audit_ratio"]
        w.writerow(cols)
        for name, r in results.items():
            w.writerow([name, stat, r["target"], r["c_star"], r["coeff"], r["stat_star"], r["converged"],
                        r["evaluations"], r["audit_ratio"]])  # fmt: skip
    with open(out / "audit.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["sign", "coeff", *STATS])
        for name, r in results.items():
            if r["audit"] is not None:
                w.writerow([name, r["coeff"], *(r["audit"][s] for s in STATS)])
    rows = [f"| {n} | {r['c_star']:.3g} | {r['stat_star']:.3f} | {r['converged']} | {r['evaluations']} | "
            f"{r['audit_ratio'] if r['audit_ratio'] is None else round(r['audit_ratio'], 3)} |"
            for n, r in results.items()]  # fmt: skip
    log.info("calibration (%s = target)\n| sign | c* | stat | converged | evals | audit ratio |\n%s",
             stat, "\n".join(rows))  # fmt: skip
