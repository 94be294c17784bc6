"""``ProgressLog``: progress as log lines, for runs whose output goes to a file or a job scheduler.

Lightning's progress bar is drawn for a terminal; sent to a file it is a stream of carriage returns, and
disabled it leaves nothing between the model summary and the end of the run. ``ProgressLog`` writes one
``logging`` line (logger ``heal_pl``) every ``every_n_steps`` optimizer steps::

    step 12/36 · loss 2.314 · sft 2.101 · D 0.871 · fired 42% · 0.83 steps/s · ETA 0:00:29

- ``loss``, ``sft``, ``D``: the ``train/*`` scalars of the last step (``D`` only with a barrier);
- ``fired``: the share of the steps since the previous line whose barrier fired (``train/barrier_fired``);
- ``steps/s`` over the same steps, and the ETA to ``max_steps`` (or the estimated total) at that rate;

and one line per validation: ``validation at step 18 · sft 1.902 · kl_mean 0.031 · kl_p95 0.12 · kl_max 0.9``.
``heal fit`` adds it (``progress:`` in the YAML); with ``when="auto"`` it writes only when stdout is not a
terminal (:func:`heal_pl.progress.interactive`), where the CLI also turns the bar off.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any, Literal

import lightning as L
from lightning.pytorch.callbacks import Callback

from heal_pl.checks import check_choice
from heal_pl.progress import duration, interactive

log = logging.getLogger("heal_pl")
When = Literal["auto", "always", "never"]
VAL_KEYS = ("sft", "kl_mean", "kl_rmse", "kl_p95", "kl_max")


def progress_line(step: int, total: int | None, metrics: dict[str, float], fired: float | None, rate: float) -> str:
    """One progress line (module docstring); ``total`` None or <= 0 leaves out the total and the ETA."""
    parts = [f"step {step}/{total}" if total and total > 0 else f"step {step}"]
    parts += [f"{k} {metrics[k]:.4g}" for k in ("loss", "sft", "D") if k in metrics]
    if fired is not None:
        parts.append(f"fired {fired:.0%}")
    parts.append(f"{rate:.3g} steps/s")
    if total and total > 0 and rate > 0:
        parts.append(f"ETA {duration((total - step) / rate)}")
    return " · ".join(parts)


class ProgressLog(Callback):
    """Logs a progress line every ``every_n_steps`` optimizer steps and one line per validation.

    Args:
        every_n_steps: steps between two lines (the last step always gets one).
        when: ``auto`` = only when stdout is not a terminal; ``always``; ``never``.

    Raises:
        ValueError: ``every_n_steps < 1`` or an unknown ``when``.

    Example::

        trainer = L.Trainer(callbacks=[ProgressLog(every_n_steps=50)], enable_progress_bar=False)
    """

    def __init__(self, every_n_steps: int = 10, when: When = "auto") -> None:
        check_choice("when", when, When)
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps={every_n_steps} must be >= 1")
        self.every_n_steps, self.when = every_n_steps, when
        self._reset(0)

    @property
    def active(self) -> bool:
        return self.when == "always" or (self.when == "auto" and not interactive(sys.stdout))

    def _reset(self, step: int) -> None:
        self._t0, self._step0, self._fired = time.perf_counter(), step, []

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._reset(trainer.global_step)
        self._last_step = trainer.global_step

    def _total(self, trainer: L.Trainer) -> int | None:
        if trainer.max_steps and trainer.max_steps > 0:
            return trainer.max_steps
        total = trainer.estimated_stepping_batches
        return int(total) if total != float("inf") else None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:  # fmt: skip
        step = trainer.global_step
        if not self.active or step == self._last_step:  # accumulating gradients: no optimizer step yet
            return
        self._last_step = step
        metrics = {k.removeprefix("train/"): float(v) for k, v in trainer.callback_metrics.items()
                   if k.startswith("train/") and getattr(v, "numel", lambda: 1)() == 1}  # fmt: skip
        if "barrier_fired" in metrics:
            self._fired.append(metrics["barrier_fired"])
        total = self._total(trainer)
        if step % self.every_n_steps and step != total:
            return
        rate = (step - self._step0) / max(time.perf_counter() - self._t0, 1e-9)
        fired = sum(self._fired) / len(self._fired) if self._fired else None
        if trainer.is_global_zero:
            log.info("%s", progress_line(step, total, metrics, fired, rate))
        self._reset(step)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.active or trainer.sanity_checking or not trainer.is_global_zero:
            return
        m = trainer.callback_metrics
        parts = [f"{k} {float(m['val/' + k]):.4g}" for k in VAL_KEYS if f"val/{k}" in m]
        if parts:
            log.info("validation at step %d · %s", trainer.global_step, " · ".join(parts))
