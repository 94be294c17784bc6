"""Gradient routing (docs/maths.md §2): each step's gradient on a routed adapter is split along a hack basis into the
kept ``delta`` and the quarantined ``delta_hack``, which is ablated at deployment.

``project`` is the pure projection maths, ``basis`` fits the hack basis from contrastive pairs, ``train`` applies
the projection inside a Lightning step, ``hack_task`` is the bundled hackable task that exercises it.
The adapter itself lives in :mod:`heal_pl.adapters.routed`; the evaluation callback in
:mod:`heal_pl.callbacks.route_ablate`.
"""

from heal_pl.routing.basis import HackBasis, Pair, fit_basis, read_pairs
from heal_pl.routing.hack_task import HackTaskEval
from heal_pl.routing.project import Arm, Gate, check_basis, fired, project, projection_metrics
from heal_pl.routing.train import find_routed_adapter, force_zero_hack_decay, hack_decay_groups, route_gradients

__all__ = [
    "Arm",
    "Gate",
    "HackBasis",
    "HackTaskEval",
    "Pair",
    "check_basis",
    "find_routed_adapter",
    "fired",
    "fit_basis",
    "force_zero_hack_decay",
    "hack_decay_groups",
    "project",
    "projection_metrics",
    "read_pairs",
    "route_gradients",
]
