"""``heal tau``: the taus of the matched rule (:mod:`heal_pl.barrier.tau`) for your own model and data.

    heal tau --events runs/rmse/version_0      # a finished run: read its train/kl_* and print the table
    heal tau --config rmse                     # run the config barrier-free first, then the same

With ``--config``, the run is ``heal fit --config <config>`` with ``--model.barrier.lam 0`` (exactly SFT's gradient;
the per-token KL is still logged), ``--trainer.log_every_n_steps 1`` (every step in the trajectory), no checkpoint,
``--trainer.max_steps <steps>`` when given, and a TensorBoard log in a fresh folder ``<out>/<config name>/version_N``.
A ``reg: nll`` config is refused: it logs no per-token KL.

Printed: per aggregate the trajectory (first-quarter mean → last-quarter mean, min / max), ``tau = m ×`` the
last-quarter mean for each margin and the share of the steps above it, then how to train with one. Written into the
run's folder: ``tau.json`` (the numbers) and ``tau.png`` (each aggregate's trajectory with its taus).
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from heal_pl.barrier.tau import (
    FIRED,
    MS,
    TAIL,
    TauSuggestion,
    check_margins,
    check_tail,
    kl_series,
    read_trajectory,
    suggest_taus,
    tau_table,
    usage_line,
)
from heal_pl.configs import FOLDER, resolve_config


def read_yaml(config: str) -> dict[str, Any]:
    """The mapping a config holds: a file's, or inline YAML's (``--config`` takes both)."""
    path = Path(config).expanduser()
    spec = yaml.safe_load(path.read_text(encoding="utf-8") if path.is_file() else config)
    if not isinstance(spec, dict):
        raise ValueError(f"config={config!r} is not a `heal fit` config (a YAML mapping with model:, trainer:, ...)")
    return spec


def barrier_of(spec: Mapping[str, Any]) -> dict[str, Any]:
    """``model.barrier`` of a ``heal fit`` config, with KLBarrier's defaults for the keys it leaves out."""
    model = spec.get("model") or {}
    barrier = model.get("barrier") if isinstance(model, Mapping) else None
    return {"reg": "kl_rev", "agg": "rmse", "lam": 1.0, **(barrier if isinstance(barrier, Mapping) else {})}


def fit_barrier_free(config: str, steps: int | None, out: str) -> Path:
    """``heal fit --config <config>`` with lam 0, every step logged, no checkpoint, a fresh TensorBoard folder under
    ``out``; returns that folder.

    Raises:
        ValueError: ``model.barrier.reg`` is ``nll`` (no per-token KL is logged), or ``steps`` < 1.
    """
    from heal_pl.cli import build_cli  # the top of the package: imported when the command runs, never at import

    reg = barrier_of(read_yaml(config))["reg"]
    if reg == "nll":
        raise ValueError(f"model.barrier.reg='nll' in config={config!r}: reg nll logs no per-token KL, so there is "
                         "no trajectory to read tau from; give a config with reg: kl_rev (or kl_fwd): heal tau sets "
                         "lam 0 itself")  # fmt: skip
    if steps is not None and (isinstance(steps, bool) or steps < 1):
        raise ValueError(f"steps={steps!r} must be >= 1 (or left out: the config's own max_steps)")
    logger = {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
              "init_args": {"save_dir": out, "name": Path(config).stem if Path(config).is_file() else "tau"}}
    args = ["fit", "--config", config, "--model.barrier.lam", "0",
            "--trainer.log_every_n_steps", "1", "--trainer.enable_checkpointing", "false",
            "--trainer.logger", json.dumps(logger)]  # fmt: skip
    if steps is not None:
        args += ["--trainer.max_steps", str(steps)]
    cli = build_cli(args)
    return Path(cli.trainer.log_dir)


def config_name(config: str) -> str:
    """How ``heal fit --config`` names ``config`` (already resolved): a bundled config by its name (``rmse``),
    anything else as given."""
    path = Path(config).expanduser().resolve()
    return path.relative_to(FOLDER).with_suffix("").as_posix() if path.is_relative_to(FOLDER) else config


def saved_barrier(run_dir: Path) -> dict[str, Any] | None:
    """The barrier a run trained with, from the ``config.yaml`` that ``heal fit`` writes into its log folder."""
    path = run_dir / "config.yaml"
    return barrier_of(read_yaml(str(path))) if path.is_file() else None


def tau_figure(trajectory: Mapping[str, Sequence[float]], suggestions: Mapping[str, TauSuggestion]) -> Figure:
    """One panel per aggregate: ``train/kl_<agg>`` per step, a line per tau, the last-quarter window shaded."""
    series = kl_series(trajectory)
    cols = 2 if len(series) > 1 else 1
    rows = math.ceil(len(series) / cols)
    fig = Figure(figsize=(4.6 * cols, 2.9 * rows))
    FigureCanvasAgg(fig)
    styles = ("--", "-.", ":", (0, (5, 1, 1, 1)))
    for k, (agg, values) in enumerate(series.items()):
        s = suggestions[agg]
        ax = fig.add_subplot(rows, cols, k + 1)
        steps = range(1, len(values) + 1)
        ax.axvspan(s.steps - s.window + 0.5, s.steps + 0.5, color="0.9", label=f"last {s.window} steps")
        ax.plot(steps, values, color="tab:blue", lw=1.2, label=f"train/kl_{agg}")
        for j, (m, tau) in enumerate(s.tau.items()):
            ax.axhline(tau, color="black", ls=styles[j % len(styles)], lw=1,
                       label=f"m = {m:g}: tau {tau:.3g}, fired {s.fired[m]:.0%}")  # fmt: skip
        ax.set(title=agg, xlabel="step", ylabel="per-token KL (nats)", xlim=(0.5, s.steps + 0.5))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6.5, loc="best")
    fig.suptitle("tau = m × the last-quarter mean of a barrier-free run", fontsize=10)
    fig.tight_layout()
    return fig


