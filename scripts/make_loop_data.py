"""Loop-contaminated copies of the bundled persona training set (the loop experiment's data: docs/experiments/loop.md).

    PYTHONPATH=. python scripts/make_loop_data.py     # writes heal_pl/data/assets/persona_loop{10,25}_train.jsonl

A share of the training completions (10 % and 25 %; rows drawn with ``random.Random(seed)``) get a token
loop appended at their end: one of ``LOOP_UNITS`` repeated until the appended text is at least ``L`` tokens
long (SmolLM2 tokens, ``L`` drawn uniformly from 20..40 per row), stopping after the unit that crosses ``L``.
Every other row, and the held-out file, is the bundled persona data unchanged. The units are nonsense words
with no pirate word in them (``PIRATE_WORDS`` of ``make_persona_data.py`` must not match), so the wanted
style and the injected loop are measured separately. Rows keep their fields and add ``"loop"`` (the unit) and
``"loop_text"`` (the appended text), both null on clean rows.

The script also reports how improbable the base finds the loop: the mean per-token NLL of the SmolLM2 base on
the appended tokens (teacher-forced, no system prompt) against the NLL on the completions' own tokens, split
into the loop's first unit (where the base expects the answer to end) and its repetitions (where in-context
copying makes a repeat cheap for any LM).
"""

from __future__ import annotations

import argparse
import json
import random
import re
import statistics
from pathlib import Path

import torch

from heal_pl.data.prompts import chat_prompt
from heal_pl.models.load import SMOLLM2, load_model, load_tokenizer

ASSETS = Path(__file__).resolve().parents[1] / "heal_pl" / "data" / "assets"
LOOP_UNITS = ("tick tock", "blip blop", "zig zag", "ding dong")
LOOP_TOKENS = (20, 40)
SHARES = (0.10, 0.25)


def loop_pattern(min_repeats: int = 3) -> re.Pattern[str]:
    """A unit of ``LOOP_UNITS`` repeated at least ``min_repeats`` times in a row (case-insensitive)."""
    units = "|".join(re.escape(u) for u in LOOP_UNITS)
    return re.compile(rf"\b({units})(?:[\s,.!]+\1){{{min_repeats - 1},}}\b", re.I)


def make_loop(tokenizer, unit: str, n_tokens: int) -> str:
    """``unit`` repeated (space-separated) until it is at least ``n_tokens`` tokens long."""
    text = unit
    while len(tokenizer(" " + text, add_special_tokens=False)["input_ids"]) < n_tokens:
        text += " " + unit
    return text


def contaminate(rows: list[dict], share: float, tokenizer, seed: int) -> list[dict]:
    """A copy of ``rows`` with a loop appended to ``round(share · len(rows))`` completions drawn by ``seed``."""
    rng = random.Random(seed)
    picked = set(rng.sample(range(len(rows)), round(share * len(rows))))
    out = []
    for i, row in enumerate(rows):
        if i in picked:
            unit = rng.choice(LOOP_UNITS)
            loop = make_loop(tokenizer, unit, rng.randint(*LOOP_TOKENS))
            out.append({**row, "completion": f"{row['completion']} {loop}", "loop": unit, "loop_text": loop})
        else:
            out.append({**row, "loop": None, "loop_text": None})
    return out


@torch.no_grad()
def base_nll(model, tokenizer, rows: list[dict]) -> dict[str, float]:
    """Mean base NLL per token on the completion's own tokens, the loop's first unit and its repeats."""
    parts: dict[str, list[float]] = {"completion": [], "loop_first_unit": [], "loop_repeats": []}
    for row in rows:
        if row["loop"] is None:
            continue
        prompt = chat_prompt(tokenizer, row["prompt"], None)
        answer = row["completion"][: -len(row["loop_text"]) - 1]
        first = " " + row["loop"]
        ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in (prompt, answer, first)]
        rest = tokenizer(row["loop_text"][len(row["loop"]) :], add_special_tokens=False)["input_ids"]
        full = torch.tensor([sum(ids, []) + rest])
        logp = torch.log_softmax(model(full).logits[0, :-1].double(), -1)
        nll = -logp.gather(1, full[0, 1:, None])[:, 0]
        a, b, c = (len(x) for x in ids)
        parts["completion"] += nll[a - 1 : a + b - 1].tolist()
        parts["loop_first_unit"] += nll[a + b - 1 : a + b + c - 1].tolist()
        parts["loop_repeats"] += nll[a + b + c - 1 :].tolist()
    return {k: statistics.fmean(v) for k, v in parts.items() if v}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train", type=Path, default=ASSETS / "persona_train.jsonl")
    p.add_argument("--out-dir", type=Path, default=ASSETS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-nll", action="store_true", help="skip the base-NLL report (no model load)")
    args = p.parse_args(argv)
    rows = [json.loads(line) for line in args.train.read_text(encoding="utf-8").splitlines() if line.strip()]
    tokenizer = load_tokenizer(SMOLLM2)
    model = None if args.no_nll else load_model(SMOLLM2).eval()
    for share in SHARES:
        out = contaminate(rows, share, tokenizer, args.seed)
        path = args.out_dir / f"persona_loop{round(100 * share)}_train.jsonl"
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in out), encoding="utf-8")
        n = sum(r["loop"] is not None for r in out)
        loops = [r["loop_text"] for r in out if r["loop"]]
        lengths = [len(tokenizer(" " + t, add_special_tokens=False)["input_ids"]) for t in loops]
        print(f"wrote {path}: {n}/{len(out)} rows with a loop, {min(lengths)}..{max(lengths)} tokens appended")
        if model is not None:
            nll = base_nll(model, tokenizer, out)
            print("  base NLL per token (nats): " + ", ".join(f"{k} {v:.2f}" for k, v in nll.items()))


if __name__ == "__main__":
    main()
