"""Tiny randomly initialised causal LMs of every family heal_pl supports, built in code (no network).

Each family keeps the feature that makes it differ from Llama where heal_pl must follow the model's own
forward: Gemma-2's logit soft-cap, Gemma-3's sliding-window layers (window 8, shorter than a prompt + rollout),
Qwen3.5's hybrid linear/full attention, Cohere's ``logit_scale``, Granite's ``logits_scaling``, GPT-2's Conv1D
layers and dropout 0.1, Phi-3's fused ``qkv_proj`` / ``gate_up_proj``. All share hidden size 64, 2 layers (4 for the
hybrids), 4 heads and the vocabulary of :func:`heal_pl.models.load.tiny_tokenizer`; ``tiny_model(family)`` builds one.

:data:`WRAPPED_FAMILIES` are multimodal wrappers, kept out of :data:`FAMILIES`: ``gemma3_vl`` is what
``AutoModelForCausalLM.from_pretrained`` gives for a gemma-3-4b-it folder, a ``Gemma3ForConditionalGeneration``
(a SigLIP vision tower, a projector, and the tiny gemma3 decoder at ``model.language_model``; head tied to the
embeddings, as gemma-3-4b-it's is). heal_pl only ever feeds it text.
"""

from __future__ import annotations

from typing import Any, Literal

import transformers
from transformers import PretrainedConfig

Family = Literal[
    "llama", "mistral", "qwen2", "qwen3", "qwen3_5", "gemma2", "gemma3", "olmo2", "phi3", "cohere", "granite", "gpt2",
]
FAMILIES: tuple[str, ...] = Family.__args__  # type: ignore[attr-defined]
WrappedFamily = Literal["gemma3_vl"]
WRAPPED_FAMILIES: tuple[str, ...] = WrappedFamily.__args__  # type: ignore[attr-defined]

_COMMON = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
               max_position_embeddings=512, tie_word_embeddings=False, bos_token_id=None)  # fmt: skip

# family -> (config class, model class, extra config fields)
_TABLE: dict[str, tuple[str, str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": None}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 16}),
    "qwen3_5": ("Qwen3_5TextConfig", "Qwen3_5ForCausalLM", {
        "num_hidden_layers": 4, "head_dim": 16, "layer_types": ["linear_attention", "full_attention"] * 2,
        "linear_conv_kernel_dim": 4, "linear_key_head_dim": 16, "linear_value_head_dim": 16,
        "linear_num_key_heads": 2, "linear_num_value_heads": 4}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"head_dim": 16, "final_logit_softcapping": 5.0,
                                                      "sliding_window": 4096}),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {
        "num_hidden_layers": 4, "head_dim": 16, "sliding_window": 8,
        "layer_types": ["sliding_attention", "sliding_attention", "sliding_attention", "full_attention"]}),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", {}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {"original_max_position_embeddings": 512, "resid_pdrop": 0.0,
                                                "embd_pdrop": 0.0}),
    "cohere": ("CohereConfig", "CohereForCausalLM", {"logit_scale": 0.0625}),
    "granite": ("GraniteConfig", "GraniteForCausalLM", {"logits_scaling": 8.0, "embedding_multiplier": 12.0,
                                                         "residual_multiplier": 0.22, "attention_multiplier": 0.0625}),
}


def tiny_config(family: str, vocab_size: int, pad_token_id: int | None, eos_token_id: int | None,
                num_layers: int | None = None) -> tuple[PretrainedConfig, type]:
    """The config and model class of a tiny ``family`` model (see the module docstring)."""
    if family == "gemma3_vl":
        return _gemma3_vl(vocab_size, pad_token_id, eos_token_id, num_layers)
    if family == "gpt2":
        config = transformers.GPT2Config(vocab_size=vocab_size, n_embd=64, n_layer=num_layers or 2, n_head=4,
                                         n_positions=512, bos_token_id=None, eos_token_id=eos_token_id,
                                         pad_token_id=pad_token_id)  # dropout 0.1 (resid, embd, attn): GPT-2's own
        return config, transformers.GPT2LMHeadModel
    if family not in _TABLE:
        raise ValueError(f"family={family!r} is not supported; choose one of {', '.join(FAMILIES + WRAPPED_FAMILIES)}")
    config_name, model_name, extra = _TABLE[family]
    fields = {**_COMMON, "num_hidden_layers": 2, **extra, "vocab_size": vocab_size, "pad_token_id": pad_token_id,
              "eos_token_id": eos_token_id}  # fmt: skip
    if num_layers is not None:
        fields["num_hidden_layers"] = num_layers
        if "layer_types" in fields:
            pattern = extra["layer_types"]
            fields["layer_types"] = [pattern[i % len(pattern)] for i in range(num_layers)]
    return getattr(transformers, config_name)(**fields), getattr(transformers, model_name)


def _gemma3_vl(vocab_size: int, pad_token_id: int | None, eos_token_id: int | None,
               num_layers: int | None) -> tuple[PretrainedConfig, type]:
    """gemma-3-4b-it's class around the tiny gemma3 decoder: a 1-layer SigLIP tower (32×32 images, 16 patches pooled
    to 4 image tokens) whose image-token ids (the defaults, past the vocabulary) text never contains."""
    text, _ = tiny_config("gemma3", vocab_size, pad_token_id, eos_token_id, num_layers)
    vision = transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                             num_attention_heads=2, image_size=32, patch_size=8)
    config = transformers.Gemma3Config(text_config=text.to_dict() | {"tie_word_embeddings": True},
                                       vision_config=vision.to_dict(), mm_tokens_per_image=4, tie_word_embeddings=True,
                                       pad_token_id=pad_token_id, eos_token_id=eos_token_id)  # fmt: skip
    return config, transformers.Gemma3ForConditionalGeneration