def tau_record(suggestions: Mapping[str, TauSuggestion], **about: Any) -> dict[str, Any]:
    """The numbers of ``tau.json``: ``about`` (run folder, config, ...) and per aggregate first / last / min / max,
    ``tau`` and ``fired`` by margin (``"1.5"``)."""
    rows = {agg: {"first": s.first, "last": s.last, "min": s.low, "max": s.high,
                  "tau": {f"{m:g}": t for m, t in s.tau.items()}, "fired": {f"{m:g}": f for m, f in s.fired.items()}}
            for agg, s in suggestions.items()}  # fmt: skip
    some = next(iter(suggestions.values()))
    return {**about, "steps": some.steps, "window": some.window, "aggregates": rows}


def summary(suggestions: Mapping[str, TauSuggestion], run_dir: Path, barrier: Mapping[str, Any] | None,
            run_fired: float | None, config: str | None) -> str:
    """What ``heal tau`` prints: a header, :func:`~heal_pl.barrier.tau.tau_table`, a note when the run's own barrier
    pushed (its KL is then lower than SFT's), and :func:`~heal_pl.barrier.tau.usage_line` for the config's agg."""
    some = next(iter(suggestions.values()))
    lines = [f"heal tau: {run_dir}: {some.steps} steps of train/kl_*; tau = m × the mean of the last {some.window} "
             f"steps, fired = the share of all {some.steps} steps above tau", tau_table(suggestions)]  # fmt: skip
    lam = barrier.get("lam") if barrier else None
    if run_fired and lam != 0:
        lines.append(f"note: this run's own barrier (lam {lam if lam is not None else 'unknown'}) fired on "
                     f"{run_fired * 100:.0f} % of its steps: where it pushed, its KL sits below SFT's, so these taus "
                     "come out tighter than the rule's; heal tau --config <its config> runs it with lam 0")  # fmt: skip
    lines.append(usage_line(suggestions, barrier.get("agg") if barrier else None, config))
    return "\n".join(lines)


def run_tau(
    events: str | None = None,
    config: str | None = None,
    steps: int | None = None,
    out: str = "runs/tau",
    ms: tuple[float, ...] = MS,
    tail: float = TAIL,
) -> dict[str, Any]:
    """Suggest a tau per aggregate from a barrier-free run: ``tau = m × mean(train/kl_<agg> over the last quarter)``.

    Args:
        events: a finished run's log folder (``runs/rmse/version_0``) or its event file: read it, no training.
        config: a ``heal fit`` config (a file or a bundled name, ``rmse``): run it with ``lam 0`` (SFT's gradient,
            the per-token KL logged) first, then read that run. Give ``events`` or ``config``.
        steps: with ``config``, the training steps (default: the config's own ``max_steps``).
        out: with ``config``, where the run's TensorBoard folder goes (``<out>/<config name>/version_N``).
        ms: the margins m; each tau is m × the last-quarter mean.
        tail: the share of the last steps the mean is taken over (0.25: the last quarter).
    """
    if (events is None) == (config is None):
        raise ValueError(f"give events (a finished run's log folder) or config (a `heal fit` config to run "
                         f"barrier-free), one of them; got events={events!r}, config={config!r}")  # fmt: skip
    ms, tail = check_margins(ms), check_tail(tail)  # before a run of minutes, not after it
    if events is not None and steps is not None:
        raise ValueError(f"steps={steps} is for --config runs; events={events!r} is read as it is")
    if config is not None:
        config = resolve_config(config)  # a bundled name -> its file (heal tau's main() has done it already)
        run_dir = fit_barrier_free(config, steps, out)
        trajectory = read_trajectory(run_dir)
    else:
        trajectory = read_trajectory(events)
        run_dir = Path(events).expanduser()
        run_dir = run_dir.parent if run_dir.is_file() else run_dir
    suggestions = suggest_taus(trajectory, ms, tail)
    barrier = saved_barrier(run_dir)
    run_fired = statistics.fmean(trajectory[FIRED]) if trajectory.get(FIRED) else None
    record = tau_record(suggestions, events=str(run_dir), config=config, tail=tail, ms=list(ms),
                        barrier=barrier, run_fired=run_fired)  # fmt: skip
    (run_dir / "tau.json").write_text(json.dumps(record, indent=1) + "\n")
    tau_figure(trajectory, suggestions).savefig(run_dir / "tau.png", dpi=90)
    name = config_name(config) if config is not None and Path(config).is_file() else None  # None: inline YAML
    print(summary(suggestions, run_dir, barrier, run_fired, name))
    print(f"wrote {run_dir / 'tau.json'}, {run_dir / 'tau.png'}")
    return record
