"""``heal survival``: when does a steering dose crash the model? Survival of forced-choice answers per α.

    heal survival --config configs/survival.yaml

Steps: (1) calibrate c* per sign with ``heal calibrate`` (:func:`heal_pl.steering.run.run_calibration`,
written into ``out_dir/calibrate``) or load an existing ``calib.json`` (its steering vector
``vector.safetensors`` next to it, or its ``adapter_dir``); (2) sweep α · c* over the bundled true/false
evaluation questions, reading a forced-choice probe at the forks of every rollout
(:func:`heal_pl.survival.sweep.sweep_survival`, SPEC §4); (3) write the survival table, the trajectories
and the figures (files and TensorBoard tags listed in :mod:`heal_pl.survival.sweep`).
"""

from __future__ import annotations

import inspect
import logging
from pathlib import Path
from typing import Any, Literal

from torch.utils.tensorboard import SummaryWriter

from heal_pl.checks import read_json_object
from heal_pl.hardware import check_dtype, load_on, resolve_device
from heal_pl.journal import Journal
from heal_pl.models.load import Dtype, load_tokenizer
from heal_pl.steering.adapter import AdapterSteering
from heal_pl.steering.run import run_calibration
from heal_pl.steering.vectors import SteeringVector
from heal_pl.survival.probes import DEFAULT_ANSWER_SETS, answer_token_ids
from heal_pl.survival.sweep import ALPHAS, SPLICE, SweepConfig, eval_prompts, markdown_table, sweep_survival

log = logging.getLogger("heal_pl")

# set by run_survival
OWN = ("model", "device", "dtype", "method", "adapter_dir", "layers", "target", "stat", "signs", "out_dir")
CALIBRATION_KEYS = sorted(set(inspect.signature(run_calibration).parameters) - set(OWN))  # the `calibration` dict


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


