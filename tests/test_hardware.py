"""``device`` and ``dtype`` of ``heal calibrate|survival|rounds`` (heal_pl.hardware): resolution, errors, help."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import heal_pl.hardware as hardware
import heal_pl.rounds.loop
from heal_pl.cli import main
from heal_pl.hardware import load_on, resolve_device, resolve_dtype, trainer_settings
from heal_pl.steering.run import run_calibration
from heal_pl.survival.run import run_survival
from tests.helpers import heal_error
from tests.rounds.test_run import CONFIGS, TINY

COMMANDS = ("calibrate", "survival", "compare", "rounds")


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture
def two_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)


def test_devices_resolve(no_cuda) -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cpu")  # no CUDA: auto is the CPU


def test_auto_and_cuda_n_pick_the_gpu(two_gpus) -> None:
    assert resolve_device("auto") == torch.device("cuda", 0)
    assert resolve_device("cuda") == torch.device("cuda", 0)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ValueError, match=r"device='cuda:2': torch sees 2 CUDA device\(s\); use cuda:0 … cuda:1"):
        resolve_device("cuda:2")
    assert trainer_settings("cuda:1", "bfloat16") == {"accelerator": "gpu", "devices": [1], "precision": "bf16-mixed"}


@pytest.mark.parametrize("device", ["gpu", "cuda:x", "mps", "", "CPU"])
def test_unknown_devices_list_the_allowed_ones(device: str) -> None:
    with pytest.raises(ValueError, match=rf"device='{device}' is not allowed; choose one of auto, cpu, cuda, cuda:N"):
        resolve_device(device)


@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
def test_cuda_asked_for_and_absent_is_a_clear_error(device: str, no_cuda) -> None:
    with pytest.raises(ValueError, match=rf"device='{device}' asks for CUDA, but torch sees no CUDA device.*"
                                         r"use device='cpu'"):  # fmt: skip
        resolve_device(device)


def test_unknown_dtypes_list_the_allowed_ones() -> None:
    with pytest.raises(ValueError, match="dtype='fp8' is not allowed; choose one of auto, float32, bfloat16, float16"):
        load_on("tiny-llama", "cpu", "fp8")  # type: ignore[arg-type]


def test_load_on_gives_the_dtype_and_device() -> None:
    model = load_on("tiny-llama", "cpu", "bfloat16")
    p = next(model.parameters())
    assert p.dtype == torch.bfloat16 and p.device == torch.device("cpu") and not model.training


def test_auto_dtype_is_bfloat16_on_cuda_and_float32_on_the_cpu(two_gpus) -> None:
    assert resolve_dtype("auto", "cpu") == "float32"
    assert resolve_dtype("auto", "auto") == resolve_dtype("auto", "cuda:1") == "bfloat16"
    assert resolve_dtype("float16", "cpu") == "float16"  # a named dtype is kept
    assert trainer_settings("auto", "auto")["precision"] == "bf16-mixed"
    assert trainer_settings("cpu", "auto")["precision"] == "32-true"


def test_load_on_auto_loads_float32_on_the_cpu() -> None:
    assert next(load_on("tiny-llama", "cpu").parameters()).dtype == torch.float32


def test_trainer_settings_follow_device_and_dtype_unless_given(no_cuda) -> None:
    assert trainer_settings("cpu", "float32") == {"accelerator": "cpu", "devices": 1, "precision": "32-true"}
    assert trainer_settings("auto", "float16")["precision"] == "16-mixed"
    assert trainer_settings("cpu", "bfloat16", accelerator="cpu", devices=2, precision="bf16-true") == {
        "accelerator": "cpu", "devices": 2, "precision": "bf16-true"}
    assert hardware.PRECISION == {"float32": "32-true", "bfloat16": "bf16-mixed", "float16": "16-mixed"}


@pytest.mark.parametrize("command", COMMANDS)
def test_help_shows_device_and_dtype(command: str, capsys) -> None:
    with pytest.raises(SystemExit) as done:
        main([command, "--help"])
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines where it likes
    assert "--device DEVICE" in text and "--dtype {auto,float32,bfloat16,float16}" in text
    assert "cuda:N" in text and "default: auto" in text and "default: float32" not in text
    if command == "rounds":
        assert all(f"--heal.{k}" in text for k in ("accelerator", "devices", "precision"))


@pytest.mark.parametrize("run", [run_calibration, run_survival], ids=["calibrate", "survival"])
def test_bad_device_or_dtype_fails_before_any_work(run, tmp_path: Path, no_cuda, monkeypatch) -> None:
    def no_loading(*args: object, **kwargs: object) -> None:
        raise AssertionError("a model was loaded before the bad device/dtype was reported")

    monkeypatch.setattr(hardware, "load_model", no_loading)
    with pytest.raises(ValueError, match="device='tpu' is not allowed"):
        run(model="tiny-llama", device="tpu", out_dir=str(tmp_path))
    with pytest.raises(ValueError, match="dtype='half' is not allowed"):
        run(model="tiny-llama", device="cpu", dtype="half", out_dir=str(tmp_path))
    with pytest.raises(ValueError, match="device='cuda' asks for CUDA, but torch sees no CUDA device"):
        run(model="tiny-llama", device="cuda", out_dir=str(tmp_path))


def test_cli_refuses_an_unknown_device(tmp_path: Path, no_cuda, capsys) -> None:
    line = heal_error(["rounds", "--config", str(CONFIGS / "rounds_rmse.yaml"), *TINY, "--device", "cuda:one",
                       "--out_dir", str(tmp_path)], capsys)  # fmt: skip
    assert re.search(r"device='cuda:one' is not allowed", line)


class _Stop(Exception):
    pass


def test_the_rounds_heal_fit_takes_its_trainer_settings_from_the_config(tmp_path: Path, monkeypatch) -> None:
    seen: list[dict] = []

    def trainer(**kwargs: object) -> None:
        seen.append(kwargs)
        raise _Stop

    monkeypatch.setattr(heal_pl.rounds.loop.L, "Trainer", trainer)
    args = ["rounds", "--config", str(CONFIGS / "rounds_rmse.yaml"), *TINY, "--device", "cpu"]
    with pytest.raises(_Stop):
        main([*args, "--dtype", "bfloat16", "--out_dir", str(tmp_path / "a")])
    assert {k: seen[-1][k] for k in ("accelerator", "devices", "precision")} == {
        "accelerator": "cpu", "devices": 1, "precision": "bf16-mixed"}  # fmt: skip
    with pytest.raises(_Stop):
        main([*args, "--heal.precision", "32-true", "--heal.devices", "1", "--out_dir", str(tmp_path / "b")])
    assert seen[-1]["precision"] == "32-true" and seen[-1]["accelerator"] == "cpu"
