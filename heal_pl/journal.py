"""A journal of finished steps, so that a long command killed half-way picks up where it stopped.

``heal calibrate`` records every KL evaluation and ``heal survival`` every α of its sweep in
``<out_dir>/journal/``: one JSON file per finished step, and ``config.json`` with the command's config and its
fingerprint (the SHA-256 of the canonical JSON of the config). Every file is written atomically (a temporary
file in the same folder, then ``os.replace``), so a kill leaves either the old file or the new one, never half of
one. A rerun with the same config and out_dir reads the finished steps instead of recomputing them (and logs how
many); a rerun with another config is refused, naming the fields that changed.

    journal = Journal(out / "journal", config, command="heal survival")
    record = journal.get("alpha_plus_0.5")
    if record is None:
        record = journal.record("alpha_plus_0.5", measure(...))   # JSON-ready values
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from heal_pl import shards

log = logging.getLogger("heal_pl")

CONFIG_FILE = "config.json"
_KEY = re.compile(r"[A-Za-z0-9_.+-]+")


def canonical(value: Any, strict: bool = False) -> Any:
    """``value`` as JSON reads it back (tuples become lists, keys strings; other objects their ``str``, or a
    ``TypeError`` when ``strict``)."""
    return json.loads(json.dumps(value, default=None if strict else str))


def fingerprint(config: Mapping[str, Any]) -> str:
    """SHA-256 of the canonical, key-sorted JSON of ``config``."""
    return hashlib.sha256(json.dumps(canonical(config), sort_keys=True).encode()).hexdigest()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; when the block ends normally it replaces ``path`` (``os.replace``:
    readers see the old file or the whole new one); when the block raises, the temporary file is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path: str | os.PathLike, value: Any, **dump_kwargs: Any) -> None:
    """Write ``value`` as JSON to ``path`` atomically (:func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(value, **dump_kwargs))


def config_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """``"field: old there, new now"`` for every top-level field whose canonical value differs."""
    old, new = canonical(old), canonical(new)
    return [f"{k}: {old.get(k, '(absent)')!r} there, {new.get(k, '(absent)')!r} now"
            for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]  # fmt: skip


class Journal:
    """The finished steps of one command in one folder (module docstring).

    Args:
        folder: where the step files go (created on the first write).
        config: the values the steps depend on (JSON-able); the folder must hold no journal of another config.
        command: the command's name, for messages.

    Raises:
        ValueError: ``folder`` holds a journal written with another config; the message names the changed fields.
    """

    def __init__(self, folder: str | os.PathLike, config: Mapping[str, Any], command: str = "run") -> None:
        self.folder, self.command = Path(folder), command
        self.config, self.fingerprint = canonical(dict(config)), fingerprint(config)
        self.steps: dict[str, Any] = {}
        saved = self.folder / CONFIG_FILE
        if not saved.is_file():
            return
        old = json.loads(saved.read_text())
        if old.get("fingerprint") != self.fingerprint:
            changes = config_changes(old.get("config", {}), self.config) or ["(the fingerprint differs)"]
            raise ValueError(
                f"{command}: {self.folder} holds the finished steps of another config ({'; '.join(changes)}); "
                f"use another out_dir, or delete {self.folder} to start over"
            )
        for path in sorted(self.folder.glob("*.json")):
            if path.name != CONFIG_FILE:
                self.steps[path.stem] = json.loads(path.read_text())
        if self.steps:
            log.info("%s: continuing from %d finished steps in %s (same config)", command, len(self.steps),
                     self.folder)  # fmt: skip

    def get(self, key: str) -> Any | None:
        """The recorded value of step ``key``, or None when it has not finished."""
        return self.steps.get(key)

    def record(self, key: str, value: Any) -> Any:
        """Write step ``key`` (atomically; in a sharded job only rank 0 writes, :mod:`heal_pl.shards`) and return
        ``value`` as it will be read back on a rerun."""
        if not _KEY.fullmatch(key) or key == Path(CONFIG_FILE).stem:
            raise ValueError(f"journal key {key!r} must be letters, digits and _ . + - (and not 'config')")
        value = canonical(value, strict=True)
        if shards.is_writer():  # a sharded job: every process holds the value, rank 0 writes it
            if not (self.folder / CONFIG_FILE).is_file():
                write_json(self.folder / CONFIG_FILE, {"command": self.command, "fingerprint": self.fingerprint,
                                                       "config": self.config}, indent=2)  # fmt: skip
            write_json(self.folder / f"{key}.json", value)
        self.steps[key] = value
        return value


def journaled(journal: Journal | None, key: str, expect: Mapping[str, Any], compute: Callable[[], Any]) -> Any:
    """Step ``key``'s recorded value when ``journal`` holds it with the ``expect`` entries (e.g. the coefficient it
    was measured at), else ``compute()``, recorded. Without a journal: ``compute()``."""
    if journal is None:
        return compute()
    recorded = journal.get(key)
    if recorded is not None:
        if all(recorded.get(k) == canonical(v) for k, v in expect.items()):
            return recorded
        log.warning("%s: step %s was recorded for %s, now %s: measuring it again", journal.command, key,
                    {k: recorded.get(k) for k in expect}, dict(expect))  # fmt: skip
    return journal.record(key, compute())
