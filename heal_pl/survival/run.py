"""``heal survival``: when does a steering dose crash the model? Survival of forced-choice answers per α.

    heal survival --config survival

Steps: (1) calibrate c* per sign with ``heal calibrate`` (:func:`heal_pl.steering.run.run_calibration`,
written into ``out_dir/calibrate``) or load an existing ``calib.json`` (its steering vector
``vector.safetensors`` next to it, or its ``adapter_dir``); (2) sweep α · c* over the true/false evaluation
questions (bundled, or your own: ``prompts``, :class:`~heal_pl.survival.config.SweepConfig`), reading a
forced-choice probe at the forks of every rollout (:func:`heal_pl.survival.sweep.sweep_survival`, docs/maths.md
§4); (3) write the survival table, the trajectories
and the figures (files and TensorBoard tags listed in :mod:`heal_pl.survival.sweep`).

The arguments are :class:`heal_pl.survival.args.SurvivalArgs` (flat: ``run_survival(model=..., w=...)`` and
``--model ... --w ...``), checked before any work.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

from torch import nn
from torch.utils.tensorboard import SummaryWriter
from transformers import PreTrainedTokenizerBase

from heal_pl import shards
from heal_pl.checks import command, read_json_object
from heal_pl.hardware import load_on
from heal_pl.journal import Journal, journaled
from heal_pl.models.load import load_tokenizer
from heal_pl.steering.adapter import AdapterSteering
from heal_pl.steering.args import CalibrateArgs
from heal_pl.steering.hooks import SteeringMethod
from heal_pl.steering.isokl import sign_name
from heal_pl.steering.run import calibrate_on, calibration_journal
from heal_pl.steering.trajectory import Unsteered
from heal_pl.steering.vectors import SteeringVector
from heal_pl.survival.args import SurvivalArgs
from heal_pl.survival.config import SweepConfig
from heal_pl.survival.probes import answer_token_ids
from heal_pl.survival.sweep import eval_prompts, markdown_table, probe_check, sweep_survival

log = logging.getLogger("heal_pl")

# the journal's steps do not depend on these: a rerun with another out_dir or thresholds continues
NOT_JOURNALED = ("out_dir", "thresholds")


def load_calibration(calib_json: str | Path, model: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(config, results)`` of a ``calib.json`` written by ``heal calibrate``; its model must be ``model``."""
    path = Path(calib_json)
    if not path.is_file():
        raise ValueError(f"calib_json={str(path)!r} does not exist; run `heal calibrate` or leave calib_json unset")
    data = read_json_object(path, "calib_json")
    if not {"config", "results"} <= set(data):
        raise ValueError(f"calib_json={str(path)!r} is not a heal calibrate output (needs 'config' and 'results')")
    if data["config"].get("model") != model:
        raise ValueError(f"calib_json={str(path)!r} was calibrated on model={data['config'].get('model')!r}, "
                         f"but model={model!r}")
    return data["config"], data["results"]


def checked_probe(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, method: SteeringMethod | None, config: SweepConfig,
    answer_ids: Mapping[str, Sequence[int]], journal: Journal,
) -> dict[str, float]:
    """The probe check on the unsteered model (``method``'s base, :class:`~heal_pl.steering.trajectory.Unsteered`),
    journaled as step ``probe_check``; the ``ValueError`` of :meth:`~heal_pl.survival.config.SweepConfig.
    probe_check_problem` when the probe does not suit the model (a failed check is not journaled)."""
    return journaled(journal, "probe_check", {}, lambda: probe_check(model, tokenizer, Unsteered(method), config,
                                                                      answer_ids, strict=True))  # fmt: skip


