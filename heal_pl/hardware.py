"""Where and in what precision a command runs: the ``device`` and ``dtype`` of ``heal calibrate|survival|rounds``.

| ``device``  | means                                                                  |
|-------------|------------------------------------------------------------------------|
| ``auto``    | ``cuda`` (the current CUDA device) when torch sees one, else ``cpu``   |
| ``cpu``     | the CPU                                                                |
| ``cuda``    | the current CUDA device; an error when torch sees none                 |
| ``cuda:N``  | CUDA device ``N``; an error when there is no such device               |

``dtype`` (``auto`` | ``float32`` | ``bfloat16`` | ``float16``) is the dtype the model's weights are loaded in;
``auto`` (the default) is ``bfloat16`` on a CUDA device and ``float32`` on the CPU (:func:`resolve_dtype`). The
per-token KLs, log-probabilities and statistics are float32 whatever it is. The heal fit
of ``heal rounds`` trains under Lightning with the matching precision (``32-true`` | ``bf16-mixed`` |
``16-mixed``) unless its config names one (:func:`trainer_settings`).
"""

from __future__ import annotations

import os
import re
from typing import Any, Literal

import torch
from torch import nn

from heal_pl.checks import check_choice
from heal_pl.models.load import Dtype, load_model

DEVICES = ("auto", "cpu", "cuda", "cuda:N")
PRECISION = {"float32": "32-true", "bfloat16": "bf16-mixed", "float16": "16-mixed"}
RunDtype = Literal["auto", "float32", "bfloat16", "float16"]  # a command's ``dtype``: ``auto`` or a Dtype


def resolve_device(device: str) -> torch.device:
    """The ``torch.device`` named by ``device`` (table in the module docstring).

    Raises:
        ValueError: ``device`` is none of ``auto``, ``cpu``, ``cuda``, ``cuda:N``; CUDA asked for but absent; no
            device ``N``.
    """
    if not isinstance(device, str) or not (device in DEVICES[:3] or re.fullmatch(r"cuda:\d+", device)):
        raise ValueError(f"device={device!r} is not allowed; choose one of {', '.join(DEVICES)}")
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError(
            f"device={device!r} asks for CUDA, but torch sees no CUDA device (torch {torch.__version__}, built for "
            f"CUDA {torch.version.cuda}, CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}); "
            "use device='cpu' (or 'auto', which falls back to the CPU)")  # fmt: skip
    if device in ("auto", "cuda"):
        return torch.device("cuda", torch.cuda.current_device())
    index, count = int(device.split(":")[1]), torch.cuda.device_count()
    if index >= count:
        raise ValueError(f"device={device!r}: torch sees {count} CUDA device(s); use cuda:0 … cuda:{count - 1}")
    return torch.device(device)


def auto_dtype(device: torch.device | None = None) -> Dtype:
    """The dtype of a frozen base whose precision the user left to heal_pl (``dtype: auto``): ``bfloat16`` on a
    CUDA device (half the memory of float32, the dtype models are trained in), else ``float32`` (a CPU runs bfloat16
    ~2.7x slower). ``device`` is where the model will run; ``None`` = CUDA whenever torch sees one (a LightningModule
    does not know its device yet). Trainable weights stay float32 either way."""
    on_cuda = device.type == "cuda" if device is not None else torch.cuda.is_available()
    return "bfloat16" if on_cuda else "float32"


def resolve_dtype(dtype: RunDtype, device: str | torch.device = "auto") -> Dtype:
    """``dtype`` itself, or for ``auto`` the dtype :func:`auto_dtype` picks for ``device`` (a ``device`` string is
    resolved by :func:`resolve_device`). ``ValueError`` listing the allowed values for anything else."""
    check_dtype(dtype)
    if dtype != "auto":
        return dtype  # type: ignore[return-value]
    return auto_dtype(device if isinstance(device, torch.device) else resolve_device(device))


def check_dtype(dtype: str) -> None:
    """``ValueError`` listing the allowed dtypes unless ``dtype`` is one of them (``auto`` included)."""
    check_choice("dtype", dtype, RunDtype)


def load_on(name: str, device: str = "auto", dtype: RunDtype = "auto") -> nn.Module:
    """:func:`heal_pl.models.load.load_model` in ``dtype`` (``auto``: :func:`resolve_dtype`), moved to ``device``,
    in eval mode (both checked first)."""
    where = resolve_device(device)
    return load_model(name, dtype=resolve_dtype(dtype, where)).to(where).eval()


def trainer_settings(device: str, dtype: RunDtype, accelerator: str | None = None, devices: Any = None,
                     precision: str | None = None) -> dict[str, Any]:  # fmt: skip
    """Lightning ``Trainer`` arguments for one fit next to a model on ``device`` in ``dtype``: each of
    ``accelerator``, ``devices``, ``precision`` that is ``None`` follows them (cpu → ``cpu``/1, cuda:N → ``gpu``/[N];
    precision from :data:`PRECISION`)."""
    where = resolve_device(device)
    dtype = resolve_dtype(dtype, where)
    if accelerator is None:
        accelerator = "gpu" if where.type == "cuda" else "cpu"
    if devices is None:
        devices = [where.index or 0] if where.type == "cuda" and accelerator in ("gpu", "cuda", "auto") else 1
    return {"accelerator": accelerator, "devices": devices, "precision": precision or PRECISION[dtype]}
