"""Steering: residual-stream edits at decoder blocks (``hooks``), vectors fitted from prompt pairs (``vectors``),
and a LoRA adapter's delta scaled by α (``adapter``)."""

from heal_pl.steering.adapter import AdapterSteering
from heal_pl.steering.hooks import BLOCK_PATHS, SteeringMethod, add_to_blocks, find_blocks, layers_from, steer
from heal_pl.steering.vectors import (
    SteeringVector,
    last_token_states,
    mean_diff_direction,
    pca_direction,
)

__all__ = [
    "AdapterSteering",
    "BLOCK_PATHS",
    "SteeringMethod",
    "SteeringVector",
    "add_to_blocks",
    "find_blocks",
    "last_token_states",
    "layers_from",
    "mean_diff_direction",
    "pca_direction",
    "steer",
]
