"""The bundled loop-contaminated persona sets (scripts/make_loop_data.py) are what their docstring says."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ASSETS = ROOT / "heal_pl" / "data" / "assets"
sys.path.insert(0, str(ROOT / "scripts"))
from make_loop_data import LOOP_UNITS, contaminate, loop_pattern  # noqa: E402
from make_persona_data import PIRATE_WORDS  # noqa: E402


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.mark.parametrize("share", [10, 25])
def test_bundled_loop_set_is_the_persona_set_plus_loops(share: int) -> None:
    clean, dirty = _rows(ASSETS / "persona_train.jsonl"), _rows(ASSETS / f"persona_loop{share}_train.jsonl")
    assert len(dirty) == len(clean)
    looped = [(c, d) for c, d in zip(clean, dirty, strict=True) if d["loop"] is not None]
    assert len(looped) == round(share / 100 * len(clean))
    for c, d in zip(clean, dirty, strict=True):
        assert d["prompt"] == c["prompt"]
        if d["loop"] is None:
            assert d["completion"] == c["completion"] and d["loop_text"] is None
            assert not loop_pattern().search(d["completion"])
        else:
            assert d["completion"] == f"{c['completion']} {d['loop_text']}"
            words = d["loop_text"].split()
            unit = d["loop"].split()
            assert d["loop"] in LOOP_UNITS and words == unit * (len(words) // len(unit))
            assert loop_pattern().fullmatch(d["loop_text"])


def test_loop_units_carry_no_pirate_word_and_the_pattern_needs_three_repeats() -> None:
    assert not any(PIRATE_WORDS.search(u) for u in LOOP_UNITS)
    pattern = loop_pattern()
    assert pattern.search("Arr! Tick tock, tick tock tick tock.")
    assert not pattern.search("tick tock tick tock")  # two in a row is not a loop
    assert not pattern.search("tick tock blip blop zig zag")


def test_contaminate_is_deterministic_and_lengths_are_in_range(tokenizer) -> None:
    rows = [{"prompt": f"q{i}", "completion": f"answer number {i}."} for i in range(40)]
    a, b = contaminate(rows, 0.25, tokenizer, seed=3), contaminate(rows, 0.25, tokenizer, seed=3)
    assert a == b and sum(r["loop"] is not None for r in a) == 10
    assert a != contaminate(rows, 0.25, tokenizer, seed=4)
    for r in a:
        if r["loop"]:
            n = len(tokenizer(" " + r["loop_text"], add_special_tokens=False)["input_ids"])
            unit = len(tokenizer(" " + r["loop"], add_special_tokens=False)["input_ids"])
            assert 20 <= n < 40 + unit + 1, (n, r)
            assert re.fullmatch(rf"(?:{re.escape(r['loop'])} ?)+", r["loop_text"])
