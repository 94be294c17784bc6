"""The context length a model declares, and the check that a prompt plus its rollout fits it.

``context_length`` reads the first of :data:`CONTEXT_FIELDS` the (text) config sets. A config that sets none
(recurrent and state-space models have no positional limit) has no length to check against: ``None``; the
callers' checks (:func:`heal_pl.survival.forks.check_window`, ``max_new_tokens`` in
:func:`heal_pl.steering.trajectory.measure_kl`) then pass, and :func:`checked_context` logs a warning once per
model class, so the missing check is never silent.
"""

from __future__ import annotations

import logging

from torch import nn

from heal_pl.models.lm import base_lm

logger = logging.getLogger("heal_pl")

# config fields that bound the positions a model can attend over, in the order they are looked up
CONTEXT_FIELDS: tuple[str, ...] = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")
_warned: set[str] = set()


def context_length(model: nn.Module) -> int | None:
    """The most positions ``model``'s config declares (first of :data:`CONTEXT_FIELDS`), ``None`` when it has none."""
    config = getattr(base_lm(model), "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    for field in CONTEXT_FIELDS:
        value = getattr(config, field, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def checked_context(model: nn.Module, what: str) -> int | None:
    """:func:`context_length`, logging a warning (once per model class) when there is none to check ``what`` by."""
    n_ctx = context_length(model)
    name = type(base_lm(model)).__name__
    if n_ctx is None and name not in _warned:
        _warned.add(name)
        logger.warning("%s declares none of %s: %s is not checked against a context length",
                       name, ", ".join(CONTEXT_FIELDS), what)  # fmt: skip
    return n_ctx
