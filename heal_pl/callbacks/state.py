"""Checkpoint state of heal_pl's callbacks: keys that tell instances apart, and checkpoints from before them.

Lightning stores a callback's ``state_dict`` under ``checkpoint["callbacks"][callback.state_key]``; the default key is
the class name, so two instances of one class in a Trainer (e.g. two ``KLBarrierCallback`` with different
``prefix``) would overwrite each other's state. Each stateful heal_pl callback builds its key with
``Callback._generate_state_key`` from the arguments that distinguish instances (always its ``prefix``).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from lightning.pytorch.callbacks import Callback


def load_legacy_state(callback: Callback, checkpoint: Mapping[str, Any]) -> None:
    """Load ``callback``'s state from a checkpoint written before it had its own ``state_key`` (stored under the
    class name then): call from ``on_load_checkpoint``, which runs before Lightning's ``load_state_dict``; a
    checkpoint holding the new key is left to Lightning."""
    states = checkpoint.get("callbacks") or {}
    legacy = type(callback).__qualname__
    if callback.state_key not in states and legacy != callback.state_key and states.get(legacy):
        callback.load_state_dict(copy.deepcopy(states[legacy]))
