"""Dilemma probes and persona pairs: scores against a float64 reference, single-token answers, bad files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from heal_pl.data.prompts import chat_prompt
from heal_pl.models.load import tiny_model, tiny_tokenizer
from heal_pl.rounds.dilemmas import (
    DilemmaSet,
    load_dilemmas,
    load_persona_pair,
    next_token_logits,
    probe_model,
    score_dilemmas,
)


def test_scores_match_a_float64_reference() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 40, generator=g) * 3
    ids = {"A": [3, 7], "B": [11]}
    traits = ["A", "B", "B", "A", "B"]
    p = np.exp(logits.double().numpy())
    p /= p.sum(1, keepdims=True)
    pa, pb = p[:, [3, 7]].sum(1), p[:, 11]
    mass = pa + pb
    want_trait = np.mean([np.log((pa if t == "A" else pb)[i] / mass[i]) for i, t in enumerate(traits)])
    got = score_dilemmas(logits, ids, traits)
    assert got["coherence"] == pytest.approx(mass.mean(), rel=1e-5)
    assert got["trait"] == pytest.approx(want_trait, rel=1e-5)
    assert got["pmass"] == pytest.approx(mass.tolist(), rel=1e-5)


def test_zero_answer_mass_gives_minus_infinity_trait() -> None:
    logits = torch.full((1, 10), -1e4)
    logits[0, 0] = 0.0  # all mass on a token that is no answer
    got = score_dilemmas(logits, {"A": [1], "B": [2]}, ["A"])
    assert got["coherence"] == 0.0 and got["trait"] == -math.inf


def test_bundled_files_load_and_have_single_token_answers() -> None:
    d, tok = load_dilemmas(), tiny_tokenizer()
    assert len(d.items) >= 20 and {x.trait for x in d.items} == {"A", "B"}
    assert sum(x.trait == "A" for x in d.items) == sum(x.trait == "B" for x in d.items)  # no letter bias
    assert all(len(v) == 1 for v in d.token_ids(tok).values())
    pair = load_persona_pair()
    assert pair.pos_system and pair.neg_system and pair.pos_system != pair.neg_system


def test_probe_model_equals_one_prompt_at_a_time_forward() -> None:
    d, tok, model = load_dilemmas(), tiny_tokenizer(), tiny_model().eval()
    got = probe_model(model, tok, d, batch_size=5)
    ids = d.token_ids(tok)
    rows = []
    for text in d.prompts(tok):
        enc = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            rows.append(model(input_ids=enc).logits[0, -1].double())
    p = torch.softmax(torch.stack(rows), -1)
    mass = p[:, ids["A"]].sum(1) + p[:, ids["B"]].sum(1)
    assert got["coherence"] == pytest.approx(mass.mean().item(), rel=1e-4)
    assert d.prompts(tok)[0].startswith(chat_prompt(tok, d.items[0].text, None)[:20])


def test_next_token_logits_reads_each_row_at_its_last_real_token() -> None:
    tok, model = tiny_tokenizer(), tiny_model().eval()
    texts = ["the cat", "my friend reads the morning paper at home"]
    batched = next_token_logits(model, tok, texts, batch_size=2)
    single = torch.cat([next_token_logits(model, tok, [t]) for t in texts])
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-5)


def test_answers_that_are_not_single_tokens_are_refused(tmp_path: Path) -> None:
    d = load_dilemmas()
    data = {"answers": {"A": ["A"], "B": ["B", " B"]}, "items": [{"text": "x", "A": "a", "B": "b", "trait": "A"}]}
    path = tmp_path / "d.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="B:' B' -> 2 tokens"):
        load_dilemmas(path).token_ids(tiny_tokenizer())
    assert isinstance(d, DilemmaSet)


@pytest.mark.parametrize(("patch", "match"), [
    ({"answers": {"A": ["A"]}}, "answers"),
    ({"items": []}, "items"),
    ({"items": [{"text": "x", "A": "a", "B": "b", "trait": "C"}]}, "trait"),
    ({"items": [{"text": "x", "A": "a", "trait": "A"}]}, "lacks B"),
])  # fmt: skip
def test_bad_dilemma_files_name_the_field(tmp_path: Path, patch: dict, match: str) -> None:
    data = {"answers": {"A": ["A"], "B": ["B"]}, "items": [{"text": "x", "A": "a", "B": "b", "trait": "A"}]} | patch
    path = tmp_path / "d.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=match):
        load_dilemmas(path)


@pytest.mark.parametrize("side", ["pos_system", "neg_system"])
def test_persona_pair_with_an_empty_side_names_it(tmp_path: Path, side: str) -> None:
    data = {"pos_system": "You care.", "neg_system": "You obey."} | {side: ""}
    path = tmp_path / "p.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=side):
        load_persona_pair(path)
    path.write_text(json.dumps({"pos_system": "x"}))
    with pytest.raises(ValueError, match="neg_system"):
        load_persona_pair(path)
