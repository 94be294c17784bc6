"""A quantized frozen base (QLoRA): the decoder blocks' linear weights in 4 or 8 bits through bitsandbytes.

| ``quantize`` | the blocks' linear weights                                    | memory per weight |
|--------------|---------------------------------------------------------------|-------------------|
| ``none``     | as ``dtype`` says                                             | 2 or 4 bytes      |
| ``nf4``      | 4-bit NormalFloat, double-quantized scales (QLoRA's choice)   | ~0.52 byte        |
| ``fp4``      | 4-bit float, double-quantized scales                          | ~0.52 byte        |
| ``int8``     | LLM.int8() (8-bit rows, outliers in 16 bits)                  | ~1 byte           |

The LM head and the embeddings stay in ``dtype`` (transformers never quantizes the output embeddings), so the fused
head and :func:`heal_pl.models.lm.check_head` work unchanged; the 4-bit matmuls compute in ``dtype``. The ref is the
same quantized base with the adapter off: student and ref share every quantized weight, so the KL between them
is exact, and a zero adapter reads KL 0. bitsandbytes is an optional dependency: ``pip install 'heal_pl[quant]'``.

On a CPU with AVX512-BF16, bitsandbytes repacks a 4-bit weight for inference the first time its layer runs in eval
mode on an input that needs no gradient, and from then on multiplies by it with a kernel that has no backward: the
gradient stops at that layer, silently. heal_pl keeps every base module in eval mode and runs the ref without
gradients, so :func:`keep_training_layout` turns the repacking off at load time
(``tests/models/test_quantize.py`` compares the adapter's gradients with those of a float twin holding the
dequantized weights).
"""

from __future__ import annotations

import importlib.util
from typing import Any, Literal

import torch
from torch import nn

from heal_pl.checks import check_choice

Quantize = Literal["none", "nf4", "fp4", "int8"]
EXTRA = "pip install 'heal_pl[quant]'  (bitsandbytes)"


def check_backend(quantize: str) -> None:
    """``ValueError`` naming the allowed values, or the extra to install when bitsandbytes is missing; checked before
    any weight is loaded."""
    check_choice("quantize", quantize, Quantize)
    if quantize != "none" and importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError(f"quantize={quantize!r} needs bitsandbytes, which is not installed: {EXTRA}")


def quantization_kwargs(quantize: str, compute_dtype: torch.dtype) -> dict[str, Any]:
    """``from_pretrained`` keyword arguments for ``quantize`` (none: none): the ``BitsAndBytesConfig`` and the
    device the quantized weights are made on (the current CUDA device when torch sees one, else the CPU)."""
    check_backend(quantize)
    if quantize == "none":
        return {}
    from transformers import BitsAndBytesConfig

    if quantize == "int8":
        config = BitsAndBytesConfig(load_in_8bit=True)
    else:
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quantize,
                                    bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute_dtype)  # fmt: skip
    device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
    return {"quantization_config": config, "device_map": {"": device}}


def keep_training_layout(model: nn.Module) -> int:
    """Turn off bitsandbytes' CPU repacking of 4-bit weights for inference (module docstring) in every layer of
    ``model``; returns the number of layers it applied to."""
    layers = [m for m in model.modules() if hasattr(m, "support_avx512bf16_for_cpu")]
    for m in layers:
        m.support_avx512bf16_for_cpu = False
    return len(layers)


def is_quantized(model: nn.Module) -> bool:
    """Whether ``model`` (plain or peft-wrapped) holds bitsandbytes-quantized weights."""
    return any(type(p).__module__.startswith("bitsandbytes") for p in model.parameters())
