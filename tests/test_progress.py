"""heal_pl.progress: tqdm's bar on a terminal, log lines (done/total, elapsed, ETA) off it."""

from __future__ import annotations

import io
import logging
import sys
import types

import pytest

from heal_pl.progress import ProgressLines, duration, interactive, progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "heal_pl"]


def test_duration() -> None:
    assert duration(72.4) == "0:01:12" and duration(0) == "0:00:00" and duration(-3) == "0:00:00"
    assert duration(3 * 3600 + 5) == "3:00:05"


def test_lines_say_done_total_elapsed_eta_and_postfix(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="heal_pl")
    bar = ProgressLines(total=3, desc="calibrate +", unit="eval", every_s=0)
    bar.set_postfix(c="0.5", p95="0.120")
    bar.update()
    bar.update()
    bar.close()  # the loop ended early (converged): a last line without an ETA
    assert messages(caplog) == ["calibrate +: 1/3 eval · 0:00:00 elapsed · ETA 0:00:00 · c=0.5, p95=0.120",
                                "calibrate +: 2/3 eval · 0:00:00 elapsed · ETA 0:00:00 · c=0.5, p95=0.120"]
    caplog.clear()
    bar = ProgressLines(total=3, desc="calibrate +", unit="eval", every_s=3600)  # no line before the interval
    bar.update()
    bar.update()
    assert messages(caplog) == []
    bar.close()
    assert messages(caplog) == ["calibrate +: 2/3 eval · 0:00:00 elapsed"]


def test_iterating_writes_the_last_item_once_and_counts_breaks(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="heal_pl")
    assert list(ProgressLines(range(4), desc="survival sweep", unit="α", every_s=3600)) == [0, 1, 2, 3]
    assert messages(caplog) == ["survival sweep: 4/4 α · 0:00:00 elapsed"]
    caplog.clear()
    for i in ProgressLines(range(5), desc="rounds", unit="round", every_s=3600):
        if i == 2:
            break
    assert messages(caplog) == ["rounds: 2/5 round · 0:00:00 elapsed"]  # rounds 0 and 1 finished
    caplog.clear()
    for _ in ProgressLines(iter("abc"), desc="stream", every_s=3600):  # no length: no total
        pass
    assert messages(caplog) == ["stream: 3 it · 0:00:00 elapsed"]


def test_leave_false_and_disable_write_less(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="heal_pl")
    list(ProgressLines(range(3), desc="forks +1", leave=False, every_s=3600))  # a short inner loop: silent
    list(ProgressLines(range(3), desc="hack task", disable=True, every_s=0))
    assert messages(caplog) == []
    list(ProgressLines(range(3), desc="forks +1", leave=False, every_s=0))  # it wrote lines: the last one too
    assert messages(caplog) == [f"forks +1: {i}/3 it · 0:00:00 elapsed" + (" · ETA 0:00:00" if i < 3 else "")
                                for i in (1, 2, 3)]
    with pytest.raises(TypeError, match="update"):
        iter(ProgressLines(total=2)).__next__()


def test_progress_is_a_bar_on_a_terminal_and_lines_elsewhere(monkeypatch: pytest.MonkeyPatch,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    from tqdm.auto import tqdm

    caplog.set_level(logging.INFO, logger="heal_pl")
    monkeypatch.delitem(sys.modules, "ipykernel", raising=False)
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # a file or a pipe
    assert not interactive()
    assert isinstance(progress(range(2), desc="sweep"), ProgressLines)
    assert list(progress(range(2), desc="sweep")) == [0, 1] and sys.stderr.getvalue() == ""
    assert messages(caplog) == ["sweep: 2/2 it · 0:00:00 elapsed"]
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert interactive() and interactive(terminal) and not interactive(io.StringIO())
    bar = progress(range(2), desc="sweep")
    assert isinstance(bar, tqdm) and list(bar) == [0, 1]
    assert "\r" in terminal.getvalue() and "sweep" in terminal.getvalue()
    monkeypatch.setitem(sys.modules, "ipykernel", types.ModuleType("ipykernel"))  # Jupyter: tqdm draws a widget
    assert interactive(io.StringIO())
