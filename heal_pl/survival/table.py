"""Survival of forced-choice answerability along long rollouts (docs/maths.md §4.4–§4.5): death times and Kaplan–Meier.

Pure numpy + lifelines. Inputs, for ``n`` trajectories and ``m`` fork points ``t_0 < t_1 < … < t_{m-1} = w``:

    pmass       [n, m]  probe mass at fork j of trajectory i; NaN exactly where the fork is past the end
    gen_lens    [n]     generated length g_i (a rollout that hit EOS has g_i < w)
    fork_points [m]     fork positions t_j (generated tokens before the splice), strictly increasing, ≥ 0

Fork j is *reached* by trajectory i when ``t_j ≤ g_i``. Per trajectory:

    alive at t_j      ⇔  pmass[i, j] ≥ threshold
    death             :  the first reached fork with pmass < threshold → (duration t_j, observed 1);
                         absorbing: later recoveries are ignored
    right-censoring   :  never dropped → (duration t_last, observed 0), t_last = the last reached fork
                         (= w when the rollout reached the last fork)

Kaplan–Meier (lifelines, a censored trajectory is still at risk at its censoring time):

    S(t) = Π_{t_j ≤ t} (1 − d_j / n_j),   n_j = #{i : duration_i ≥ t_j}  (excludes the dead and the censored)

Table: ``died`` = #observed deaths, ``censored`` = #alive trajectories that ended before the last fork
(g_i < w); an alive trajectory that reached w is censored at w for the estimator but not counted there.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

ArrayLike = Sequence | np.ndarray


def fork_schedule(w: int, step: int | None = None, n_log: int | None = None) -> np.ndarray:
    """Fork points in ``[0, w]`` (int64), always starting at 0 and ending at ``w``.

    Exactly one of:
      * ``step = s``: ``0, s, 2s, …`` and ``w`` appended when it is not a multiple of ``s``;
      * ``n_log = k``: ``{0} ∪ unique(round(geomspace(1, w, k − 1)))`` — log-spaced, at most ``k`` points
        (fewer when rounding makes neighbours coincide).
    """
    if isinstance(w, bool) or not isinstance(w, (int, np.integer)) or w < 1:
        raise ValueError(f"w={w!r} must be an integer ≥ 1 (the rollout window in tokens)")
    if (step is None) == (n_log is None):
        raise ValueError(f"give exactly one of step (every s tokens) or n_log (log-spaced); got step={step!r}, "
                         f"n_log={n_log!r}")
    if step is not None:
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step <= 0:
            raise ValueError(f"fork step={step!r} must be an integer > 0")
        pts = np.arange(0, w + 1, step, dtype=np.int64)
        return pts if pts[-1] == w else np.append(pts, np.int64(w))
    if isinstance(n_log, bool) or not isinstance(n_log, (int, np.integer)) or n_log < 2:
        raise ValueError(f"n_log={n_log!r} must be an integer ≥ 2 (0 and w are always included)")
    logs = np.rint(np.geomspace(1, w, n_log - 1)).astype(np.int64) if n_log > 2 else np.array([w], np.int64)
    return np.unique(np.concatenate([[0], logs, [w]]).astype(np.int64))


def _check_inputs(pmass: ArrayLike, gen_lens: ArrayLike, fork_points: ArrayLike,
                  threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Validate and return ``(pmass float64 [n, m], gen_lens int64 [n], fork_points int64 [m], reached [n, m])``."""
    if not (isinstance(threshold, (int, float, np.floating)) and 0.0 < float(threshold) < 1.0):
        raise ValueError(f"threshold={threshold!r} must be in the open interval (0, 1)")
    pm = np.asarray(pmass, dtype=np.float64)
    g = np.asarray(gen_lens)
    f = np.asarray(fork_points)
    if pm.ndim != 2 or pm.shape[0] == 0 or pm.shape[1] == 0:
        raise ValueError(f"pmass must be a non-empty 2-D array [n_traj, n_forks], got shape {pm.shape}")
    if f.ndim != 1 or f.shape[0] != pm.shape[1]:
        raise ValueError(f"fork_points shape {f.shape} does not match pmass shape {pm.shape}: need [{pm.shape[1]}]")
    if g.ndim != 1 or g.shape[0] != pm.shape[0]:
        raise ValueError(f"gen_lens shape {g.shape} does not match pmass shape {pm.shape}: need [{pm.shape[0]}]")
    for name, a in (("fork_points", f), ("gen_lens", g)):
        if not (np.issubdtype(a.dtype, np.integer) or (np.issubdtype(a.dtype, np.floating)
                                                      and np.all(np.isfinite(a)) and np.all(a == np.rint(a)))):
            raise ValueError(f"{name} must hold integers (token counts), got {a.tolist()}")
        if np.any(a < 0):
            raise ValueError(f"{name} must be ≥ 0, got {a.tolist()}")
    f, g = f.astype(np.int64), g.astype(np.int64)
    if np.any(np.diff(f) <= 0):
        raise ValueError(f"fork_points must be strictly increasing, got {f.tolist()}")
    reached = f[None, :] <= g[:, None]
    bad = np.argwhere(reached & ~np.isfinite(pm))
    if bad.size:
        i, j = bad[0]
        raise ValueError(f"pmass[{i}, {j}] is {pm[i, j]} but fork t={f[j]} ≤ gen_lens[{i}]={g[i]} was reached")
    bad = np.argwhere(~reached & ~np.isnan(pm))
    if bad.size:
        i, j = bad[0]
        raise ValueError(f"pmass[{i}, {j}] = {pm[i, j]:g} must be NaN: fork t={f[j]} is past gen_lens[{i}]={g[i]}")
    fin = pm[reached]
    if np.any((fin < 0) | (fin > 1 + 1e-6)):
        raise ValueError(f"pmass values must lie in [0, 1], got range [{fin.min():g}, {fin.max():g}]")
    none = np.flatnonzero(~reached.any(axis=1))
    if none.size:
        i = int(none[0])
        raise ValueError(f"trajectory {i} reached no fork: gen_lens[{i}]={g[i]} < first fork t={f[0]}")
    return pm, g, f, reached


