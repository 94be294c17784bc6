"""Choosing tau from a barrier-free run's own per-token KL: the matched rule of the loop experiment.

``D_agg[t]`` is the logged ``train/kl_<agg>`` at step ``t = 1..T`` of a run whose barrier never pushed (the config
with ``lam: 0``: exactly SFT's gradient, the per-token KL still logged), ``k = max(1, ⌊tail · T⌋)``:

    base_agg     = (1/k) Σ_{t > T-k} D_agg[t]            the mean over the last quarter (tail = 0.25)
    tau_agg(m)   = m · base_agg                          one margin m for every agg ∈ {mean, rmse, p95, max}
    fired_agg(m) = (1/T) Σ_t [D_agg[t] > tau_agg(m)]     the share of steps a barrier at that tau would push on

docs/experiments/loop.md used m = 1.5, then 1.1. ``fired`` is read on this run's own trajectory; a real barrier
fires less, since each push lowers the steps after it. The mean of the first ``k`` steps stands beside ``base``:
how far the run drifted.

Plain Python on lists of floats (``statistics.fmean``: exactly rounded sums, whatever the order);
:func:`read_scalars` reads a TensorBoard event file or folder with tensorboard's ``EventAccumulator``. The
``heal tau`` command is :func:`heal_pl.barrier.run.run_tau`.
"""

from __future__ import annotations

import logging
import math
import os
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import get_args

from heal_pl.barrier.kl import Agg

AGGS: tuple[str, ...] = get_args(Agg)  # mean, rmse, p95, max
MS: tuple[float, ...] = (1.1, 1.5, 2.0)
TAIL = 0.25
FIRED = "barrier_fired"  # train/barrier_fired: 1.0 on the steps where the run's own barrier had D > tau


@dataclass(frozen=True)
class TauSuggestion:
    """One aggregate's trajectory and its taus: ``tau[m] = m · last``, ``fired[m]`` the share of the ``steps`` steps
    above ``tau[m]``; ``first`` / ``last`` the means of the first / last ``window`` steps, ``low`` / ``high`` the
    trajectory's min / max."""

    agg: str
    steps: int
    window: int
    first: float
    last: float
    low: float
    high: float
    tau: dict[float, float]
    fired: dict[float, float]


def window_size(steps: int, tail: float = TAIL) -> int:
    """``k = max(1, ⌊tail · steps⌋)``, the number of steps the last-quarter mean covers (``tail = 0.25``).

    >>> window_size(108), window_size(36), window_size(3)
    (27, 9, 1)
    """
    return max(1, math.floor(steps * tail + 1e-9))  # 1e-9: 0.29 · 100 is 28.999... in floating point


def tail_mean(series: Sequence[float], tail: float = TAIL) -> float:
    """The mean of the last :func:`window_size` values of ``series``.

    >>> tail_mean([0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0])
    7.0
    """
    return statistics.fmean(series[len(series) - window_size(len(series), tail) :])


def head_mean(series: Sequence[float], tail: float = TAIL) -> float:
    """The mean of the first :func:`window_size` values of ``series`` (where the run started from).

    >>> head_mean([0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0])
    0.5
    """
    return statistics.fmean(series[: window_size(len(series), tail)])


def fired_share(series: Sequence[float], tau: float) -> float:
    """``(1/T) Σ_t [series[t] > tau]``: the share of steps a barrier at ``tau`` would have pushed on.

    >>> fired_share([0.5, 1.0, 1.5, 2.0], 1.0)
    0.5
    """
    return statistics.fmean(value > tau for value in series)


def check_margins(ms: Sequence[float]) -> tuple[float, ...]:
    """``ms`` as floats; ``ValueError`` naming ``ms`` unless a non-empty list of distinct finite numbers > 0."""
    ok = (isinstance(ms, Sequence) and not isinstance(ms, str) and len(ms) > 0
          and all(isinstance(m, int | float) and not isinstance(m, bool) and math.isfinite(m) and m > 0 for m in ms)
          and len(set(ms)) == len(ms))  # fmt: skip
    if not ok:
        raise ValueError(f"ms={list(ms) if isinstance(ms, Sequence) else ms!r} must be a non-empty list of distinct "
                         "numbers > 0 (tau = m × the last-quarter mean; 1.1, 1.5, 2 by default)")
    return tuple(float(m) for m in ms)


