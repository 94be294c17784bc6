"""Forced-choice probes and survival (docs/maths.md §4): roll out under a steering dose, probe the answer format at fork
points on the rollout's own KV cache, and draw Kaplan–Meier curves of when the format dies.

``probes`` reads the answer-set mass, ``forks`` / ``fork_mask`` / ``fork_cache`` read every fork on the rollout's
own cache (sliding-window and linear-attention layers included) in one forward per ``fork_batch``, ``table``
turns pmass trajectories into lifelines survival tables, ``sweep`` runs the α grid, ``plotting`` draws the
figures, and ``run`` is ``heal survival``. From the stored trajectories alone (``stored``): ``attribution``
(KL before each death vs the survivors), ``thresholds`` (the table at other thresholds, ``heal thresholds``) and
``fan`` (per-token KL quantiles over t). ``compare`` is ``heal compare`` (methods side by side at iso-KL, beside
a system-prompt baseline).
"""

import importlib
from typing import Any

from heal_pl.survival.args import CompareArgs, SurvivalArgs, SweepArgs
from heal_pl.survival.attribution import attribute_deaths, transitions, window_stats
from heal_pl.survival.config import ALPHAS, SweepConfig
from heal_pl.survival.fan import fan_figure, kl_quantiles
from heal_pl.survival.forks import ForkResult, fork_probe, probe_forks, rollout
from heal_pl.survival.plotting import save_figure, spaghetti_figure, survival_figure
from heal_pl.survival.probes import DEFAULT_ANSWER_SETS, AnswerSet, answer_token_ids, probe_from_logits, probe_splice
from heal_pl.survival.run import load_calibration, run_survival
from heal_pl.survival.stored import by_label, load_trajectories
from heal_pl.survival.sweep import sweep_survival
from heal_pl.survival.table import death_times, fork_schedule, survival_table
from heal_pl.survival.thresholds import run_thresholds, threshold_sensitivity

__all__ = [
    "ALPHAS",
    "AnswerSet",
    "CompareArgs",
    "DEFAULT_ANSWER_SETS",
    "ForkResult",
    "SurvivalArgs",
    "SweepArgs",
    "SweepConfig",
    "answer_token_ids",
    "attribute_deaths",
    "by_label",
    "death_times",
    "fan_figure",
    "fork_probe",
    "fork_schedule",
    "kl_quantiles",
    "load_calibration",
    "load_trajectories",
    "probe_forks",
    "probe_from_logits",
    "probe_splice",
    "prompt_survival",
    "rollout",
    "run_compare",
    "run_survival",
    "run_thresholds",
    "save_figure",
    "spaghetti_figure",
    "survival_figure",
    "survival_table",
    "sweep_survival",
    "threshold_sensitivity",
    "transitions",
    "window_stats",
]

# ``compare`` is the command on top of the others (``heal survival`` per method, which runs ``heal calibrate``): its
# names load on first use, as heal_pl's own do, so that this package's import does not sit above that whole stack
# (the import chain that tests/test_import_chain.py bounds).
_LAZY = {"prompt_survival": "heal_pl.survival.compare", "run_compare": "heal_pl.survival.compare"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'heal_pl.survival' has no attribute {name!r}")
