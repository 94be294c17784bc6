"""Steering and iso-KL calibration (docs/maths.md §3): edit the residual stream by a coefficient α, measure
KL(steered ‖ base) along the steered model's own greedy rollout, and find the α at which that KL meets a budget.

``hooks`` edits decoder blocks, ``vectors`` fits mean_diff / pca / directional_ablation vectors from prompt pairs,
``adapter`` scales a trained adapter's delta by α, ``trajectory`` measures the KL, ``calibrate`` is the pure root
finder, ``isokl`` joins the two, ``prompt_baseline`` measures a system prompt against none the same way, and ``run`` is
``heal calibrate``.
"""

from heal_pl.steering.adapter import AdapterSteering
from heal_pl.steering.args import CalibrateArgs, CalibrationSettings, MethodArgs, SteeringArgs
from heal_pl.steering.calibrate import Calibration, calibrate
from heal_pl.steering.hooks import BLOCK_PATHS, SteeringMethod, add_to_blocks, find_blocks, layers_from, steer
from heal_pl.steering.isokl import IsoKLResult, calibrate_method
from heal_pl.steering.prompt_baseline import SystemPrompt, prompt_kl
from heal_pl.steering.run import run_calibration
from heal_pl.steering.trajectory import STATS, TrajectoryKL, measure_kl, trajectory_stats
from heal_pl.steering.vectors import SteeringVector, last_token_states, mean_diff_direction, pca_direction

__all__ = [
    "AdapterSteering",
    "BLOCK_PATHS",
    "CalibrateArgs",
    "CalibrationSettings",
    "Calibration",
    "IsoKLResult",
    "MethodArgs",
    "STATS",
    "SteeringArgs",
    "SteeringMethod",
    "SteeringVector",
    "SystemPrompt",
    "TrajectoryKL",
    "add_to_blocks",
    "calibrate",
    "calibrate_method",
    "find_blocks",
    "last_token_states",
    "layers_from",
    "mean_diff_direction",
    "measure_kl",
    "pca_direction",
    "prompt_kl",
    "run_calibration",
    "steer",
    "trajectory_stats",
]