def check_tail(tail: float) -> float:
    """``tail`` as a float; ``ValueError`` naming ``tail`` unless ``0 < tail <= 1``."""
    if isinstance(tail, bool) or not isinstance(tail, int | float) or not 0 < tail <= 1:
        raise ValueError(f"tail={tail!r} must be in (0, 1]: the share of the last steps tau is measured on "
                         "(0.25: the last quarter)")
    return float(tail)


def kl_series(trajectory: Mapping[str, Sequence[float]]) -> dict[str, list[float]]:
    """``{agg: trajectory["kl_<agg>"]}`` for every aggregate present, in :data:`AGGS` order.

    Raises:
        ValueError: no ``kl_<agg>`` key, an empty series, or a value that is not finite (the message names the
            tag and the step).
    """
    found = {a: [float(v) for v in trajectory[f"kl_{a}"]] for a in AGGS if f"kl_{a}" in trajectory}
    if not found:
        raise ValueError(f"no train/kl_<agg> scalars among {sorted(trajectory) or 'none'}: a run with reg: nll logs "
                         "no per-token KL (use reg: kl_rev with lam: 0 for a barrier-free run)")
    for agg, series in found.items():
        if not series:
            raise ValueError(f"train/kl_{agg} has no step")
        bad = next((t for t, v in enumerate(series) if not math.isfinite(v)), None)
        if bad is not None:
            raise ValueError(f"train/kl_{agg} is {series[bad]} at step {bad}: the run diverged; no tau can be read")
    return found


def suggest_taus(
    trajectory: Mapping[str, Sequence[float]], ms: Sequence[float] = MS, tail: float = TAIL
) -> dict[str, TauSuggestion]:
    """Per aggregate: the first- and last-quarter means, min / max, ``tau = m · last`` for each ``m`` and the share
    of the steps above it (formulas: the module docstring).

    Args:
        trajectory: per-step ``kl_mean`` / ``kl_rmse`` / ``kl_p95`` / ``kl_max`` (others are ignored), as
            :func:`read_scalars` returns them or as the loop experiment's rows store them.
        ms: the margins, each > 0.
        tail: the share of the last steps the base is averaged over (0.25: the last quarter).

    >>> s = suggest_taus({"kl_mean": [0.0, 1.0, 2.0, 4.0]}, ms=(1.1, 2.0))["mean"]
    >>> s.last, s.tau[2.0], s.fired[1.1], s.window
    (4.0, 8.0, 0.0, 1)
    """
    ms, tail = check_margins(ms), check_tail(tail)
    out = {}
    for agg, series in kl_series(trajectory).items():
        last = tail_mean(series, tail)
        tau = {m: m * last for m in ms}
        out[agg] = TauSuggestion(agg=agg, steps=len(series), window=window_size(len(series), tail),
                                 first=head_mean(series, tail), last=last, low=min(series), high=max(series), tau=tau,
                                 fired={m: fired_share(series, t) for m, t in tau.items()})  # fmt: skip
    return out


