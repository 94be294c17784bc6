"""Copy the loop experiment's tables into the marker blocks of its record, docs/experiments/loop.md.

    python benchmarks/loop_experiment.py --table --out benchmarks/results/loop_experiment
    python scripts/fill_loop_tables.py            # reads benchmarks/results/loop_experiment/table.md
    python scripts/fill_loop_tables.py path/to/table.md

A block is ``<!-- NAME -->`` … ``<!-- /NAME -->`` (MAIN_TABLE, PAIRED_TABLE, BATCH_TABLE, FIRE_TABLE); everything
between the markers is replaced. A marker pair missing from the page is an error.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGE = "docs/experiments/loop.md"


def rows_with(table: str, word: str) -> list[str]:
    lines = table.strip().splitlines()
    return lines[:2] + [line for line in lines[2:] if word in line]


def blocks(text: str) -> dict[str, str]:
    main, paired, batch, fire = re.findall(r"((?:^\|.*\n)+)", text, re.M)[:4]
    foot = next(line for line in text.splitlines() if line.startswith("†"))
    main108 = rows_with(main, "steps 108")
    indent = lambda table: "\n".join("  " + line for line in table)  # noqa: E731 (inside a bullet)
    return {"MAIN_TABLE": "\n".join(main108) + "\n\n" + foot, "PAIRED_TABLE": paired.strip(),
            "BATCH_TABLE": indent(batch.strip().splitlines()),
            "FIRE_TABLE": indent(rows_with(fire, "108 steps"))}  # fmt: skip


def main() -> None:
    if any(a in ("-h", "--help") for a in sys.argv[1:]):
        print(__doc__)
        return
    source = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "benchmarks/results/loop_experiment/table.md"
    filled = blocks(source.read_text())
    path = ROOT / PAGE
    text = path.read_text()
    for key, body in filled.items():
        pattern = rf"<!-- {key} -->\n.*?<!-- /{key} -->"
        if not re.search(pattern, text, flags=re.S):
            raise SystemExit(f"{PAGE}: no <!-- {key} --> … <!-- /{key} --> block to fill")
        block = f"<!-- {key} -->\n{body}\n<!-- /{key} -->"
        text = re.sub(pattern, block.replace("\\", "\\\\"), text, flags=re.S)
    path.write_text(text)
    print(f"filled {', '.join(filled)} of {PAGE} from {source}")


if __name__ == "__main__":
    main()
