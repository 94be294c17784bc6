"""Small helpers over Hugging Face causal LMs, plain or peft-wrapped.

heal_pl never asks a model for its full ``[B, T, V]`` logits in training: it runs the decoder
backbone to get hidden states, picks the counted positions, and applies the LM head to those rows
only (``heal_pl.kl.token_stats``). These helpers find the backbone and the head of any
``*ForCausalLM`` and run the frozen base by switching the adapter off (no second copy of weights).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from peft import PeftModel
from torch import Tensor, nn
from transformers import PreTrainedModel

from heal_pl.adapters.routed import adapter_off as routed_adapter_off
from heal_pl.adapters.routed import routed_modules
from heal_pl.kl import Counted


def base_lm(model: nn.Module) -> PreTrainedModel:
    """The underlying ``*ForCausalLM`` of a plain or peft-wrapped model."""
    return model.get_base_model() if isinstance(model, PeftModel) else model


class LMHead(nn.Module):
    """The output projection, with the final logit soft-capping some models (Gemma 2) apply."""

    def __init__(self, lm: PreTrainedModel) -> None:
        super().__init__()
        head = lm.get_output_embeddings()
        if head is None:
            raise ValueError(f"{type(lm).__name__} has no output embeddings: it is not a causal LM")
        self.proj = head
        self.softcap: float | None = getattr(lm.config, "final_logit_softcapping", None)

    def fusable(self) -> nn.Module:
        """The bare projection when nothing follows it (lets ``token_stats`` fuse a frozen head), else self."""
        return self if self.softcap else self.proj

    def forward(self, hidden: Tensor) -> Tensor:
        logits = self.proj(hidden)
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


def last_hidden(model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
    """Final hidden states ``[B, T, H]`` of the decoder backbone (adapter layers included when on)."""
    backbone = base_lm(model).get_decoder()
    out = backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return out.last_hidden_state


def gather_rows(x: Tensor, counted: Counted) -> Tensor:
    """Rows ``x[b, t]`` at the counted positions: ``[B, T, D] -> [N, D]``."""
    return x[counted.batch_idx, counted.pos_idx]


@contextlib.contextmanager
def adapter_off(model: nn.Module) -> Iterator[None]:
    """Run the frozen base: every peft (or routed) adapter in ``model`` switched off, restored on exit."""
    if isinstance(model, PeftModel):
        with model.disable_adapter():
            yield
    elif routed_modules(model):
        with routed_adapter_off(model):
            yield
    else:
        raise TypeError(f"ref = base needs a peft-wrapped or routed model, got {type(model).__name__}")


def find_peft_model(module: nn.Module) -> PeftModel:
    """The (single) ``PeftModel`` inside a LightningModule, or a clear error listing what is there."""
    found = [m for m in module.modules() if isinstance(m, PeftModel)]
    if len(found) != 1:
        children = ", ".join(f"{n}: {type(c).__name__}" for n, c in module.named_children()) or "none"
        raise ValueError(
            f"expected exactly one peft-wrapped model (peft.PeftModel) inside {type(module).__name__}, "
            f"found {len(found)}; its children are [{children}]"
        )
    return found[0]


def ref_rows(model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None, counted: Counted) -> Tensor:
    """Hidden rows ``[N, H]`` of the frozen base (adapter off) at the counted positions, no gradient."""
    with torch.no_grad(), adapter_off(model):
        return gather_rows(last_hidden(model, input_ids, attention_mask), counted)