def run_survival(
    model: str = "smollm2-135m-instruct",
    device: str = "auto",
    dtype: Dtype = "float32",
    calib_json: str | None = None,
    method: Literal["mean_diff", "pca", "directional_ablation", "adapter"] = "mean_diff",
    adapter_dir: str | None = None,
    layers: list[float] | list[int] | float | int = 0.5,
    target: float = 1.0,
    stat: Literal["mean", "p50", "p90", "p95", "p99", "max", "rms"] = "p95",
    signs: list[int] = [1, -1],  # noqa: B006 (jsonargparse reads the default)
    calibration: dict[str, Any] | None = None,
    alphas: list[float] = list(ALPHAS),  # noqa: B006,B008
    w: int = 64,
    fork_step: int | None = 4,
    n_log_forks: int | None = None,
    threshold: float = 0.95,
    splice: str = SPLICE,
    n_eval: int | None = None,
    stop_at_eos: bool = True,
    batch_size: int = 8,
    fork_batch: int = 64,
    smooth: int = 5,
    normalise: bool = False,
    true_variants: list[str] = list(DEFAULT_ANSWER_SETS[0].variants),  # noqa: B006,B008
    false_variants: list[str] = list(DEFAULT_ANSWER_SETS[1].variants),  # noqa: B006,B008
    out_dir: str = "runs/survival",
    thresholds: list[float] | None = None,
) -> dict[str, Any]:
    """Calibrate (or load c*), sweep α · c* per sign, write the survival table, trajectories and figures.

    Args:
        model: model alias, folder or Hugging Face id.
        device: ``auto`` (CUDA when present, else CPU), ``cpu``, ``cuda`` or ``cuda:N`` (:mod:`heal_pl.hardware`).
        dtype: the dtype the weights are loaded in: ``float32``, ``bfloat16`` or ``float16`` (calibration too).
        calib_json: a ``calib.json`` from ``heal calibrate`` on the same model; ``None`` = calibrate now with
            ``method``, ``adapter_dir``, ``layers``, ``target``, ``stat``, ``signs`` and ``calibration``.
        method, adapter_dir, layers, target, stat: as in ``heal calibrate`` (ignored with ``calib_json``).
        signs: the signs to sweep (+1, -1); with ``calib_json`` each must have been calibrated there.
        calibration: further ``heal calibrate`` arguments (``n_fit``, ``n_calib``, ``n_audit``, ``bracket``,
            ``tol``, ``max_iters``, ``max_new_tokens``, ``batch_size``, ``pos_system``, ``neg_system``).
        alphas: the multiples of c* (default 0, .25, .5, .75, 1, 1.5, 2, 4).
        w: rollout window (tokens); fork_step / n_log_forks: forks every s tokens / log-spaced (one of them).
        threshold: alive while the probe mass ``pmass ≥ threshold`` (0 < threshold < 1).
        splice: the probe's answer prefix; true_variants / false_variants: the answer sets' surface forms.
        n_eval: bundled evaluation questions to use (``None`` = all); stop_at_eos: censor rollouts at EOS.
        batch_size: prompts per rollout forward; fork_batch: forks per probe forward.
        smooth, normalise: spaghetti smoothing width; divide each trajectory by the p95 of its first 20 tokens.
        out_dir: where the files, figures and TensorBoard events go (calibration in ``out_dir/calibrate``).
        thresholds: also write the table at these pmass thresholds (``thresholds.csv``/``.md``, figures;
            :mod:`heal_pl.survival.thresholds`); read from the stored pmass, so not part of the journal's arguments.

    Each finished α is recorded in ``out_dir/journal/`` (:mod:`heal_pl.journal`); a rerun with the same arguments
    and ``out_dir`` continues from them, one with other arguments is refused (the message names them).
    """
    arguments = {k: v for k, v in locals().items() if k not in ("out_dir", "thresholds")}  # the journal's steps' inputs
    config = SweepConfig(alphas=alphas, w=w, fork_step=fork_step, n_log_forks=n_log_forks, threshold=threshold,
                         splice=splice, n_eval=n_eval, stop_at_eos=stop_at_eos, batch_size=batch_size,
                         fork_batch=fork_batch, smooth=smooth, normalise=normalise, true_variants=true_variants,
                         false_variants=false_variants, thresholds=thresholds)  # fmt: skip
    if not signs or set(signs) - {1, -1} or len(set(signs)) != len(signs):
        raise ValueError(f"survival: signs={signs} must hold +1 and/or -1, each once")
    extra = dict(calibration or {})
    unknown = sorted(set(extra) - set(CALIBRATION_KEYS))
    if unknown:
        raise ValueError(f"survival: calibration keys {unknown} are not heal calibrate arguments; "
                         f"allowed: {CALIBRATION_KEYS}")
    check_dtype(dtype)
    resolve_device(device)
    out = Path(out_dir)
    journal = Journal(out / "journal", arguments, "heal survival")
    tokenizer = load_tokenizer(model)
    answer_ids = answer_token_ids(tokenizer, config.answer_sets())  # names variants missing from the vocabulary
    lm = load_on(model, device, dtype)
    eval_prompts(lm, tokenizer, config)  # a window too long for the context fails before any calibration
    if calib_json is None:
        calib_dir = out / "calibrate"
        run_calibration(model=model, device=device, dtype=dtype, method=method, adapter_dir=adapter_dir,
                        layers=layers, target=target, stat=stat, signs=signs, out_dir=str(calib_dir),
                        **extra)  # fmt: skip
        calib_json = str(calib_dir / "calib.json")
    calib_config, results = load_calibration(calib_json, model)
    names = ["+" if s > 0 else "-" for s in signs]
    missing = [n for n in names if n not in results]
    if missing:
        raise ValueError(f"survival: signs {missing} were not calibrated in {calib_json} (it has {sorted(results)})")
    if calib_config["method"] == "adapter":
        steering: Any = AdapterSteering.from_pretrained(lm, calib_config["adapter_dir"])  # type: ignore[arg-type]
        steered = steering.model
    else:
        steering, steered = SteeringVector.load(Path(calib_json).parent / "vector.safetensors", model=lm), lm
    writer = SummaryWriter(str(out))
    try:
        summary = sweep_survival(steered, tokenizer, steering, {n: float(results[n]["c_star"]) for n in names},
                                 config, answer_ids, out, kl_target=float(calib_config["target"]),
                                 writer=writer, journal=journal)  # fmt: skip
    finally:
        writer.close()
    summary["calib_json"] = str(calib_json)
    check = summary["probe_check"]
    log.info("probe check (unsteered, fork 0, %d calibration questions): mean pmass %.3f, share alive %.2f, "
             "accuracy %.2f", check["n"], check["mean_pmass"], check["share_alive"], check["accuracy"])  # fmt: skip
    log.info("survival (threshold %g, w %d)\n%s", threshold, w, markdown_table(summary["table"]))
    return summary
