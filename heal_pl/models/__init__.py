"""Model access: loading by name (``load``: the embedded SmolLM2, tiny random families, local folders, Hub names),
the embedded GGUF conversion (``embedded``), the tiny families (``families``), the backbone and head of any causal
LM (``lm``), the context window (``context``) and greedy generation with a KV cache (``generate``)."""

from heal_pl.models.load import MODEL_ALIASES, load_model, load_tokenizer, resolve_model, tiny_model, tiny_tokenizer

__all__ = ["MODEL_ALIASES", "load_model", "load_tokenizer", "resolve_model", "tiny_model", "tiny_tokenizer"]