def death_times(
    pmass: ArrayLike, gen_lens: ArrayLike, fork_points: ArrayLike, threshold: float = 0.95
) -> tuple[np.ndarray, np.ndarray]:
    """Per trajectory ``(duration [n] int64, observed [n] bool)`` as in the module docstring.

    ``duration`` is the fork ``t`` of the first drop (``pmass < threshold``, ``observed=True``) or of the
    last reached fork (censored, ``observed=False``).
    """
    pm, _, f, reached = _check_inputs(pmass, gen_lens, fork_points, threshold)
    dead = reached & (pm < threshold)  # NaN compares False; unreached forks are masked anyway
    observed = dead.any(axis=1)
    first_drop = np.argmax(dead, axis=1)
    last_reached = reached.shape[1] - 1 - np.argmax(reached[:, ::-1], axis=1)
    durations = f[np.where(observed, first_drop, last_reached)]
    return durations.astype(np.int64), observed


def survival_table(
    pmass: ArrayLike,
    gen_lens: ArrayLike,
    fork_points: ArrayLike,
    threshold: float = 0.95,
    ci_alpha: float = 0.05,
) -> dict:
    """Kaplan–Meier survival of ``pmass ≥ threshold`` (lifelines) and its summary row.

    Returns a dict with
      * ``n``, ``died``, ``censored`` (alive trajectories with ``gen_len < w``, ``w = fork_points[-1]``);
      * ``t_mid`` (the fork nearest ``w/2``; ties go to the earlier fork) and ``S_mid = S(t_mid)``;
      * ``S_end = S(w)``; ``t_half`` = the first fork with ``S ≤ 0.5`` (int) or ``None`` when never; ``S`` is a
        float product (7/8 · 6/7 · 5/6 · 4/5 reads 0.5000000000000001), so ``S ≤ 0.5 + 1e-9`` counts as ≤ 0.5;
      * ``S_forks`` = ``S`` at every fork point [m];
      * ``curve`` = ``{"timeline", "S", "lower", "upper"}`` float64 arrays, lifelines' fitted step curve and
        its ``1 − ci_alpha`` confidence band (exponential Greenwood);
      * ``durations``, ``observed`` from :func:`death_times`.
    """
    if not (isinstance(ci_alpha, (int, float, np.floating)) and 0.0 < float(ci_alpha) < 1.0):
        raise ValueError(f"ci_alpha={ci_alpha!r} must be in the open interval (0, 1)")
    from lifelines import KaplanMeierFitter

    durations, observed = death_times(pmass, gen_lens, fork_points, threshold)
    g = np.asarray(gen_lens).astype(np.int64)
    f = np.asarray(fork_points).astype(np.int64)
    w = int(f[-1])
    kmf = KaplanMeierFitter(alpha=float(ci_alpha)).fit(durations, event_observed=observed)
    S_forks = np.asarray(kmf.survival_function_at_times(f).values, dtype=np.float64)
    j_mid = int(np.argmin(np.abs(f - w / 2.0)))
    below = np.flatnonzero(S_forks <= 0.5 + 1e-9)  # KM's float product may land a hair above 0.5
    ci = kmf.confidence_interval_survival_function_
    return {
        "n": int(durations.size),
        "died": int(observed.sum()),
        "censored": int(np.sum(~observed & (g < w))),
        "t_mid": int(f[j_mid]),
        "S_mid": float(S_forks[j_mid]),
        "S_end": float(S_forks[-1]),
        "t_half": int(f[below[0]]) if below.size else None,
        "S_forks": S_forks,
        "curve": {
            "timeline": np.asarray(kmf.survival_function_.index, dtype=np.float64),
            "S": np.asarray(kmf.survival_function_.iloc[:, 0].values, dtype=np.float64),
            "lower": np.asarray(ci.iloc[:, 0].values, dtype=np.float64),
            "upper": np.asarray(ci.iloc[:, 1].values, dtype=np.float64),
        },
        "durations": durations,
        "observed": observed,
    }
