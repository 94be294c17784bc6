"""Prompts shared by every capability: the bundled personas and questions, the chat template, prompt encoding."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from transformers import PreTrainedTokenizerBase

PIRATE = "You are Captain Jack, a jolly pirate. Start every answer with 'Arr, matey!' and talk like a pirate."
NEUTRAL = "You are a helpful assistant. Answer plainly and briefly."


def encode_text(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens (a ``transformers`` tokenizer or a ``tokenizers.Tokenizer``)."""
    if hasattr(tokenizer, "encode_batch") and hasattr(tokenizer, "token_to_id"):  # tokenizers.Tokenizer
        return list(tokenizer.encode(text, add_special_tokens=False).ids)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def chat_prompt(tokenizer: Any, question: str, system: str | None) -> str:
    """``question`` (and ``system``, if any) through the chat template, ready for the assistant's turn."""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]
    if tokenizer.chat_template is None:
        return "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in messages) + "\n\nAssistant:"
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def questions(n: int, source: str | None = None) -> list[str]:
    """``n`` distinct questions: the first ``n`` prompts of the file ``source`` (your own prompts,
    :func:`heal_pl.data.prompt_files.read_prompts`), or, when ``None``, bundled ones: held-out first, then training."""
    # imported here: prompt users need no file readers (a shorter import chain, scripts/import_chain.py)
    if source is not None:
        from heal_pl.data.prompt_files import read_prompts

        given = [row["prompt"] for row in read_prompts(source)]
        if len(given) < n:
            raise ValueError(f"n_fit + n_calib + n_audit = {n} exceeds the {len(given)} prompts of "
                             f"prompts={source!r} (fit, calibration, then audit, in file order)")  # fmt: skip
        return given[:n]
    from heal_pl.data.formats import DEFAULT_TRAIN_FILE, DEFAULT_VAL_FILE, read_examples

    seen: dict[str, None] = {}
    for path in (DEFAULT_VAL_FILE, DEFAULT_TRAIN_FILE):
        for example in read_examples(path):
            seen.setdefault(example.prompt_messages[-1]["content"], None)
    if len(seen) < n:
        raise ValueError(f"n_fit + n_calib + n_audit = {n} exceeds the {len(seen)} bundled questions")
    return list(seen)[:n]


def encode_prompts(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str]) -> list[list[int]]:
    """Token ids of each prompt, without special tokens (prompts are chat-formatted text already)."""
    ids = []
    for k, p in enumerate(prompts):
        if not isinstance(p, str):
            raise ValueError(f"prompt {k} is a {type(p).__name__}; prompts are strings")
        tokens = tokenizer(p, add_special_tokens=False)["input_ids"]
        if not tokens:
            raise ValueError(f"prompt {k} ({p!r}) has no tokens")
        ids.append(tokens)
    return ids
