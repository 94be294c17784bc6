"""Sample filter for steer -> heal rounds (docs/maths.md §5.3).

A completion is kept when it is non-empty (after strip), its tail perplexity under the original model is
below ``ppl_tau`` and its repetition share is below ``rep_tau``.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from heal_pl.barrier.kl import token_stats
from heal_pl.models.lm import LMHead, base_lm, check_head

_WORD = re.compile(r"\w+")


def _top_share(items: Sequence[object], n: int) -> float:
    """share = count(most common n-gram) / number of n-grams; 0 when there are fewer than two n-grams."""
    if len(items) < n + 1:
        return 0.0
    grams = [tuple(items[i : i + n]) for i in range(len(items) - n + 1)]
    return Counter(grams).most_common(1)[0][1] / len(grams)


def repetition_share(text: str, ns: Sequence[int] = (2, 3, 4)) -> float:
    """rep = max over kind in {word, char}, n in ns of max_g count(g) / #n-grams of that kind.

    Words are the lowercase ``\\w+`` tokens; characters are the raw characters of ``text``. A kind too short
    for an n (fewer than two n-grams, so nothing can repeat) contributes 0.
    Empty (after strip) text returns 0.0: emptiness is its own filter rule
    ("empty"), so it is not double-counted as repetition.
    """
    ns = tuple(ns)
    if not ns:
        raise ValueError("ns: must be non-empty")
    if any(not isinstance(n, int) or n < 1 for n in ns):
        raise ValueError(f"ns: every n must be an int >= 1, got {ns}")
    if not text.strip():
        return 0.0
    words = _WORD.findall(text.lower())
    chars = list(text)
    return max(max(_top_share(words, n), _top_share(chars, n)) for n in ns)


@torch.no_grad()
def tail_perplexity(
    model: torch.nn.Module,
    tokenizer: object,
    prompts: list[str],
    completions: list[str],
    tail: float = 0.25,
    batch_size: int = 8,
    chunk_size: int = 256,
) -> list[float]:
    """ppl = exp(mean of the k largest per-token NLLs of the completion), k = max(1, ceil(tail * T)).

    Prompt and completion are tokenized separately (no special tokens) and joined; NLL_t = -log p(c_t | prefix)
    in float32, right padding. A completion with no tokens gives nan.

    Memory: only the backbone's final hidden rows that predict completion tokens are kept (``[N, H]``); the LM head
    and log-softmax run ``chunk_size`` rows at a time (:func:`heal_pl.barrier.kl.token_stats`), so no
    ``[B, T, V]`` tensor is built and the peak of that step grows with ``chunk_size · V``.
    """
    if not 0.0 < tail <= 1.0:
        raise ValueError(f"tail: must be in (0, 1], got {tail}")
    if len(prompts) != len(completions):
        raise ValueError(f"completions: length {len(completions)} != prompts length {len(prompts)}")
    if batch_size < 1:
        raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size: must be an integer >= 1, got {chunk_size!r}")
    check_head(model, "tail_perplexity")  # the NLL is read through heal_pl's head: it must be the model's own
    backbone, head = base_lm(model).get_decoder(), LMHead(base_lm(model))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0  # type: ignore[attr-defined]
    device = next(model.parameters()).device
    out: list[float] = []
    for s in range(0, len(prompts), batch_size):
        enc = []
        for p, c in zip(prompts[s : s + batch_size], completions[s : s + batch_size], strict=True):
            pi = tokenizer(p, add_special_tokens=False)["input_ids"]  # type: ignore[operator]
            ci = tokenizer(c, add_special_tokens=False)["input_ids"]  # type: ignore[operator]
            enc.append((pi, ci))
        width = max(len(pi) + len(ci) for pi, ci in enc)
        ids = torch.full((len(enc), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        rows: list[tuple[int, int]] = []  # (b, t): row t of prompt b predicts its completion token t + 1
        counts = []
        for b, (pi, ci) in enumerate(enc):
            seq = pi + ci
            ids[b, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            mask[b, : len(seq)] = 1
            # the first completion token needs a prefix; without a prompt it is skipped
            scored = range(max(len(pi), 1), len(seq))
            rows += [(b, t - 1) for t in scored]
            counts.append(len(scored))
        ids, mask = ids.to(device), mask.to(device)
        hidden = backbone(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state  # [B, T, H]
        b_idx, t_idx = torch.tensor(rows, dtype=torch.long, device=device).view(-1, 2).unbind(1)
        nll = token_stats(hidden[b_idx, t_idx], None, ids[b_idx, t_idx + 1], head=head, reg="nll",
                          chunk_size=chunk_size).nll  # [N] float32
        for row in nll.split(counts):
            if row.numel() == 0:
                out.append(math.nan)
                continue
            k = max(1, math.ceil(tail * row.numel()))
            out.append(math.exp(row.topk(k).values.mean().item()))
    return out


@dataclass
class FilterScores:
    """One sample's filter verdict: keep = non-empty and ppl < ppl_tau and rep < rep_tau."""

    text: str
    ppl: float
    rep: float
    keep: bool
    reasons: list[str] = field(default_factory=list)


def filter_samples(texts: list[str], ppl: list[float], ppl_tau: float, rep_tau: float) -> list[FilterScores]:
    """keep_i = strip(text_i) != "" and ppl_i < ppl_tau and rep_i < rep_tau; reasons name each failed rule.

    rep_i = repetition_share(text_i); a nan perplexity fails the perplexity rule.
    """
    if len(texts) != len(ppl):
        raise ValueError(f"ppl: length {len(ppl)} != texts length {len(texts)}")
    out = []
    for t, p in zip(texts, ppl, strict=True):
        rep = repetition_share(t)
        reasons = []
        if not t.strip():
            reasons.append("empty")
        if not p < ppl_tau:
            reasons.append("perplexity")
        if not rep < rep_tau:
            reasons.append("repetition")
        out.append(FilterScores(text=t, ppl=p, rep=rep, keep=not reasons, reasons=reasons))
    return out
