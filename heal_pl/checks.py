"""The one check behind every "``field=value`` is not allowed; choose one of …" error of heal_pl's configs."""

from __future__ import annotations

from typing import get_args


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
