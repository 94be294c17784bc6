"""Your own prompts, for ``heal calibrate`` (open prompts) and ``heal survival`` / ``heal compare`` (statements with
a true/false answer): read from a file, checked before any model is loaded.

========================  ==========================================================================================
source                    what a row is
========================  ==========================================================================================
``.jsonl``                one JSON object per line: ``{"prompt": "..."}``, with ``"answer": true | false`` for the
                          survival probe (other keys, e.g. the bundled files' ``question`` or ``instruction``, are
                          ignored)
``.csv``                  a header row naming the columns ``prompt`` (and ``answer``: ``true`` / ``false``)
``.txt``                  one prompt per line (open prompts only: a plain line has no answer)
``.json``, ``.parquet``,  through the Hugging Face ``datasets`` library (:func:`heal_pl.data.formats.read_rows`),
``.arrow``, a folder, a   with the same columns; a ``:split`` suffix picks the split
dataset name
========================  ==========================================================================================

Blank lines are skipped. A bare file name that is not in the current folder names a bundled data file
(``yesno_eval.jsonl``, :func:`heal_pl.data.formats.bundled_file`). Each prompt may appear once in a file: the sets
cut from one file (fit / calibration / audit, or the probe check and the evaluation) must not share a prompt, and
:func:`overlap_problem` checks two sets from different files. Every error names the file and the line (or row).
"""

from __future__ import annotations

import csv
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from heal_pl.data.formats import DATASET_SUFFIXES, jsonl_rows, read_rows, source_problem, split_source, utf8_lines

READ_HERE = (".jsonl", ".csv", ".txt")  # read line by line here, so that errors name the line
SUFFIXES = tuple(dict.fromkeys((*READ_HERE, *DATASET_SUFFIXES)))
ANSWERS = {"true": True, "false": False}
CHECK_EVERY = 4  # one file for survival: rows 1, 5, 9, … are the probe check's, the others the evaluation's


def _csv_rows(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    reader = csv.DictReader(line for _, line in utf8_lines(path))
    for row in reader:
        if any(v.strip() for v in row.values() if isinstance(v, str)):  # not a blank line (or one of commas)
            yield f"{path}, line {reader.line_num}", {k.strip().lstrip("\ufeff"): v  # a spreadsheet's byte-order mark
                                                      for k, v in row.items() if k is not None}


def prompt_rows(source: str, name: str = "prompts") -> list[tuple[str, dict[str, Any]]]:
    """``(where, row)`` for every row of ``source`` (module docstring); ``where`` is ``"<name>: file, line 3"``.

    Raises:
        ValueError: the file is missing, of an unknown type (the accepted suffixes are named), not UTF-8, holds a
            line that is not a JSON object, or holds no row at all.
    """
    location, split = split_source(source)
    path = Path(location).expanduser()
    suffix = path.suffix.lower()
    if path.is_file() and split is None and suffix in READ_HERE:
        try:
            if suffix == ".txt":
                rows = [(f"{path}, line {n}", {"prompt": line.rstrip("\r\n")}) for n, line in utf8_lines(path)
                        if line.strip()]  # fmt: skip
            elif suffix == ".csv":
                rows = list(_csv_rows(path))
            else:
                rows = [(f"{path}, line {n}", row) for n, row in jsonl_rows(path, "with a 'prompt'")]
        except ValueError as e:  # not UTF-8, not JSON: say which option read the file
            raise ValueError(f"{name}: {e}") from None
    elif path.is_file() and suffix not in DATASET_SUFFIXES:
        raise ValueError(f"{name}={source!r}: unknown file type {suffix!r}; accepted: {', '.join(SUFFIXES)}")
    elif not path.exists() and suffix in SUFFIXES:
        raise ValueError(f"{name}={source!r} does not exist (a {', '.join(SUFFIXES)} file of prompts)")
    else:
        problem = source_problem(name, source)
        if problem is not None:
            raise ValueError(problem)
        rows = list(read_rows(source))
    if not rows:
        raise ValueError(f"{name}={source!r} is empty: it holds no prompt")
    return [(f"{name}: {where}", row) for where, row in rows]


def _prompt(row: dict[str, Any], where: str) -> str:
    value = row.get("prompt")
    if value is None:
        raise ValueError(f"{where}: no 'prompt' field (the text to ask); found {sorted(row)}")
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{where}: 'prompt' must be non-empty text, got {value!r}")
    return value


def _answer(row: dict[str, Any], where: str) -> bool:
    value = row.get("answer")
    if value is None:
        plain = " (a .txt file holds prompts only: give a .jsonl or .csv file)" if ".txt, line " in where else ""
        raise ValueError(f"{where}: no 'answer' field (true or false); found {sorted(row)}{plain}")
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ANSWERS:
        return ANSWERS[value.strip().lower()]
    raise ValueError(f"{where}: answer={value!r} is not allowed; choose one of true, false "
                     "(a JSON boolean, or the word in a CSV)")  # fmt: skip


def read_prompts(source: str, name: str = "prompts", answers: bool = False) -> list[dict[str, Any]]:
    """The rows of ``source`` as ``{"prompt": str, "where": "prompts: file, line 3"}`` (and ``"answer": bool`` when
    ``answers``: the survival probe's statements), in file order.

    Raises:
        ValueError: any problem of :func:`prompt_rows`; a row without ``prompt`` (or ``answer``), an empty prompt,
            an answer other than true / false, or a prompt given twice; the message names the file and the line.
    """
    out: list[dict[str, Any]] = []
    first: dict[str, str] = {}
    for where, row in prompt_rows(source, name):
        item: dict[str, Any] = {"prompt": _prompt(row, where)}
        if answers:
            item["answer"] = _answer(row, where)
        if item["prompt"] in first:
            raise ValueError(f"{where}: the prompt {item['prompt']!r} is already at {first[item['prompt']]}; give "
                             "each prompt once (the sets cut from one file must not share a prompt)")  # fmt: skip
        first[item["prompt"]] = item["where"] = where
        out.append(item)
    return out


def split_check_eval(
    rows: Sequence[dict[str, Any]], name: str = "prompts"
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """One survival file (named ``name`` in messages) cut in two, deterministically: ``(probe check set, evaluation
    set)``, rows 1, 5, 9, … (every :data:`CHECK_EVERY`-th from the first) in the first, the others in the second.

    Raises:
        ValueError: fewer than 2 rows.
    """
    if len(rows) < 2:
        raise ValueError(f"{name}: one file of {len(rows)} prompt cannot be cut into a probe check set and an "
                         "evaluation set; give at least 2 (or the check's own file, check_prompts)")  # fmt: skip
    return list(rows[::CHECK_EVERY]), [r for i, r in enumerate(rows) if i % CHECK_EVERY]


def overlap_problem(name_a: str, a: Sequence[dict[str, Any]], name_b: str, b: Sequence[dict[str, Any]]) -> str | None:
    """The message when the prompt sets ``a`` and ``b`` share a prompt (one named with where it is in each), or
    ``None`` when they are disjoint."""
    where_b = {r["prompt"]: r.get("where", name_b) for r in b}
    shared = [r for r in a if r["prompt"] in where_b]
    if not shared:
        return None
    r = shared[0]
    return (f"the {name_a} and the {name_b} share {len(shared)} prompt(s), e.g. {r['prompt']!r} "
            f"({r.get('where', name_a)}; {where_b[r['prompt']]}); they must be disjoint")