@command(SurvivalArgs)
def run_survival(args: SurvivalArgs) -> dict[str, Any]:
    """Calibrate (or load c*), sweep α · c* per sign, write the survival table, trajectories and figures.

    Called with :class:`~heal_pl.survival.args.SurvivalArgs`' fields as keywords; returns the sweep's summary
    (``summary.json``) with ``calib_json``. Each finished α is recorded in ``out_dir/journal/``
    (:mod:`heal_pl.journal`); a rerun with the same arguments and ``out_dir`` continues from them, one with other
    arguments is refused (the message names them). ``thresholds`` are read from the stored pmass, so not part of
    the journal's arguments. ``splice: auto`` is resolved for the model's tokenizer
    (:meth:`~heal_pl.survival.config.SweepConfig.resolved`); the probe check stops the run before the calibration
    and before any α when the probe does not suit the model (:func:`checked_probe`). One copy of the model: the
    calibration runs on it (:func:`heal_pl.steering.run.calibrate_on`). Under ``torchrun`` the prompts are shared
    by the processes and rank 0 writes (:mod:`heal_pl.shards`).
    """
    shards.init()
    with shards.sharded():
        return _survive(args)


def _survive(args: SurvivalArgs) -> dict[str, Any]:
    config = args.sweep_config()
    arguments = {f.name: getattr(args, f.name) for f in fields(args) if f.name not in NOT_JOURNALED}
    arguments.update(config.prompts_digest())
    out = Path(args.out_dir)
    journal = Journal(out / "journal", arguments, "heal survival")
    calibrate = None if args.calib_json is not None else CalibrateArgs(
        **args.calibrate_kwargs(args.method, args.adapter_dir, str(out / "calibrate")))  # fmt: skip
    calib_journal = None if calibrate is None else calibration_journal(calibrate)  # (checked before the model loads)
    shards.block(len(config.eval_questions()), "evaluation prompts (n_eval)")
    tokenizer = load_tokenizer(args.model)
    config = config.resolved(tokenizer)  # splice "auto": the model's own probe turn
    answer_ids = answer_token_ids(tokenizer, config.answer_sets())  # names variants missing from the vocabulary
    lm = load_on(args.model, args.device, args.dtype)
    eval_prompts(lm, tokenizer, config)  # a window too long for the context fails before any calibration
    calib_json = args.calib_json
    if calibrate is not None:
        checked_probe(lm, tokenizer, None, config, answer_ids, journal)  # a probe unfit for the model stops it now
        calibrated = calibrate_on(calibrate, lm, tokenizer, calib_journal)
        steering, steered, target = calibrated.steering, calibrated.model, calibrate.target
        c_stars = {n: r.c_star for n, r in calibrated.results.items()}
        calib_json = str(out / "calibrate" / "calib.json")  # (written by rank 0 in a sharded job)
    else:
        calib_config, results = load_calibration(calib_json, args.model)
        if calib_config["method"] == "adapter":
            steering = AdapterSteering.from_pretrained(lm, calib_config["adapter_dir"])  # type: ignore[arg-type]
            steered = steering.model
        else:
            steering, steered = SteeringVector.load(Path(calib_json).parent / "vector.safetensors", model=lm), lm
        target, c_stars = float(calib_config["target"]), {n: float(r["c_star"]) for n, r in results.items()}
    names = [sign_name(s) for s in args.signs]
    missing = [n for n in names if n not in c_stars]
    if missing:
        raise ValueError(f"survival: signs {missing} were not calibrated in {calib_json} (it has {sorted(c_stars)})")
    checked_probe(steered, tokenizer, steering, config, answer_ids, journal)  # (read back after a calibration)
    writer = shards.on_writer(SummaryWriter, str(out))
    try:
        summary = sweep_survival(steered, tokenizer, steering, {n: c_stars[n] for n in names}, config, answer_ids,
                                 out, kl_target=target, writer=writer, journal=journal)  # fmt: skip
    finally:
        writer.close()
    summary["calib_json"] = str(calib_json)
    check = summary["probe_check"]
    log.info("probe check (unsteered, fork 0, %d calibration questions): mean pmass %.3f, share alive %.2f, "
             "accuracy %.2f", check["n"], check["mean_pmass"], check["share_alive"], check["accuracy"])  # fmt: skip
    log.info("survival (threshold %g, w %d)\n%s", config.threshold, config.w, markdown_table(summary["table"]))
    return summary
