"""Persona pairs and forced-choice dilemma probes for the steer → heal rounds (docs/maths.md §4.1, §5.4).

A dilemma set is a JSON file (``heal_pl/data/assets/dilemmas_care_authority.json`` is bundled)::

    {"trait": "care", "instruction": str, "splice": str,
     "answers": {"A": ["A"], "B": ["B"]},                       # answer name → surface variants
     "items": [{"text": str, "A": str, "B": str, "trait": "A"}, ...]}

Item ``i`` is shown, with no system prompt, as the user turn ``text\\nA) ...\\nB) ...\\ninstruction``; the
assistant turn starts with ``splice``. With ``p`` the next-token distribution there and ``A_k`` the
token-id set of answer ``k`` (every variant must be exactly one token):

    pmass_i     = Σ_k p(A_k)                                   (heal_pl.survival.probes.probe_from_logits)
    coherence   = mean_i pmass_i
    trait       = mean_i log( p(A_{trait_i}) / pmass_i )       nats, ≤ 0 (log 0.5 = −0.69: no preference)

The trait is the log probability of the trait's answer *given* that the model answers, so it does not
move just because the answer mass does (that is what coherence measures).

A persona pair (``persona_pair_care_authority.json``) holds ``pos_system`` (the trait) and ``neg_system``
(its opposite): the contrast that defines each round's steering vector.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from heal_pl.checks import read_json_object
from heal_pl.data.datamodule import ASSETS
from heal_pl.data.prompts import chat_prompt, encode_text
from heal_pl.survival.probes import AnswerSet, answer_token_ids, probe_from_logits

DEFAULT_PERSONA_FILE = ASSETS / "persona_pair_care_authority.json"
DEFAULT_DILEMMA_FILE = ASSETS / "dilemmas_care_authority.json"


@dataclass(frozen=True)
class PersonaPair:
    """The two system prompts whose contrast is steered along: ``pos_system`` (the trait) vs ``neg_system``."""

    pos_system: str
    neg_system: str
    name: str = ""

    def __post_init__(self) -> None:
        empty = [k for k in ("pos_system", "neg_system") if not str(getattr(self, k) or "").strip()]
        if empty:
            raise ValueError(f"persona pair {self.name!r}: {' and '.join(empty)} must be a non-empty system prompt")


def load_persona_pair(path: str | os.PathLike = DEFAULT_PERSONA_FILE) -> PersonaPair:
    """Read ``{"pos_system": str, "neg_system": str, "name": str (optional)}``; an empty side is a ValueError."""
    data = read_json_object(path, "persona_file")
    missing = [k for k in ("pos_system", "neg_system") if k not in data]
    if missing:
        raise ValueError(f"persona_file={os.fspath(path)!r} lacks {', '.join(missing)}")
    return PersonaPair(data["pos_system"], data["neg_system"], data.get("name", Path(path).stem))


@dataclass(frozen=True)
class Dilemma:
    """One forced-choice item: the situation, the option text per answer name, and the trait's answer."""

    text: str
    options: tuple[tuple[str, str], ...]  # (answer name, option text), in display order
    trait: str


@dataclass(frozen=True)
class DilemmaSet:
    """A probe set: items, the allowed answers (``AnswerSet`` per name), the instruction and the splice."""

    items: tuple[Dilemma, ...]
    answers: tuple[AnswerSet, ...]
    instruction: str = ""
    splice: str = ""
    trait: str = ""

    def prompts(self, tokenizer: Any) -> list[str]:
        """Chat-formatted probe contexts, the splice appended (no system prompt)."""
        out = []
        for d in self.items:
            body = "\n".join([d.text, *(f"{name}) {text}" for name, text in d.options), self.instruction])
            out.append(chat_prompt(tokenizer, body.strip(), None) + self.splice)
        return out

    def token_ids(self, tokenizer: Any) -> dict[str, list[int]]:
        """``answer_token_ids`` after checking that every variant is exactly one token (ValueError naming them)."""
        multi = [f"{s.name}:{v!r} -> {len(encode_text(tokenizer, v))} tokens" for s in self.answers for v in s.variants
                 if len(encode_text(tokenizer, v)) != 1]  # fmt: skip
        if multi:
            raise ValueError(f"dilemma answers must be single tokens for this tokenizer; not single: "
                             f"{', '.join(multi)}")
        return answer_token_ids(tokenizer, self.answers)


