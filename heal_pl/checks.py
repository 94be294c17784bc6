"""The one check behind every "``field=value`` is not allowed; choose one of …" error of heal_pl's configs, and
:class:`Checked`, the dataclass base whose ``__post_init__`` reports every bad field at once (the commands' arguments,
``heal_pl.steering.args`` / ``heal_pl.survival.args``, are built on it; :func:`command` gives a command function
their flat keyword signature)."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, ParamSpec, TypeVar, get_args, get_type_hints

P = ParamSpec("P")
R = TypeVar("R")
A = TypeVar("A", bound="Checked")


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


def decode_utf8(data: bytes, where: str, first_line: int = 1) -> str:
    """``data`` (the bytes of a file, or of its line ``first_line``) decoded as UTF-8.

    Raises:
        ValueError: undecodable bytes; the message names ``where`` (the file), the line (counted from
            ``first_line``) and the first bad byte, e.g. ``"rows.jsonl, line 3: not valid UTF-8 (byte 0xff at
            column 5); save the file as UTF-8"``.
    """
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        before = data[: e.start]
        line, column = first_line + before.count(b"\n"), e.start - before.rfind(b"\n")
        raise ValueError(f"{where}, line {line}: not valid UTF-8 (byte 0x{data[e.start]:02x} at column {column}); "
                         "save the file as UTF-8") from None


def read_json_object(path: str | os.PathLike, field: str) -> dict[str, Any]:
    """The JSON object in the file ``path``, given as the config field ``field``.

    Raises:
        ValueError: the file is missing, empty, not UTF-8, not valid JSON or not a JSON object; the message names
            ``field`` and the file.
    """
    where = f"{field}={os.fspath(path)!r}"
    if not os.path.isfile(path):
        raise ValueError(f"{where} does not exist")
    text = decode_utf8(Path(path).read_bytes(), where)
    if not text.strip():
        raise ValueError(f"{where} is empty")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where} is not valid JSON ({e.msg}, line {e.lineno} column {e.colno})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{where} must hold a JSON object, got {type(data).__name__}")
    return data


def int_problem(field: str, value: object, minimum: int, note: str = "") -> str | None:
    """The message when ``value`` is not an integer ``>= minimum`` (``bool`` is no integer here), or ``None``."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= minimum:
        return None
    kind = "" if isinstance(value, int) and not isinstance(value, bool) else "an integer "
    return f"{field}={value!r} must be {kind}>= {minimum}{note}"


@dataclasses.dataclass
class Checked:
    """A dataclass that checks itself when built: ``__post_init__`` collects :meth:`problems` (each subclass adds its
    own to ``super().problems()``) and raises ONE ``ValueError``, ``"<where>: <problem>; <problem>; ..."``, naming
    every bad field and what it allows."""

    where: ClassVar[str] = "arguments"  # the message's prefix: the command or class

    def problems(self) -> list[str]:
        """Every problem of the fields, one message each (empty when all is well)."""
        return []

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise ValueError(f"{self.where}: " + "; ".join(problems))

    def values(self) -> dict[str, Any]:
        """The fields as keyword arguments, by name, in field order (not copied; :func:`dataclasses.asdict` copies)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def command(args_type: Callable[P, A]) -> Callable[[Callable[[A], R]], Callable[P, R]]:
    """Make ``run(args: A)`` callable as ``run(**fields of A)``: the keywords build (and check) ``A`` first.

    The returned function's signature is ``A``'s fields (defaults and annotations), so it reads like the flat
    function it replaces; its ``args_type`` attribute is ``A`` (``heal_pl.cli`` builds the flags from it)."""
    hints = get_type_hints(args_type)  # each field's type resolved in the module of the class that declares it
    # jsonargparse reads A.__init__'s annotations and would resolve the strings in A's module alone (it then leaves a
    # field it cannot resolve unchecked); A's fields come from classes of several modules, so give it the types
    init = args_type.__init__  # type: ignore[misc]
    init.__annotations__ = {k: hints.get(k, v) for k, v in init.__annotations__.items()}

    def default(f: dataclasses.Field) -> Any:
        if f.default_factory is not dataclasses.MISSING:
            return f.default_factory()
        return inspect.Parameter.empty if f.default is dataclasses.MISSING else f.default

    params = [inspect.Parameter(f.name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=default(f),
                                annotation=hints[f.name])
              for f in dataclasses.fields(args_type) if f.init]  # type: ignore[arg-type]  # fmt: skip

    def wrap(run: Callable[[A], R]) -> Callable[P, R]:
        @functools.wraps(run)
        def flat(*args: P.args, **kwargs: P.kwargs) -> R:
            return run(args_type(*args, **kwargs))

        returns = get_type_hints(run).get("return", inspect.Signature.empty)
        flat.__signature__ = inspect.Signature(params, return_annotation=returns)  # type: ignore[attr-defined]
        flat.args_type = args_type  # type: ignore[attr-defined]
        return flat

    return wrap
