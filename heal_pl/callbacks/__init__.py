"""Lightning callbacks that bring heal_pl to any trainer."""

from heal_pl.callbacks.isokl_calibration import IsoKLCalibrationCallback
from heal_pl.callbacks.kl_barrier import KLBarrierCallback

__all__ = ["IsoKLCalibrationCallback", "KLBarrierCallback"]
