"""The one check behind every "``field=value`` is not allowed; choose one of …" error of heal_pl's configs."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, get_args


def choice_problem(field: str, value: object, allowed: object) -> str | None:
    """The message naming ``field`` and the allowed values (a ``Literal`` type or a sequence), or ``None``."""
    choices = get_args(allowed) or tuple(allowed)  # type: ignore[arg-type]
    if value in choices:
        return None
    return f"{field}={value!r} is not allowed; choose one of {', '.join(map(str, choices))}"


def check_choice(field: str, value: object, allowed: object) -> None:
    """Raise ``ValueError`` naming ``field`` and the allowed values of ``allowed`` (see :func:`choice_problem`)."""
    problem = choice_problem(field, value, allowed)
    if problem is not None:
        raise ValueError(problem)


def read_json_object(path: str | os.PathLike, field: str) -> dict[str, Any]:
    """The JSON object in the file ``path``, given as the config field ``field``.

    Raises:
        ValueError: the file is missing, empty, not valid JSON or not a JSON object; the message names
            ``field`` and the file.
    """
    where = f"{field}={os.fspath(path)!r}"
    if not os.path.isfile(path):
        raise ValueError(f"{where} does not exist")
    text = Path(path).read_text(encoding="utf-8")
    if not text.strip():
        raise ValueError(f"{where} is empty")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where} is not valid JSON ({e.msg}, line {e.lineno} column {e.colno})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{where} must hold a JSON object, got {type(data).__name__}")
    return data
