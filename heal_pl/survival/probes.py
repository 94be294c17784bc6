"""Forced-choice probes (docs/maths.md §4.1): answer-token discovery, probe mass from next-token logits, the splice.

Given next-token logits ``z`` [B, V] after a splice and answer sets ``A_k`` (token-id sets, one per
answer name; the default sets are ``true`` and ``false``):

    p        = softmax(z)  in float32
    p(A_k)   = Σ_{v ∈ A_k} p_v
    pmass    = Σ_k p(A_k)                      (= p(true-set) + p(false-set) for the defaults)
    p_true   = p(A_true) / pmass               (0 where pmass = 0)

Each surface variant contributes the id of its *last* token (tokenised without special tokens), so
``" True"`` → the id of ``"ĠTrue"`` and a multi-token variant ``"False"`` → the id of its final piece; ids
are deduplicated within a set and must not collide across sets.

Splice: :func:`probe_splice` resolves ``splice="auto"`` into the model's own probe turn (the end of the assistant's
turn, a user turn asking :data:`PROBE_QUESTION`, the assistant's turn opened), from its chat template; when the
context has an open thinking block (a ``<think>`` after the last ``</think>``), the splice first closes it:
``splice' = </think> + sep + splice``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jinja2 import TemplateError
from torch import Tensor

from heal_pl.data.prompts import chat_prompt, encode_text
from heal_pl.data.turns import after_assistant

log = logging.getLogger("heal_pl")
THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
AUTO = "auto"  # the splice built from the tokenizer's chat template (probe_splice)
PROBE_QUESTION = "Is the statement true or false?"


@dataclass(frozen=True)
class AnswerSet:
    """One allowed answer: a ``name`` and its surface ``variants`` (case, leading space, digit forms)."""

    name: str
    variants: tuple[str, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"AnswerSet.name must be a non-empty string, got {self.name!r}")
        object.__setattr__(self, "variants", tuple(self.variants))
        if not self.variants or not all(isinstance(v, str) and v for v in self.variants):
            raise ValueError(f"AnswerSet {self.name!r}: variants must be non-empty strings, got {self.variants!r}")


DEFAULT_ANSWER_SETS: tuple[AnswerSet, ...] = (
    AnswerSet("true", ("true", "True", " true", " True", "1", " 1")),
    AnswerSet("false", ("false", "False", " false", " False", "0", " 0")),
)


def _unk_id(tokenizer: Any) -> int | None:
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is None and hasattr(tokenizer, "token_to_id"):
        model = getattr(tokenizer, "model", None)
        tok = getattr(model, "unk_token", None)
        unk = tokenizer.token_to_id(tok) if tok else None
    return unk


def answer_token_ids(
    tokenizer: Any, answer_sets: Sequence[AnswerSet] = DEFAULT_ANSWER_SETS
) -> dict[str, list[int]]:
    """``{name: [last-token id of each variant, deduplicated, first-seen order]}``.

    Raises ``ValueError`` naming (a) the variants that tokenise to nothing or to the unknown token (not in
    the vocabulary), (b) the variants whose ids collide across sets, (c) duplicate set names.
    """
    if not answer_sets:
        raise ValueError("answer_sets must hold at least one AnswerSet")
    names = [s.name for s in answer_sets]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"answer_sets names must be unique; repeated: {dup}")
    unk = _unk_id(tokenizer)
    missing: list[str] = []
    owner: dict[int, tuple[str, str]] = {}  # id → (set name, variant)
    collisions: list[str] = []
    out: dict[str, list[int]] = {}
    for s in answer_sets:
        ids: list[int] = []
        for v in s.variants:
            toks = encode_text(tokenizer, v)
            if not toks or (unk is not None and toks[-1] == unk):
                missing.append(f"{s.name}:{v!r}")
                continue
            tid = int(toks[-1])
            other = owner.get(tid)
            if other is not None and other[0] != s.name:
                collisions.append(f"{other[0]}:{other[1]!r} and {s.name}:{v!r} (id {tid})")
                continue
            owner.setdefault(tid, (s.name, v))
            if tid not in ids:
                ids.append(tid)
        out[s.name] = ids
    if missing:
        raise ValueError(f"answer variants not in the tokenizer's vocabulary (empty or unknown token): "
                         f"{', '.join(missing)}")
    if collisions:
        raise ValueError(f"answer variants share a last token id across sets: {'; '.join(collisions)}")
    return out


def probe_from_logits(
    logits: Tensor, ids: Mapping[str, Sequence[int]], true_name: str = "true"
) -> tuple[Tensor, Tensor]:
    """``(pmass [B], p_true [B])`` in float32 from next-token ``logits`` [B, V] (formula in the module docstring).

    ``ids`` is the output of :func:`answer_token_ids`; ``pmass`` sums every set, ``p_true`` is the share of
    the set named ``true_name``.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be 2-D [B, V], got shape {tuple(logits.shape)}")
    if true_name not in ids:
        raise ValueError(f"true_name={true_name!r} is not an answer set; choose one of {', '.join(ids)}")
    V = logits.shape[1]
    all_ids: list[int] = []
    for name, s in ids.items():
        if len(s) == 0:
            raise ValueError(f"answer set {name!r} has no token ids")
        bad = [i for i in s if not 0 <= int(i) < V]
        if bad:
            raise ValueError(f"answer set {name!r}: ids {bad} are outside the vocabulary [0, {V})")
        all_ids.extend(int(i) for i in s)
    if len(set(all_ids)) != len(all_ids):
        raise ValueError("answer token ids must be distinct across and within sets")
    p = torch.softmax(logits.float(), dim=-1)
    dev = logits.device
    p_sets = {n: p[:, torch.as_tensor([int(i) for i in s], device=dev)].sum(-1) for n, s in ids.items()}
    pmass = torch.stack(list(p_sets.values()), 0).sum(0)
    safe = torch.where(pmass > 0, pmass, torch.ones_like(pmass))
    p_true = torch.where(pmass > 0, p_sets[true_name] / safe, torch.zeros_like(pmass))
    return pmass, p_true


