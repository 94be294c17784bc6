"""Progress of heal_pl's own loops (calibrate, survival, compare, rounds): tqdm's bar on a terminal, log lines off it.

A bar drawn into a file or a job scheduler's log is a stream of carriage returns. :func:`progress` gives tqdm's bar
when stderr, where tqdm draws, is a terminal (or a notebook runs the code), and otherwise a :class:`ProgressLines`,
which logs (logger ``heal_pl``; stdout under ``heal``) a line at most every ``every_s`` seconds and one at the end::

    survival sweep: 3/7 α · 0:01:12 elapsed · ETA 0:01:36

``heal fit`` does the same for Lightning's bar with :class:`heal_pl.callbacks.ProgressLog`, which writes
:func:`duration` too, and asks :func:`interactive` about stdout, where Lightning draws.
"""

from __future__ import annotations

import datetime
import logging
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, Generic, TextIO, TypeAlias, TypeVar

from tqdm.auto import tqdm

log = logging.getLogger("heal_pl")
T = TypeVar("T")
EVERY_S = 30.0  # seconds between two progress lines


def interactive(stream: TextIO | None = None) -> bool:
    """Whether a progress bar drawn on ``stream`` (default: ``sys.stderr``) is seen as a bar: a terminal, or a
    Jupyter kernel, where ``tqdm.auto`` draws a widget."""
    stream = sys.stderr if stream is None else stream
    return "ipykernel" in sys.modules or bool(getattr(stream, "isatty", lambda: False)())


def duration(seconds: float) -> str:
    """``H:MM:SS`` of ``seconds`` rounded to the second: ``duration(72.4) == "0:01:12"``."""
    return str(datetime.timedelta(seconds=round(max(0.0, seconds))))


class ProgressLines(Generic[T]):
    """The part of tqdm's interface heal_pl uses (iterate, ``update``, ``set_postfix``, ``n``, ``close``), as log
    lines: ``desc: done/total unit · elapsed · ETA · postfix``.

    Args:
        iterable: what to iterate over (None: counted with ``update``).
        total: the number of items (default: ``len(iterable)`` when it has one); None leaves out the ETA.
        desc: what is counted, first on the line.
        unit: the name of one item.
        leave: write the final line; False writes it only when the loop already wrote a line.
        disable: write nothing.
        every_s: seconds between two lines; ``close`` (run at the end of an iteration) writes the last one.
    """

    def __init__(self, iterable: Iterable[T] | None = None, total: int | None = None, desc: str = "",
                 unit: str = "it", leave: bool = True, disable: bool = False, every_s: float = EVERY_S) -> None:
        self.iterable = iterable
        sized = total is None and hasattr(iterable, "__len__")
        self.total = len(iterable) if sized else total  # type: ignore[arg-type]
        self.desc, self.unit, self.leave, self.disable, self.every_s = desc, unit, leave, disable, every_s
        self.n, self.lines, self._reported, self._postfix, self._closed = 0, 0, 0, "", False
        self._start = self._last = time.perf_counter()

    def line(self) -> str:
        elapsed = time.perf_counter() - self._start
        done = f"{self.n}/{self.total}" if self.total else f"{self.n}"
        parts = [f"{self.desc}: {done} {self.unit}", f"{duration(elapsed)} elapsed"]
        if self.total and 0 < self.n < self.total and not self._closed:
            parts.append(f"ETA {duration(elapsed / self.n * (self.total - self.n))}")
        return " · ".join(parts + ([self._postfix] if self._postfix else []))

    def _write(self) -> None:
        log.info("%s", self.line())
        self.lines, self._reported, self._last = self.lines + 1, self.n, time.perf_counter()

    def update(self, n: int = 1) -> None:
        self.n += n
        if not self.disable and time.perf_counter() - self._last >= self.every_s:
            self._write()

    def set_postfix(self, **values: object) -> None:
        self._postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def close(self) -> None:
        """The final line (no ETA: the loop is over), when the last items have none yet (see ``leave``)."""
        self._closed = True
        if not self.disable and self.n > self._reported and (self.leave or self.lines):
            self._write()

    def __iter__(self) -> Iterator[T]:
        if self.iterable is None:
            raise TypeError("ProgressLines without an iterable is counted with update(), not iterated")
        try:
            for item in self.iterable:
                yield item
                self.update()
        finally:  # the end of the loop, or a break out of it
            self.close()


Progress: TypeAlias = "tqdm | ProgressLines[Any]"  # what progress() returns


def progress(iterable: Iterable[T] | None = None, *, total: int | None = None, desc: str = "", unit: str = "it",
             leave: bool = True, disable: bool = False) -> Progress:
    """tqdm's bar when :func:`interactive` (stderr), else :class:`ProgressLines`; the arguments are tqdm's."""
    kind = tqdm if interactive() else ProgressLines
    return kind(iterable, total=total, desc=desc, unit=unit, leave=leave, disable=disable)
