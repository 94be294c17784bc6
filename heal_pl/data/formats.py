r"""Row shapes and sources: one chat example from the row layouts people already hold (TRL's and heal_pl's).

Accepted row shapes (a key whose value is null counts as absent: Hugging Face ``datasets`` fill the columns a
row lacks with None; other keys, e.g. ``persona`` or ``id``, are ignored):

=================================  ===========================================================================
shape                              row
=================================  ===========================================================================
messages (TRL conversational LM)   ``{"messages": [{"role", "content"}, ..., {"role": "assistant", "content"}]}``
prompt-completion (standard)       ``{"prompt": str, "completion": str, "system": str (optional)}``
prompt-completion (conversational) ``{"prompt": [messages], "completion": [{"role": "assistant", "content"}]}``
=================================  ===========================================================================

In the ``messages`` shape the last message is the completion and the earlier ones are the prompt. The two
sides of a prompt-completion row may mix (a string prompt with a message-list completion, or the reverse); a
string prompt is one user message, after the optional ``system``. ``content`` must be a string.

Sources (:func:`read_rows`): a JSONL file (read here, errors name the line); through the Hugging Face
``datasets`` library (``pip install heal_pl[data]``), a folder written by ``save_to_disk``, a ``.parquet``,
``.json`` (an array or JSON lines), ``.arrow`` or ``.csv`` file, or a dataset name on the Hub (when online).
A bare file name that is not a file in the current folder names a bundled data file (``hack_train.jsonl``,
:func:`bundled_file`), so a config reads the same wherever it runs.
A ``:split`` suffix picks the split (``data/saved:test``, ``trl-lib/Capybara:train``); without one, a
dataset with several splits gives its ``train`` split.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from heal_pl.checks import decode_utf8

ASSETS = Path(__file__).resolve().parent / "assets"  # the bundled data files
DEFAULT_TRAIN_FILE = ASSETS / "persona_train.jsonl"
DEFAULT_VAL_FILE = ASSETS / "persona_val.jsonl"

ROW_SHAPES = (
    '{"messages": [{"role", "content"}, ..., {"role": "assistant", "content"}]}; '
    '{"prompt": str, "completion": str, "system": str (optional)}; '
    '{"prompt": [messages], "completion": [{"role": "assistant", "content": str}]} '
    "(either side of a prompt-completion row may be a string or a list of messages)"
)
DATASET_SUFFIXES = {".parquet": "parquet", ".json": "json", ".arrow": "arrow", ".csv": "csv"}
TEXT_SUFFIXES = {".json", ".csv"}  # text files handed to ``datasets``: checked for UTF-8 here, where lines are known
_HUB_NAME = re.compile(r"^[\w.-]+(/[\w.-]+)?$")


@dataclass
class Example:
    """One conversation: the prompt messages (``{"role", "content"}`` dicts) and the completion text; ``where``
    locates its row for messages (``"data.jsonl, line 3"``, set by :func:`read_examples`; not compared)."""

    prompt_messages: list[dict[str, str]]
    completion: str
    where: str = field(default="", compare=False)


# --------------------------------------------------------------------------- row shapes


def _messages(value: Any, key: str) -> list[dict[str, str]]:
    """A validated list of ``{"role", "content"}`` messages (extra keys dropped)."""
    if not isinstance(value, list) or not value:
        raise ValueError(f"'{key}' must be a non-empty list of messages; accepted shapes: {ROW_SHAPES}")
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ValueError(f"{key}[{i}] must be an object with a string 'role' and 'content'")
        if not isinstance(m.get("content"), str):
            raise ValueError(f"non-string content: {key}[{i}]['content'] is {type(m.get('content')).__name__}")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _check_prompt(prompt: list[dict[str, str]], where: str) -> list[dict[str, str]]:
    if not any(m["content"].strip() for m in prompt):
        raise ValueError(f"empty prompt: no non-empty message {where}")
    return prompt


def _completion(value: Any) -> str:
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise ValueError(f"non-string content: 'completion' is a {type(value).__name__}, not a string or messages")
    messages = _messages(value, "completion")
    if len(messages) != 1 or messages[0]["role"] != "assistant":
        roles = [m["role"] for m in messages]
        raise ValueError(f"'completion' as messages must be one assistant message, got roles {roles}")
    return messages[0]["content"]


def parse_row(row: dict[str, Any]) -> Example:
    """The :class:`Example` of one row in any accepted shape (module docstring).

    Raises:
        ValueError: the row has no accepted shape (the message lists the keys found and the shapes accepted),
            or a field has the wrong type or is empty.
    """
    nulls = sorted(k for k, v in row.items() if v is None)
    row = {k: v for k, v in row.items() if v is not None}
    if "messages" in row and "prompt" in row:
        raise ValueError(f"has both 'messages' and 'prompt'; use one of the shapes: {ROW_SHAPES}")
    if "messages" in row:
        messages = _messages(row["messages"], "messages")
        if messages[-1]["role"] != "assistant":
            raise ValueError(f"the last message must have role 'assistant' (it is the completion), "
                             f"got role {messages[-1]['role']!r}")
        return Example(_check_prompt(messages[:-1], "before the final assistant message"), messages[-1]["content"])
    if "prompt" not in row or "completion" not in row:
        null = f" (and null {nulls})" if nulls else ""
        raise ValueError(f"unknown row shape: found keys {sorted(row)}{null}; accepted shapes: {ROW_SHAPES}")
    system = row.get("system")
    if system is not None and not isinstance(system, str):
        raise ValueError(f"non-string content: 'system' is a {type(system).__name__}, not a string")
    if isinstance(row["prompt"], str):
        prompt = _check_prompt([{"role": "user", "content": row["prompt"]}], "in 'prompt'")
    elif isinstance(row["prompt"], list):
        prompt = _check_prompt(_messages(row["prompt"], "prompt"), "in 'prompt'")
        if system is not None and any(m["role"] == "system" for m in prompt):
            raise ValueError("has both a 'system' key and a system message in 'prompt'; keep one")
    else:
        raise ValueError(f"non-string content: 'prompt' is a {type(row['prompt']).__name__}, not a string or messages")
    prompt = [{"role": "system", "content": system}, *prompt] if system is not None else prompt
    return Example(prompt, _completion(row["completion"]))


# --------------------------------------------------------------------------- sources


def utf8_lines(path: str | os.PathLike) -> Iterator[tuple[int, str]]:
    """``(line number, text)`` for every line of the file ``path`` (numbered from 1), read one line at a time.

    Raises:
        ValueError: a line is not valid UTF-8; the message names the file, the line and the byte.
    """
    path = Path(path)
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            yield lineno, decode_utf8(raw, str(path), lineno)


def jsonl_rows(path: str | os.PathLike, expected: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, row)`` for every non-blank line of the JSONL file ``path`` (lines numbered from 1).

    Raises:
        ValueError: a line is not valid UTF-8, not valid JSON or not a JSON object; the message names the file
            and the line, and ``expected`` says which object was wanted (e.g. ``"with 'prompt' and 'answer'"``).
    """
    for lineno, line in utf8_lines(path):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}, line {lineno}: not valid JSON ({e.msg}, column {e.colno})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}, line {lineno}: expected a JSON object {expected}, got {type(row).__name__}")
        yield lineno, row


