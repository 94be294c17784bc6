"""Exact resume: a ``heal fit`` killed with SIGKILL and resumed with ``--ckpt_path`` ends with the adapter of
the uninterrupted run.

``python -m heal_pl.cli fit`` subprocesses on tiny-llama (LoRA dropout on, so the RNG matters too; a checkpoint
after every step; validation at every epoch end): an uninterrupted run, runs that SIGKILL themselves at the end of
a step, before that step's checkpoint is written (a pre-empted node loses the work since its last checkpoint), and
their resumptions from the last checkpoint they wrote. The resumed runs cross an epoch end, a validation and the
next epoch, so the data order of both epochs, the optimizer and LR-scheduler state and the dropout RNG all have to
come back.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from heal_pl.data.datamodule import EpochShuffleSampler
from heal_pl.resume import resume_point

ROOT = Path(__file__).resolve().parents[1]
KILL_STEPS = (4, 7)  # 11 train rows / batch_size 2 = 6 batches an epoch; max_steps 10 ends in epoch 1
KILLER = '''
import os, signal
from lightning.pytorch.callbacks import Callback

class KillAt(Callback):
    """SIGKILL this process at the end of training step ``step`` (before its checkpoint is written)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)
'''


def _config(tmp_path: Path, name: str, kill: int | None = None) -> Path:
    callbacks = [{
        "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
        "init_args": {"dirpath": str(tmp_path / name / "ckpt"), "filename": "{step}", "every_n_train_steps": 1,
                      "save_top_k": -1},
    }]  # fmt: skip
    if kill is not None:
        callbacks.append({"class_path": "resume_killer.KillAt", "init_args": {"step": kill}})
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu", "devices": 1, "max_steps": 10, "log_every_n_steps": 1, "num_sanity_val_steps": 0,
            "enable_progress_bar": False, "enable_model_summary": False, "limit_val_batches": 1,
            "callbacks": callbacks,
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                       "init_args": {"save_dir": str(tmp_path), "name": name}},
        },
        "model": {"model": "tiny-llama", "lora": {"r": 4, "alpha": 8.0, "dropout": 0.2}, "lr": 1e-2,
                  "warmup_steps": 2, "barrier": {"reg": "kl_rev", "agg": "rmse", "tau": 0.0, "lam": 1.0},
                  "adapter_dir": str(tmp_path / name / "adapter")},
        "data": {"max_length": 48, "batch_size": 2, "max_examples": 12, "val_fraction": 0.1,
                 "train_file": str(ROOT / "heal_pl/data/assets/persona_val.jsonl")},
    }  # fmt: skip
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _start(tmp_path: Path, config: Path, *extra: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(tmp_path)]), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "heal_pl.cli", "fit", "--config", str(config), *extra],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


def _wait(proc: subprocess.Popen[str], returncode: int) -> str:
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == returncode, out[-3000:]
    return out


def _adapter(tmp_path: Path, name: str) -> dict[str, torch.Tensor]:
    return load_file(tmp_path / name / "adapter" / "adapter_model.safetensors")


@pytest.mark.slow  # two subprocess fits, one killed (~30 s)
def test_sigkill_then_resume_gives_the_uninterrupted_adapter(tmp_path: Path) -> None:
    """Killed mid-epoch 0 (resumed from step 3 of 6) and right after epoch 0's last step (resumed from step 6,
    before the epoch-end validation and the next epoch's first batch): both end bit-for-bit on the adapter of
    the uninterrupted run. Same float32 operations in the same order on one CPU thread, so the tolerance is 0;
    without the RNG restore the difference is ~4e-2, without the data position ~5e-2, with DataLoaders drawing their
    seeds from the global RNG 9e-3 after the epoch-end kill (the adapter moves ~6e-2)."""
    (tmp_path / "resume_killer.py").write_text(KILLER)
    procs = {"straight": _start(tmp_path, _config(tmp_path, "straight"))}
    procs |= {f"kill{s}": _start(tmp_path, _config(tmp_path, f"kill{s}", kill=s)) for s in KILL_STEPS}
    _wait(procs.pop("straight"), 0)
    resumed = {}
    for step in KILL_STEPS:
        name = f"kill{step}"
        _wait(procs[name], -signal.SIGKILL)
        ckpts = sorted((tmp_path / name / "ckpt").glob("*.ckpt"), key=lambda p: int(p.stem.split("=")[1]))
        assert [p.name for p in ckpts] == [f"step={s}.ckpt" for s in range(1, step)]
        assert not (tmp_path / name / "adapter").exists()
        resumed[name] = _start(tmp_path, _config(tmp_path, name), "--ckpt_path", str(ckpts[-1]))
    straight = _adapter(tmp_path, "straight")
    for name, proc in resumed.items():
        out = _wait(proc, 0)
        assert "resume:" in out or name == f"kill{KILL_STEPS[1]}", out[-3000:]  # epoch end: nothing to skip
        adapter = _adapter(tmp_path, name)
        assert adapter.keys() == straight.keys()
        diff = max((adapter[k] - straight[k]).abs().max().item() for k in straight)
        print(f"{name}: resumed vs uninterrupted adapter, max |diff| = {diff:.3g}")
        assert diff == 0.0, (name, diff)
    moved = max(v.abs().max().item() for k, v in straight.items() if "lora_B" in k)  # lora_B starts at 0
    assert moved > 1e-2  # the runs did train


def test_sampler_skips_the_finished_indices_of_the_resumed_epoch_only() -> None:
    sampler = EpochShuffleSampler(10, seed=3, resume=(1, 4))
    sampler.set_epoch(1)
    full = torch.randperm(10, generator=torch.Generator().manual_seed(3 + 1)).tolist()
    assert list(sampler) == full[4:] and len(sampler) == 10
    assert list(sampler) == full  # once only
    later = EpochShuffleSampler(10, seed=3, resume=(0, 4))
    later.set_epoch(1)  # the checkpoint's epoch is over: nothing to skip
    assert list(later) == full


SETTINGS = {"seed": 0, "batch_size": 2, "n_train": 11}


def test_resume_point_mid_epoch_and_at_epoch_ends() -> None:
    state = {"epoch": 1, "batches_done": 3, **SETTINGS}
    assert resume_point(state, SETTINGS) == (1, 6)
    assert resume_point({**state, "batches_done": 6}, SETTINGS) is None  # ceil(11 / 2) = 6: the epoch is done
    assert resume_point({**state, "batches_done": 0}, SETTINGS) is None
    assert resume_point({}, SETTINGS) is None  # a checkpoint written outside fit, or before this feature


@pytest.mark.parametrize("field", sorted(SETTINGS))
def test_resume_mid_epoch_with_other_data_settings_names_the_setting(field: str) -> None:
    state = {"epoch": 0, "batches_done": 2, **SETTINGS}
    expected = rf"data\.{field}={SETTINGS[field]} in the checkpoint, {SETTINGS[field] + 1} now"
    with pytest.raises(ValueError, match=expected):
        resume_point(state, {**SETTINGS, field: SETTINGS[field] + 1})
