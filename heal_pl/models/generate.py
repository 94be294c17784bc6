"""Greedy generation with a KV cache on left-padded prompts, read through the model's own head."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from heal_pl.models.lm import LMHead, base_lm, cache_kwargs, output_cache


def eos_ids(tokenizer: PreTrainedTokenizerBase, model: nn.Module, eos_token_id: int | Sequence[int] | None) -> Tensor:
    """End-of-sequence ids: ``eos_token_id`` if given, else the tokenizer's and the generation config's.

    An explicit empty ``eos_token_id=[]`` is the caller's choice that no token ends a rollout (each runs to its
    length limit); it is returned as an empty tensor.

    Raises:
        ValueError: none of them gives an id (a rollout would never stop before its length limit): name one
            with ``eos_token_id``.
    """
    if eos_token_id is None:
        generation_config = getattr(base_lm(model), "generation_config", None)
        found = [tokenizer.eos_token_id, getattr(generation_config, "eos_token_id", None)]
        ids = {int(i) for e in found if e is not None for i in (e if isinstance(e, (list, tuple)) else [e])}
    else:
        ids = {int(i) for i in ([eos_token_id] if isinstance(eos_token_id, int) else eos_token_id)}
    if not ids and eos_token_id is None:
        raise ValueError(
            f"eos_token_id: no end-of-sequence id: the tokenizer's eos_token_id and {type(base_lm(model)).__name__}'s "
            "generation_config.eos_token_id are both None, so rollouts would never stop; pass eos_token_id "
            "(an id, a list of ids, or [] to run every rollout to its length limit)"
        )
    return torch.tensor(sorted(ids), dtype=torch.long)


def left_pad(encoded: list[list[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """``(ids, mask)`` ``[B, max len]`` with each row's tokens at the right end (LEFT padding)."""
    width = max(len(t) for t in encoded)
    ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for b, tokens in enumerate(encoded):
        ids[b, width - len(tokens) :] = torch.tensor(tokens)
        mask[b, width - len(tokens) :] = 1
    return ids, mask


def positions(mask: Tensor) -> Tensor:
    """Position ids that count real tokens only (0 on the left padding)."""
    return (mask.cumsum(-1) - 1).clamp_min(0)


def greedy_generate(
    model: nn.Module, ids: Tensor, mask: Tensor, max_new_tokens: int, eos: Tensor, pad_id: int
) -> tuple[Tensor, Tensor]:
    """Greedy continuation of left-padded prompts with a KV cache, in whatever context the caller set up.

    Returns ``(new_ids, new_mask)``, both ``[B, n]`` with ``n ≤ max_new_tokens``; ``new_mask`` is 1 up to and
    including each row's first EOS and 0 after it (those columns hold ``pad_id``). Stops when every row ended.
    """
    backbone, head = base_lm(model).get_decoder(), LMHead(base_lm(model))
    eos = eos.to(ids.device)
    new_ids: list[Tensor] = []
    new_mask: list[Tensor] = []
    alive = torch.ones(ids.shape[0], dtype=torch.bool, device=ids.device)
    cur_ids, cur_pos, full_mask, past = ids, positions(mask), mask, None
    for _ in range(max_new_tokens):
        out = backbone(input_ids=cur_ids, attention_mask=full_mask, position_ids=cur_pos, use_cache=True,
                       **cache_kwargs(backbone, past))
        past = output_cache(out)
        nxt = head(out.last_hidden_state[:, -1]).argmax(-1)
        nxt = torch.where(alive, nxt, torch.full_like(nxt, pad_id))
        new_ids.append(nxt)
        new_mask.append(alive.long())
        alive = alive & ~torch.isin(nxt, eos)
        if not alive.any():
            break
        cur_ids, cur_pos = nxt[:, None], cur_pos[:, -1:] + 1
        full_mask = torch.cat([full_mask, new_mask[-1][:, None]], dim=1)
    return torch.stack(new_ids, 1), torch.stack(new_mask, 1)