def bundled_file(location: str | os.PathLike) -> str:
    """``location`` when it exists; else the bundled data file of that name (``hack_pairs.jsonl`` ->
    ``heal_pl/data/assets/hack_pairs.jsonl``) when there is one; else ``location`` as given."""
    path = Path(location).expanduser()
    if not path.exists() and path.name == str(location) and (ASSETS / path.name).is_file():
        return str(ASSETS / path.name)
    return str(location)


def split_source(source: str | os.PathLike) -> tuple[str, str | None]:
    """``(location, split)``: an existing path (or bundled file, :func:`bundled_file`) is taken whole; otherwise a
    trailing ``:split`` is the split."""
    text = bundled_file(source)
    if Path(text).expanduser().exists() or ":" not in text:
        return text, None
    location, split = text.rsplit(":", 1)
    return location, split or None


def source_problem(name: str, source: str | None) -> str | None:
    """Why ``source`` cannot be read (for argument checks), or None: a missing path-like source is a problem,
    a Hub-style name (``name`` or ``org/name``, no file suffix) is left to ``datasets`` to find."""
    if source is None:
        return None
    location, _ = split_source(source)
    path = Path(location).expanduser()
    if path.exists():
        return None
    if _HUB_NAME.match(location) and path.suffix.lower() not in {".jsonl", *DATASET_SUFFIXES}:
        return None
    return (f"{name}={source!r} is not an existing file or folder (accepted: a JSONL, parquet, JSON, arrow or CSV "
            f"file, a save_to_disk folder, or a Hugging Face dataset name, each with an optional ':split')")