def read_scalars(log_dir: str | os.PathLike, prefix: str = "train/") -> dict[str, list[float]]:
    """The ``prefix*`` scalars of a TensorBoard event file, or of the event files of a folder, in step order and
    without the prefix: ``{"kl_mean": [...], "loss": [...], ...}``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})  # 0: every step, none sampled away
    quiet, level = logging.getLogger("tensorboard"), logging.getLogger("tensorboard").level
    quiet.setLevel(max(level, logging.WARNING))  # its INFO "No path found after <file>" ends every read
    try:
        acc.Reload()
    finally:
        quiet.setLevel(level)
    tags = [t for t in acc.Tags()["scalars"] if t.startswith(prefix)]
    return {t.removeprefix(prefix): [e.value for e in sorted(acc.Scalars(t), key=lambda e: e.step)] for t in tags}


def event_files(path: Path) -> list[Path]:
    """The TensorBoard event files ``path`` stands for: itself if a file, else the ``events.out.tfevents.*`` in it."""
    return [path] if path.is_file() else sorted(path.glob("events.out.tfevents.*"))


def read_trajectory(events: str | os.PathLike, field: str = "events") -> dict[str, list[float]]:
    """The ``train/kl_<agg>`` trajectories (and ``train/barrier_fired`` when logged) of a run's event file or folder.

    Raises:
        ValueError: naming ``field``: the path does not exist; a folder without event files (the message lists the
            sub-folders that hold some, e.g. ``version_0``); event files without ``train/kl_*`` scalars.
    """
    path = Path(events).expanduser()
    where = f"{field}={os.fspath(events)!r}"
    if not path.exists():
        raise ValueError(f"{where} does not exist; give a run's log folder (runs/rmse/version_0) or its event file")
    if not event_files(path):
        inside = sorted({str(p.parent) for p in path.rglob("events.out.tfevents.*")})
        hint = f"; these folders below it hold some: {', '.join(inside[:5])}" if inside else ""
        raise ValueError(f"{where} holds no TensorBoard event file (events.out.tfevents.*){hint}")
    scalars = read_scalars(path)
    keep = [k for k in (*(f"kl_{a}" for a in AGGS), FIRED) if k in scalars]
    if not any(k.startswith("kl_") for k in keep):
        tags = ", ".join(f"train/{k}" for k in sorted(scalars)) or "no train/ scalar at all"
        raise ValueError(f"{where} has no train/kl_mean|kl_rmse|kl_p95|kl_max scalars (found: {tags}): the run was "
                         "reg: nll (no per-token KL is logged) or logged nothing; run the config with reg: kl_rev and "
                         "lam: 0 (heal tau --config <config> does)")
    return {k: scalars[k] for k in keep}


def _num(x: float) -> str:
    return f"{x:.3g}"


def tau_table(suggestions: Mapping[str, TauSuggestion]) -> str:
    """A Markdown table: per aggregate, first → last window mean, min / max, and ``tau (fired)`` for each ``m``.

    >>> print(tau_table(suggest_taus({"kl_max": [1.0, 2.0, 3.0, 4.0]}, ms=(1.5,))))
    | agg | first 1 → last 1 of 4 steps | min / max | m = 1.5: tau (fired) |
    |---|---|---|---|
    | max | 1 → 4 | 1 / 4 | 6 (0 %) |
    """
    some = next(iter(suggestions.values()))
    head = [f"first {some.window} → last {some.window} of {some.steps} steps", "min / max"]
    head += [f"m = {m:g}: tau (fired)" for m in some.tau]
    lines = ["| agg | " + " | ".join(head) + " |", "|" + "---|" * (len(head) + 1)]
    for s in suggestions.values():
        cells = [f"{_num(s.first)} → {_num(s.last)}", f"{_num(s.low)} / {_num(s.high)}"]
        cells += [f"{_num(t)} ({s.fired[m] * 100:.0f} %)" for m, t in s.tau.items()]
        lines.append(f"| {s.agg} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def usage_line(suggestions: Mapping[str, TauSuggestion], agg: str | None = None, config: str | None = None) -> str:
    """How to train with one of the taus: ``heal fit --config <config> --model.barrier.tau TAU``, with the taus of
    ``agg``'s row (the config's own aggregate; None when unknown: ``--model.barrier.agg`` too).

    >>> print(usage_line(suggest_taus({"kl_p95": [1.0, 2.0]}, ms=(1.1, 2.0)), "p95", "p95"))
    use: heal fit --config p95 --model.barrier.tau TAU, TAU = 2.2 (m = 1.1) or 4 (m = 2) (the p95 row: the config's agg)
    """
    command = f"heal fit --config {config or '<your config>'}"
    if agg in suggestions:
        taus = [f"{_num(t)} (m = {m:g})" for m, t in suggestions[agg].tau.items()]
        choice = ", ".join(taus[:-1]) + " or " + taus[-1] if len(taus) > 1 else taus[0]
        return f"use: {command} --model.barrier.tau TAU, TAU = {choice} (the {agg} row: the config's agg)"
    return f"use: {command} --model.barrier.agg AGG --model.barrier.tau TAU, TAU from that aggregate's row"
