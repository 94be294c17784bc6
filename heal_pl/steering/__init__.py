"""Steering: residual-stream edits at decoder blocks (``hooks``) and vectors fitted from prompt pairs (``vectors``)."""

from heal_pl.steering.hooks import BLOCK_PATHS, SteeringMethod, add_to_blocks, find_blocks, layers_from, steer
from heal_pl.steering.vectors import (
    SteeringVector,
    last_token_states,
    mean_diff_direction,
    pca_direction,
)

__all__ = [
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