def _pick_split(data: Any, split: str | None, source: str) -> Any:
    from datasets import DatasetDict, IterableDatasetDict

    if not isinstance(data, DatasetDict | IterableDatasetDict):
        if split is not None:
            raise ValueError(f"{source!r} holds a single split; drop the ':{split}' suffix")
        return data
    if split is None:
        split = "train" if "train" in data or len(data) != 1 else next(iter(data))
    if split not in data:
        raise ValueError(f"{source!r} has no split {split!r}; its splits are {sorted(data)} (add ':<split>')")
    return data[split]


def _load_dataset(location: str, split: str | None, source: str) -> Any:
    try:
        import datasets
    except ImportError:
        raise ImportError(f"reading {source!r} needs the Hugging Face datasets library: "
                          "pip install 'heal_pl[data]' (or pip install datasets)") from None
    path = Path(location).expanduser()
    if path.is_dir():
        try:
            data = datasets.load_from_disk(str(path))
        except FileNotFoundError as e:
            raise ValueError(f"{source!r} is a folder but not one written by save_to_disk ({e})") from None
    elif path.is_file():
        builder = DATASET_SUFFIXES.get(path.suffix.lower())
        if builder is None:
            raise ValueError(f"{source!r}: unknown file type {path.suffix!r}; accepted: .jsonl, "
                             + ", ".join(DATASET_SUFFIXES))
        data = datasets.load_dataset(builder, data_files=str(path))
    else:
        try:
            data = datasets.load_dataset(location)
        except Exception as e:  # offline, unknown name, gated: say what was tried
            raise ValueError(f"could not load {source!r}: not a local file or folder, and as a Hugging Face "
                             f"dataset name: {type(e).__name__}: {e}") from None
    return _pick_split(data, split, source)


def read_rows(source: str | os.PathLike) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(where, row)`` for every row of ``source`` (a JSONL file, or anything ``datasets`` reads: module
    docstring); ``where`` locates the row in error messages (``"data.jsonl, line 3"``, ``"data.parquet, row 2"``).

    Raises:
        ValueError: a JSONL, JSON or CSV file is not UTF-8 (naming the file and the line), a JSONL line is not a
            JSON object, or ``datasets`` cannot read the source.
    """
    location, split = split_source(source)
    path = Path(location).expanduser()
    if path.is_file() and path.suffix.lower() == ".jsonl" and split is None:
        for lineno, row in jsonl_rows(path, f"(accepted shapes: {ROW_SHAPES})"):
            yield f"{path}, line {lineno}", row
        return
    if path.is_file() and path.suffix.lower() in TEXT_SUFFIXES:
        for _ in utf8_lines(path):  # datasets would say neither the file nor the line
            pass
    for i, row in enumerate(_load_dataset(location, split, str(source))):
        yield f"{source}, row {i}", row


def read_examples(source: str | os.PathLike) -> list[Example]:
    """Parse every row of ``source`` (:func:`read_rows`) into an :class:`Example` (:func:`parse_row`).

    Raises:
        ValueError: a row is not JSON or has no accepted shape; the message names the source and the row.
    """
    examples = []
    for where, row in read_rows(source):
        try:
            example = parse_row(row)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        example.where = where
        examples.append(example)
    return examples
