"""Stored survival trajectories (``trajectories.json`` of ``heal survival``) as arrays, one group per α label.

The analyses that need no model (:mod:`heal_pl.survival.attribution`, :mod:`heal_pl.survival.thresholds`,
:mod:`heal_pl.survival.fan`) read the sweep's trajectory records, in memory (``sweep_survival``'s list, where a
fork past the end is NaN) or from the file (where it is ``null``), through :func:`load_trajectories` and
:func:`by_label`. Per label, in the order the labels first appear:

    pmass    [n, m]  float64, NaN past a trajectory's end (``None`` read as NaN)
    gen_lens [n]     int64 generated lengths
    kl       n lists of per-token KL, ``kl[i][p]`` = KL of the distribution that produced generated token ``p``
"""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from heal_pl.checks import read_json_object

KEYS = ("label", "sign", "alpha", "gen_len", "kl", "pmass")
SIGN_WORD = {"+": "plus", "-": "minus"}  # in file names


@dataclass
class LabelGroup:
    """The trajectories of one α label (``sign`` ``"0"`` for α = 0, else ``"+"`` / ``"-"``)."""

    label: str
    sign: str
    alpha: float
    pmass: np.ndarray
    gen_lens: np.ndarray
    kl: list[np.ndarray]
    prompt_index: list[int]


def load_trajectories(source: str | Path | Mapping[str, Any]) -> tuple[np.ndarray, list[Mapping[str, Any]]]:
    """``(fork_points int64 [m], trajectory records)`` of a ``trajectories.json`` path or its parsed object.

    Raises:
        ValueError: the file is missing or not JSON (named as ``trajectories``), it has no ``fork_points`` /
            ``trajectories`` (not a ``heal survival`` output), no trajectory, or a record lacks a key of
            :data:`KEYS` or has a pmass of another length than ``fork_points``.
    """
    where = f"trajectories={str(source)!r}" if isinstance(source, (str, Path)) else "trajectories"
    data = read_json_object(source, "trajectories") if isinstance(source, (str, Path)) else source
    if not isinstance(data, Mapping) or not {"fork_points", "trajectories"} <= set(data):
        raise ValueError(f"{where} is not a heal survival trajectories.json (needs 'fork_points' and 'trajectories')")
    forks = np.asarray(data["fork_points"])
    records = list(data["trajectories"])
    if forks.ndim != 1 or forks.size == 0 or not np.issubdtype(forks.dtype, np.integer):
        raise ValueError(f"{where}: fork_points must be a non-empty list of integers, got {data['fork_points']!r}")
    if not records:
        raise ValueError(f"{where} holds no trajectory")
    for i, r in enumerate(records):
        missing = [k for k in KEYS if k not in r]
        if missing:
            raise ValueError(f"{where}: trajectory {i} lacks {missing} (a heal survival record has {list(KEYS)})")
        if len(r["pmass"]) != forks.size:
            raise ValueError(f"{where}: trajectory {i} has {len(r['pmass'])} pmass values for {forks.size} forks")
        if len(r["kl"]) != r["gen_len"]:
            raise ValueError(f"{where}: trajectory {i} has {len(r['kl'])} kl values but gen_len={r['gen_len']}")
    return forks.astype(np.int64), records


def by_label(records: Sequence[Mapping[str, Any]]) -> dict[str, LabelGroup]:
    """The records grouped by ``label`` (first-appearance order) as :class:`LabelGroup` arrays."""
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for r in records:
        groups.setdefault(str(r["label"]), []).append(r)
    return {
        label: LabelGroup(
            label=label, sign=str(rs[0]["sign"]), alpha=float(rs[0]["alpha"]),
            pmass=np.array([[np.nan if p is None else p for p in r["pmass"]] for r in rs], dtype=np.float64),
            gen_lens=np.array([r["gen_len"] for r in rs], dtype=np.int64),
            kl=[np.asarray(r["kl"], dtype=np.float64) for r in rs],
            prompt_index=[int(r.get("prompt_index", i)) for i, r in enumerate(rs)],
        )  # fmt: skip
        for label, rs in groups.items()
    }


def labels_of_sign(groups: Mapping[str, Any], sign: str) -> list[str]:
    """The labels drawn for ``sign``: ``"0"`` (shared by both signs) and those starting with ``sign``."""
    return [lab for lab in groups if lab == "0" or lab.startswith(sign)]


def signs_present(groups: Mapping[str, Any]) -> list[str]:
    """``"+"`` and/or ``"-"``, those with a label; ``["+"]`` when only α = 0 was run."""
    signs = [s for s in ("+", "-") if any(lab.startswith(s) for lab in groups)]
    return signs or ["+"]


def fmt_cell(x: Any, none: str = "never") -> str:
    """A table cell: ``None`` → ``none``, a float to 3 significant digits, anything else ``str``."""
    if x is None:
        return none
    return f"{x:.3g}" if isinstance(x, float) else str(x)


def markdown_rows(rows: Sequence[Mapping[str, Any]], columns: Sequence[str], none: str = "never") -> str:
    """``rows`` as a markdown table of ``columns`` (cells by :func:`fmt_cell`)."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt_cell(r[c], none) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_csv(path: Path, rows: Sequence[Mapping[str, Any]], columns: Sequence[str], none: str = "") -> None:
    """``rows`` as CSV with a header of ``columns``; ``None`` is written as ``none``, numbers in full precision."""
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, columns)
        w.writeheader()
        w.writerows({c: none if r[c] is None else r[c] for c in columns} for r in rows)
