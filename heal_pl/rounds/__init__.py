"""Steer → heal rounds (docs/maths.md §5): steer the current student toward a trait, keep the coherent samples, heal a
fresh adapter on them with the KL barrier, stack it on the earlier ones, repeat.

``loop`` runs one round and the loop, ``dose`` is the dose controller, ``filters`` the coherence filter, ``stack``
keeps the history as frozen adapters on one copy of the base weights, ``bake`` merges adapters into the weights
(an export), ``dilemmas`` the trait and coherence probes, ``state`` the resumable on-disk
state, ``report`` the table and figure, and ``run`` is ``heal rounds``.
"""

from heal_pl.rounds.bake import bake_adapter, bake_history
from heal_pl.rounds.dilemmas import DilemmaSet, PersonaPair, load_dilemmas, load_persona_pair, probe_model
from heal_pl.rounds.dose import search_dose
from heal_pl.rounds.filters import filter_samples, repetition_share, tail_perplexity
from heal_pl.rounds.loop import Dose, Filter, Heal, RoundsContext, Sampling, run_loop, run_round
from heal_pl.rounds.report import markdown_report, rounds_table, trajectory_figure
from heal_pl.rounds.run import run_rounds
from heal_pl.rounds.stack import load_stack, push_adapter
from heal_pl.rounds.state import RoundsState

__all__ = [
    "DilemmaSet",
    "Dose",
    "Filter",
    "Heal",
    "PersonaPair",
    "RoundsContext",
    "RoundsState",
    "Sampling",
    "bake_adapter",
    "bake_history",
    "filter_samples",
    "load_dilemmas",
    "load_persona_pair",
    "load_stack",
    "markdown_report",
    "probe_model",
    "push_adapter",
    "repetition_share",
    "rounds_table",
    "run_loop",
    "run_round",
    "run_rounds",
    "search_dose",
    "tail_perplexity",
    "trajectory_figure",
]
