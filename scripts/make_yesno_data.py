"""Write the bundled true/false question sets ``heal_pl/data/assets/yesno_{calib,eval}.jsonl``.

    python scripts/make_yesno_data.py

Hand-written general-knowledge statements, half true and half false, each asked as "True or false: …"
with an answer-format instruction. The split is deterministic (``--seed``), balanced per answer, and no
statement is in both files. Rows: ``{"question": ..., "instruction": ..., "prompt": question + " " +
instruction, "answer": true | false}``.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

ASSETS = Path(__file__).resolve().parents[1] / "heal_pl" / "data" / "assets"
INSTRUCTIONS = (
    "Answer with true or false.",
    "Explain briefly, then answer with true or false.",
)
TRUE = (
    "Water boils at 100 degrees Celsius at sea level.",
    "The Earth orbits the Sun.",
    "A week has seven days.",
    "Spiders have eight legs.",
    "The Pacific is the largest ocean on Earth.",
    "Ice is less dense than liquid water.",
    "Paris is the capital of France.",
    "A triangle has three sides.",
    "Bees make honey.",
    "The Moon orbits the Earth.",
    "Humans need oxygen to live.",
    "Two plus two equals four.",
    "Penguins are birds.",
    "The heart pumps blood around the body.",
    "Plants use sunlight to make food.",
    "Mount Everest is the highest mountain above sea level.",
    "A year usually has 365 days.",
    "Whales are mammals.",
    "Copper conducts electricity.",
    "Rain falls from clouds.",
    "The Sahara is a desert.",
    "Ten is an even number.",
    "Sound needs a medium such as air to travel.",
    "Shakespeare wrote Hamlet.",
)
FALSE = (
    "The Sun orbits the Earth.",
    "Spiders have six legs.",
    "Ice sinks in liquid water.",
    "A square has five sides.",
    "Fish breathe with lungs.",
    "The Moon is bigger than the Earth.",
    "Seven is an even number.",
    "Berlin is the capital of Spain.",
    "Snakes have legs.",
    "Water boils at 10 degrees Celsius at sea level.",
    "The Atlantic is the largest ocean on Earth.",
    "Three plus three equals eight.",
    "Bats are insects.",
    "Diamonds are softer than chalk.",
    "Humans can breathe under water without equipment.",
    "A day has thirty hours.",
    "Gold is a gas at room temperature.",
    "The Amazon is a desert.",
    "Glass is a good conductor of electricity.",
    "Penguins live mainly at the North Pole.",
    "Cows are carnivores.",
    "A century is ten years.",
    "Mars is the closest planet to the Sun.",
    "Trees grow roots in the air instead of soil.",
)


def rows(statements: tuple[str, ...], answer: bool, rng: random.Random) -> list[dict]:
    out = []
    for s in statements:
        question = f"True or false: {s}"
        instruction = rng.choice(INSTRUCTIONS)
        out.append({"question": question, "instruction": instruction, "prompt": f"{question} {instruction}",
                    "answer": answer})  # fmt: skip
    rng.shuffle(out)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-calib", type=int, default=8, help="calibration questions per answer (rest: evaluation)")
    p.add_argument("--out-dir", type=Path, default=ASSETS)
    a = p.parse_args()
    rng = random.Random(a.seed)
    t, f = rows(TRUE, True, rng), rows(FALSE, False, rng)
    splits = {"calib": t[: a.n_calib] + f[: a.n_calib], "eval": t[a.n_calib :] + f[a.n_calib :]}
    for name, split in splits.items():
        rng.shuffle(split)
        path = a.out_dir / f"yesno_{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in split))
        print(f"{path}: {len(split)} questions ({sum(r['answer'] for r in split)} true)")


if __name__ == "__main__":
    main()
