"""Lightning callbacks that bring heal_pl to any trainer."""

from heal_pl.callbacks.isokl_calibration import IsoKLCalibrationCallback
from heal_pl.callbacks.kl_barrier import KLBarrierCallback
from heal_pl.callbacks.progress_log import ProgressLog
from heal_pl.callbacks.route_ablate import RouteAblateEvalCallback

__all__ = ["IsoKLCalibrationCallback", "KLBarrierCallback", "ProgressLog", "RouteAblateEvalCallback"]