def has_thinking_tokens(tokenizer: Any, think_open: str = THINK_OPEN, think_close: str = THINK_CLOSE) -> bool:
    """True when both ``think_open`` and ``think_close`` are single entries of the tokenizer's vocabulary."""
    vocab = tokenizer.get_vocab()
    return think_open in vocab and think_close in vocab


def splice_text(
    context: str,
    splice: str,
    think_open: str = THINK_OPEN,
    think_close: str = THINK_CLOSE,
    sep: str = "\n\n",
) -> str:
    """The text to append to ``context``: ``splice``, prefixed by ``think_close + sep`` when ``context`` has an
    open thinking block (its last ``think_open`` comes after its last ``think_close``).

    Pure string function; callers that use a tokenizer without thinking tokens (see
    :func:`has_thinking_tokens`) should not call it with thinking markers (or just use ``splice``).
    """
    if not think_open or not think_close:
        raise ValueError(f"think_open={think_open!r} and think_close={think_close!r} must be non-empty")
    last_open = context.rfind(think_open)
    if last_open >= 0 and last_open > context.rfind(think_close):
        return think_close + sep + splice
    return splice


def probe_splice(tokenizer: Any, splice: str = AUTO, question: str = PROBE_QUESTION) -> str:
    """The probe's splice text: ``splice`` itself, or for ``"auto"`` the model's own turn that asks ``question``.

    ``auto`` renders ``[user, assistant, user: question]`` with the chat template (``add_generation_prompt``,
    ``enable_thinking=False``, which a Qwen3-style template reads to open the answer with an empty, closed thinking
    block; other templates ignore it) and keeps what follows the assistant's words
    (:func:`heal_pl.data.turns.after_assistant`): the end of the assistant's turn, the user turn and the opened
    assistant turn. A tokenizer without a chat template gets the plain-text turn of
    :func:`heal_pl.data.prompts.chat_prompt` (``"\\n\\nUser: …\\n\\nAssistant:"``, logged).

    Example:
        >>> from heal_pl.models import tiny_tokenizer
        >>> probe_splice(tiny_tokenizer())  # ChatML
        '<|im_end|>\\n<|im_start|>user\\nIs the statement true or false?<|im_end|>\\n<|im_start|>assistant\\n'
        >>> probe_splice(tiny_tokenizer(chat_template=False))
        '\\n\\nUser: Is the statement true or false?\\n\\nAssistant:'
        >>> probe_splice(tiny_tokenizer(), "\\nAnswer:")  # a given splice is kept as it is
        '\\nAnswer:'

    Raises:
        ValueError: the template cannot render the probe turn, or drops the assistant's words (give the splice).
    """
    if splice != AUTO:
        return splice
    name = type(tokenizer).__name__
    if getattr(tokenizer, "chat_template", None) is None:
        text = "\n\n" + chat_prompt(tokenizer, question, None)
        log.info("splice 'auto': the %s has no chat template; the probe is the plain-text turn %r", name, text)
        return text
    try:  # enable_thinking: read by Qwen3-style templates, ignored by the others
        text = after_assistant(tokenizer, [{"role": "user", "content": question}], add_generation_prompt=True,
                               enable_thinking=False)  # fmt: skip
    except (TemplateError, ValueError, TypeError) as e:
        raise ValueError(f"splice='auto': the chat template of the {name} cannot render the probe turn "
                         f"(user, assistant, user): {e}; give the splice text instead") from e  # fmt: skip
    if text is None:
        raise ValueError(f"splice='auto': the chat template of the {name} does not write the assistant's words in the "
                         f"probe turn; give the splice text instead")  # fmt: skip
    if question not in text:
        raise ValueError(f"splice='auto': the chat template of the {name} drops the probe question after an assistant "
                         f"turn ({text!r}); give the splice text instead")  # fmt: skip
    log.info("splice 'auto': the probe turn of the chat template is %r", text)
    return text
