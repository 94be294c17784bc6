"""Trainable adapters: the peft LoRA student (``lora``)."""

from heal_pl.adapters.lora import LoRASpec, spectral_norms, wrap_lora

__all__ = ["LoRASpec", "spectral_norms", "wrap_lora"]
