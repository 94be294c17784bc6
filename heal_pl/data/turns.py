r"""How the chat template closes an assistant turn: the tokens a completion must end with.

A student is taught to stop the way its chat format stops. The tokenizer's eos is not always that token:
Gemma's eos is ``<eos>`` while its template closes a turn with ``<end_of_turn>``; older Llama-3 tokenizers
have eos ``<|end_of_text|>`` and close a turn with ``<|eot_id|>``. :func:`turn_end_ids` renders the template
on a known conversation, takes the text right after the assistant's content, and keeps it up to and
including its last special token (``<|im_end|>`` for ChatML, ``<|eot_id|>`` for Llama-3, ``<end_of_turn>``
for Gemma; a trailing newline after it is not part of the stop). Without a chat template, or when the
rendered text shows no special token after the content, the eos is the turn end (logged once).
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

from transformers import PreTrainedTokenizerBase

log = logging.getLogger("heal_pl")

_PROBE = "HEALPLPROBEANSWER"  # one word, no whitespace: survives templates that ``trim`` the content
_cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def after_assistant(
    tok: PreTrainedTokenizerBase, then: Sequence[Mapping[str, str]] = (), **template_kwargs: Any
) -> str | None:
    """The text ``tok``'s chat template writes after an assistant message's content, in ``[user, assistant, *then]``
    rendered with ``template_kwargs`` (e.g. ``add_generation_prompt=True``); ``None`` when the template drops the
    assistant's words."""
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _PROBE}, *then]
    text = tok.apply_chat_template(messages, tokenize=False, **template_kwargs)
    if not isinstance(text, str) or _PROBE not in text:
        return None
    return text[text.rindex(_PROBE) + len(_PROBE):]


def _from_template(tok: PreTrainedTokenizerBase) -> list[int] | None:
    after = after_assistant(tok)
    if after is None:
        return None
    specials = [s for s in set(tok.all_special_tokens) | set(tok.get_added_vocab()) if s and s in after]
    if not specials:
        return None
    end = max(after.index(s) + len(s) for s in specials)  # through the last special token
    return tok(after[:end], add_special_tokens=False)["input_ids"]


def turn_end_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The token ids that close an assistant turn in ``tokenizer``'s chat template (module docstring).

    Raises:
        ValueError: the eos is needed (no template, or no special token closes the turn) and there is none.
    """
    key = (tokenizer.chat_template, tokenizer.eos_token_id)
    cached = _cache.get(tokenizer)
    if cached is not None and cached[0] == key:
        return list(cached[1])
    ids = _from_template(tokenizer) if tokenizer.chat_template is not None else None
    if ids is None:
        if tokenizer.eos_token_id is None:
            name = getattr(tokenizer, "name_or_path", "")
            raise ValueError(f"tokenizer {name!r} has no eos token and no chat template turn end to end completions")
        if tokenizer.chat_template is not None:
            log.info("the chat template shows no special token after an assistant message; completions end "
                     "with the eos %r", tokenizer.eos_token)
        ids = [tokenizer.eos_token_id]
    elif ids != [tokenizer.eos_token_id]:
        log.info("completions end with the chat template's turn end %r (the eos is %r)",
                 tokenizer.decode(ids), tokenizer.eos_token)
    _cache[tokenizer] = (key, ids)
    return list(ids)
