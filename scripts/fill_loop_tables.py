"""Copy the loop experiment's tables into the marker blocks of docs/barrier.md and README.md.

    python benchmarks/loop_experiment.py --table --out benchmarks/results/loop_experiment
    python scripts/fill_loop_tables.py            # reads benchmarks/results/loop_experiment/table.md

A block is ``<!-- NAME -->`` … ``<!-- /NAME -->``; everything between the markers is replaced.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# arm, schedule, seeds, fired, loop sampled, p_loop, style, val rmse, rmse ÷ mean, min per run
README_COLUMNS = (1, 2, 3, 15, 5, 6, 8, 11, 14, 16)


def rows_with(table: str, word: str) -> list[str]:
    lines = table.strip().splitlines()
    return lines[:2] + [line for line in lines[2:] if word in line]


def columns(lines: list[str], keep: tuple[int, ...]) -> list[str]:
    return ["|" + "|".join(line.strip("|").split("|")[c] for c in keep) + "|" for line in lines]


def blocks(text: str) -> dict[str, str]:
    main, paired, batch, fire = re.findall(r"((?:^\|.*\n)+)", text, re.M)[:4]
    foot = next(line for line in text.splitlines() if line.startswith("†"))
    main108 = rows_with(main, "steps 108")
    indent = lambda table: "\n".join("  " + line for line in table)  # noqa: E731 (inside a bullet)
    return {"MAIN_TABLE": "\n".join(main108) + "\n\n" + foot, "PAIRED_TABLE": paired.strip(),
            "BATCH_TABLE": indent(batch.strip().splitlines()), "FIRE_TABLE": indent(rows_with(fire, "108 steps")),
            "README_TABLE": "\n".join(columns(main108, README_COLUMNS)) + "\n\n" + foot}  # fmt: skip


def main() -> None:
    source = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "benchmarks/results/loop_experiment/table.md"
    filled = blocks(source.read_text())
    for name in ("docs/barrier.md", "README.md"):
        path = ROOT / name
        text = path.read_text()
        for key, body in filled.items():
            block = f"<!-- {key} -->\n{body}\n<!-- /{key} -->"
            text = re.sub(rf"<!-- {key} -->\n.*?<!-- /{key} -->", block.replace("\\", "\\\\"), text, flags=re.S)
        path.write_text(text)
    print(f"filled {', '.join(filled)} from {source}")


if __name__ == "__main__":
    main()