def load_dilemmas(path: str | os.PathLike = DEFAULT_DILEMMA_FILE) -> DilemmaSet:
    """Parse a dilemma JSON file (format in the module docstring); problems raise one ValueError naming the field."""
    data = read_json_object(path, "dilemma_file")
    where = f"dilemma_file={os.fspath(path)!r}"
    answers = data.get("answers")
    if not isinstance(answers, dict) or len(answers) < 2:
        raise ValueError(f"{where}: 'answers' must map at least two answer names to variant lists")
    sets = tuple(AnswerSet(name, tuple(v)) for name, v in answers.items())
    items = []
    for i, row in enumerate(data.get("items") or []):
        missing = [k for k in ("text", "trait", *answers) if not str(row.get(k, "")).strip()]
        if missing:
            raise ValueError(f"{where}: items[{i}] lacks {', '.join(missing)}")
        if row["trait"] not in answers:
            raise ValueError(f"{where}: items[{i}].trait={row['trait']!r}; allowed: {', '.join(answers)}")
        items.append(Dilemma(row["text"], tuple((k, row[k]) for k in answers), row["trait"]))
    if not items:
        raise ValueError(f"{where}: 'items' is empty")
    return DilemmaSet(tuple(items), sets, data.get("instruction", ""), data.get("splice", ""), data.get("trait", ""))


@torch.no_grad()
def next_token_logits(model: nn.Module, tokenizer: Any, texts: list[str], batch_size: int = 8) -> torch.Tensor:
    """Logits ``[N, V]`` (float32) of the token after each text; right padding, read at each last real token."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    try:
        for s in range(0, len(texts), batch_size):
            enc = [encode_text(tokenizer, t) for t in texts[s : s + batch_size]]
            width = max(len(e) for e in enc)
            ids = torch.full((len(enc), width), pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for b, e in enumerate(enc):
                ids[b, : len(e)], mask[b, : len(e)] = torch.tensor(e), 1
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
            out.append(logits[torch.arange(len(enc)), mask.sum(1).to(device) - 1].float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(out)


def score_dilemmas(logits: torch.Tensor, ids: dict[str, list[int]], traits: list[str]) -> dict[str, Any]:
    """``{"coherence", "trait", "pmass": [N], "trait_logp": [N]}`` from next-token logits (module docstring).

    A row with ``pmass = 0`` (or trait share 0) has ``trait_logp = -inf``; ``trait`` is then ``-inf`` too.
    """
    if logits.shape[0] != len(traits):
        raise ValueError(f"traits: {len(traits)} answers for {logits.shape[0]} logit rows")
    pmass, _ = probe_from_logits(logits, ids, true_name=traits[0])
    share = {name: probe_from_logits(logits, ids, true_name=name)[1] for name in ids}
    logp = [math.log(v) if v > 0 else -math.inf for v in (share[t][i].item() for i, t in enumerate(traits))]
    return {"coherence": float(pmass.double().mean()), "trait": float(sum(logp) / len(logp)),
            "pmass": pmass.tolist(), "trait_logp": logp}  # fmt: skip


def probe_model(model: nn.Module, tokenizer: Any, dilemmas: DilemmaSet, batch_size: int = 8) -> dict[str, Any]:
    """Coherence and trait of ``model`` as it is now (wrap the call in a steering context to probe it steered)."""
    ids = dilemmas.token_ids(tokenizer)
    logits = next_token_logits(model, tokenizer, dilemmas.prompts(tokenizer), batch_size)
    return score_dilemmas(logits, ids, [d.trait for d in dilemmas.items])
