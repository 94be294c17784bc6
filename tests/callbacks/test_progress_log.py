"""ProgressLog: the numbers in each line are those the trainer logged at that step."""

from __future__ import annotations

import re
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader

from heal_pl.barrier.kl import KLBarrier
from heal_pl.callbacks import ProgressLog
from heal_pl.module import HealModule
from tests.helpers import make_batch


def test_lines_carry_the_logged_values_of_their_step(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(0)
    module = HealModule(model="tiny-llama", barrier=KLBarrier(agg="max", tau=0.002), lr=5e-2, warmup_steps=0)
    logger = TensorBoardLogger(tmp_path, name="run", version=0)
    trainer = L.Trainer(accelerator="cpu", max_steps=4, logger=logger, log_every_n_steps=1, enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False,
                        callbacks=[ProgressLog(every_n_steps=2, when="always")])  # fmt: skip
    caplog.set_level("INFO", logger="heal_pl")
    trainer.fit(module, DataLoader([make_batch(seed=s) for s in range(4)], batch_size=None))
    events = EventAccumulator(logger.log_dir)
    events.Reload()
    scalars = {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in ("train/loss", "train/sft", "train/D")}
    fired = [e.value for e in events.Scalars("train/barrier_fired")]
    lines = [m for m in caplog.messages if m.startswith("step ")]
    assert [line.split()[1] for line in lines] == ["2/4", "4/4"]
    for line, steps in zip(lines, ([0, 1], [2, 3]), strict=True):
        values = dict(re.findall(r"(loss|sft|D) ([-0-9.e+]+)", line))
        for key in ("loss", "sft", "D"):  # the last step of the window (TensorBoard counts steps from 0)
            assert float(values[key]) == pytest.approx(scalars[f"train/{key}"][steps[-1]], rel=1e-3), (key, line)
        share = sum(fired[s] for s in steps) / len(steps)
        assert f"fired {share:.0%}" in line
    assert 0 < sum(fired) < 4, "the test needs steps that fire and steps that do not"
