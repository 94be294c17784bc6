"""The dependency sets (scripts/deps.py): the lock covers the README's install and agrees with pyproject.toml;
the floors are read off pyproject.toml as written; the diff names every moved package."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from deps import LOCK, diff, floors, read_lock, requirements  # noqa: E402


def test_the_lock_pins_every_requirement_inside_its_declared_range() -> None:
    lock = read_lock(LOCK)
    for req in requirements():
        name = canonicalize_name(req.name)
        assert name in lock, f"constraints.txt does not pin {name}: run python scripts/deps.py refresh"
        assert req.specifier.contains(lock[name], prereleases=True), f"{name}=={lock[name]} is outside {req}"
    assert lock["torch"] == "2.13.0"  # the README's pin; no local label (+cpu), so a CUDA build matches too


def test_floors_pin_each_lower_bound() -> None:
    reqs = [Requirement(r) for r in ("torch>=2.4", "jsonargparse[signatures]>=4.32", "tqdm", "numpy>=1.2,<3",
                                     "numpy>=1.10")]  # fmt: skip
    free = "# tqdm: no floor declared, left free"
    assert floors(reqs, torch="2.13.0") == ["torch==2.13.0", "jsonargparse==4.32", free, "numpy==1.10"]
    with pytest.raises(ValueError, match="at most one lower bound"):
        floors([Requirement("peft>=0.15,>=0.16")])
    with pytest.raises(ValueError, match="no pin"):
        floors([Requirement("peft==0.15")])


def test_floors_of_the_project_are_installable_pins() -> None:
    got = [line for line in floors(requirements()) if not line.startswith("#")]
    names = [canonicalize_name(Requirement(line).name) for line in got]
    assert len(names) == len(set(names)) and "torch" in names
    assert all(str(Requirement(line).specifier).startswith("==") for line in got)


def test_diff_names_moved_new_and_missing_packages() -> None:
    lines = diff({"a": "1.0", "b": "2.0", "c": "3.0"}, {"a": "1.0", "b": "2.1", "d": "4.0"})
    assert lines == ["b 2.0 -> 2.1", "c 3.0 -> (not installed)", "d (not locked) -> 4.0"]
    assert diff({"a": "1.0"}, {"a": "1.0"}) == []
