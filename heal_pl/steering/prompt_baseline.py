"""The prompt baseline: the KL footprint of a system prompt against none, at its one natural dose.

The weight-steering literature reports a calibrated steering method beside simply *asking* the model (a system
prompt). For questions ``q`` and a system prompt ``s``, with ``x_s = chat(s, q)`` and ``x = chat(q)`` (no system
message of ours; a chat template that inserts a default system prompt, as SmolLM2's does, keeps it in ``x``):

1. greedy-roll out ``y_1 … y_n`` from ``x_s`` (the model as it is, no hook), stopping at the first EOS (kept);
2. per generated position, in float32,

       KL_t = KL( p(· | x_s, y_<t) ‖ p(· | x, y_<t) )

   the SAME tokens scored after the two prefixes (:func:`heal_pl.steering.trajectory.measure_kl` with
   ``base_prompts``; each side left-padded on its own, position ids counting each side's real tokens);
3. pooled statistics as for a steering method (mean, p50, p90, p95, p99, max, rms).

There is no coefficient: the prompt is present or not. :class:`SystemPrompt` plays the role of a steering method
whose edit is the context instead of the activations: its ``steering`` context changes nothing, so the rollout,
the KL and the forced-choice probes (:func:`heal_pl.survival.forks.probe_forks` on ``x_s``) run on the plain model.

An empty (or blank) system prompt is refused: it is no prompt at all, and a chat template may replace a missing
system message by its own default, so "empty" would not mean "the same context".
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass

from torch import nn
from transformers import PreTrainedTokenizerBase

from heal_pl.data.prompts import chat_prompt
from heal_pl.steering.hooks import LayerSpec
from heal_pl.steering.trajectory import TrajectoryKL, measure_kl


@dataclass(frozen=True)
class SystemPrompt:
    """A system prompt as a steering method: it changes the context, never the activations.

    Args:
        system: the system prompt's text (e.g. :data:`heal_pl.data.prompts.PIRATE`), not blank.

    Raises:
        ValueError: ``system`` is not a string or is blank.

    Example:
        >>> from heal_pl.models import tiny_tokenizer
        >>> steered, base = SystemPrompt("Talk like a pirate.").prompts(tiny_tokenizer(), ["Is ice cold?"])
        >>> steered[0].splitlines()[:2]
        ['<|im_start|>system', 'Talk like a pirate.<|im_end|>']
        >>> steered[0].endswith(base[0])  # then the same user turn as without the system prompt
        True
    """

    system: str

    def __post_init__(self) -> None:
        if not isinstance(self.system, str) or not self.system.strip():
            raise ValueError(f"system={self.system!r} is empty: the prompt baseline compares a system prompt against "
                             "none; give the prompt's text (e.g. heal_pl.data.prompts.PIRATE)")

    def steering(self, model: nn.Module, coeff: float, layers: LayerSpec | None = None) -> AbstractContextManager[None]:
        """No edit of the model (``coeff`` and ``layers`` are ignored: the prompt has one dose, in the context)."""
        return contextlib.nullcontext()

    def prompts(self, tokenizer: PreTrainedTokenizerBase, questions: Sequence[str]) -> tuple[list[str], list[str]]:
        """``(with the system prompt, without it)``: each question through the chat template both ways."""
        return ([chat_prompt(tokenizer, q, self.system) for q in questions],
                [chat_prompt(tokenizer, q, None) for q in questions])  # fmt: skip


def prompt_kl(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    questions: Sequence[str],
    system: str,
    max_new_tokens: int = 64,
    batch_size: int = 8,
    eos_token_id: int | Sequence[int] | None = None,
    chunk_size: int = 256,
) -> TrajectoryKL:
    """Per-token KL(with ``system`` ‖ without) along the greedy rollout with the system prompt (module docstring).

    Args:
        model, tokenizer, max_new_tokens, batch_size, eos_token_id, chunk_size: as in
            :func:`heal_pl.steering.trajectory.measure_kl`.
        questions: the user turns (plain text, not chat-formatted), at least one.
        system: the system prompt, not blank.

    Returns:
        a :class:`~heal_pl.steering.trajectory.TrajectoryKL` (``coeff`` 1: the prompt is present).
    """
    method = SystemPrompt(system)
    steered, base = method.prompts(tokenizer, questions)
    return measure_kl(model, tokenizer, steered, method, 1.0, max_new_tokens, batch_size, eos_token_id=eos_token_id,
                      base_prompts=base, chunk_size=chunk_size)  # fmt: skip
