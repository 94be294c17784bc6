"""The journal of finished steps (heal_pl.journal), and ``heal survival`` / ``heal calibrate`` interrupted and rerun.

The interrupted run dies twice — once inside the calibration (at its third KL evaluation) and once in the sweep
(right after its first α) — and is rerun each time with the same arguments; its files must equal those of one
uninterrupted run, and the reruns must not measure again what was finished.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest

import heal_pl.steering.isokl
import heal_pl.survival.sweep
from heal_pl.cli import main
from heal_pl.journal import Journal, atomic_path, fingerprint, journaled
from tests.helpers import heal_error
from tests.survival.test_run import CALIB, CONFIG, TINY

# --------------------------------------------------------------------------- the journal itself


def test_a_rerun_reads_the_finished_steps_and_says_so(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    config = {"w": 9, "alphas": (0.0, 1.0)}
    first = Journal(tmp_path / "j", config, "heal test")
    first.record("alpha_plus_1", {"kl": [0.5, float("nan")], "n": 3})
    with caplog.at_level(logging.INFO, logger="heal_pl"):
        again = Journal(tmp_path / "j", {"alphas": [0.0, 1.0], "w": 9}, "heal test")  # a tuple reads as a list
    assert "heal test: continuing from 1 finished steps" in caplog.text
    step = again.get("alpha_plus_1")
    assert step["n"] == 3 and step["kl"][0] == 0.5 and step["kl"][1] != step["kl"][1]
    assert again.get("alpha_plus_2") is None
    saved = json.loads((tmp_path / "j" / "config.json").read_text())
    assert saved["fingerprint"] == fingerprint(config) and saved["command"] == "heal test"


def test_another_config_is_refused_naming_what_changed(tmp_path: Path) -> None:
    Journal(tmp_path / "j", {"w": 9, "n_eval": 5, "splice": "x"}).record("probe_check", {"n": 1})
    with pytest.raises(ValueError, match=r"\(n_eval: 5 there, None now; w: 9 there, 10 now\)"):
        Journal(tmp_path / "j", {"w": 10, "n_eval": None, "splice": "x"})


def test_an_empty_journal_folder_accepts_any_config(tmp_path: Path) -> None:
    Journal(tmp_path / "j", {"w": 9})  # nothing written until a step finishes
    assert Journal(tmp_path / "j", {"w": 10}).steps == {}


def test_a_failed_write_leaves_the_old_file(tmp_path: Path) -> None:
    path = tmp_path / "step.json"
    path.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(path) as tmp:
        tmp.write_text("half of the new")
        raise RuntimeError("killed")
    assert path.read_text() == "old" and list(tmp_path.iterdir()) == [path]


def test_a_step_recorded_at_another_coefficient_is_measured_again(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j", {})
    journal.record("plus_eval_001", {"c": 2.0, "p95": 1.0})
    assert journaled(journal, "plus_eval_001", {"c": 2.0}, lambda: {"c": 2.0, "p95": -1.0})["p95"] == 1.0
    assert journaled(journal, "plus_eval_001", {"c": 3.0}, lambda: {"c": 3.0, "p95": 7.0})["p95"] == 7.0
    assert Journal(tmp_path / "j", {}).get("plus_eval_001") == {"c": 3.0, "p95": 7.0}


@pytest.mark.parametrize("key", ["config", "a/b", "", "α"])
def test_bad_step_names_are_refused(tmp_path: Path, key: str) -> None:
    with pytest.raises(ValueError, match="journal key"):
        Journal(tmp_path / "j", {}).record(key, 1)


def test_a_step_must_be_json(tmp_path: Path) -> None:
    with pytest.raises(TypeError):
        Journal(tmp_path / "j", {}).record("x", {"t": object()})


# --------------------------------------------------------------------------- heal survival, killed and rerun

FILES = ["summary.json", "survival.csv", "survival.md", "trajectories.json", "trajectories.csv", "kl.csv",
         "calibrate/history.csv", "calibrate/summary.csv", "calibrate/audit.csv"]  # fmt: skip


def _survival(out: Path) -> None:
    main(["survival", "--config", str(CONFIG), *TINY, "--out_dir", str(out), "--calibration", CALIB])


class Killed(RuntimeError):
    pass


def _counting(monkeypatch: pytest.MonkeyPatch, module: object, name: str, die_at: int | None) -> list[int]:
    """Count calls of ``module.name``; raise :class:`Killed` at call ``die_at`` (1-based)."""
    calls, real = [], getattr(module, name)

    def wrapper(*args: object, **kwargs: object) -> object:
        calls.append(1)
        if len(calls) == die_at:
            raise Killed(f"{name} call {die_at}")
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)
    return calls


@pytest.mark.slow  # four heal survival runs (~15 s)
def test_interrupted_survival_rerun_gives_the_files_of_one_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    with monkeypatch.context() as m:
        kl_calls = _counting(m, heal_pl.steering.isokl, "measure_kl", None)
        alpha_calls = _counting(m, heal_pl.survival.sweep, "measure_alpha", None)
        _survival(tmp_path / "straight")
    n_kl, n_alpha = len(kl_calls), len(alpha_calls)
    assert n_alpha == 5 and n_kl >= 4  # α = 0, ±1, ±4; per sign >= 1 evaluation + the audit

    out = tmp_path / "killed"
    with monkeypatch.context() as m, pytest.raises(Killed):  # dies inside the calibration
        _counting(m, heal_pl.steering.isokl, "measure_kl", 3)
        _survival(out)
    with monkeypatch.context() as m, pytest.raises(Killed):  # dies in the sweep, after the first α
        kl_calls = _counting(m, heal_pl.steering.isokl, "measure_kl", None)
        _counting(m, heal_pl.survival.sweep, "measure_alpha", 2)
        with caplog.at_level(logging.INFO, logger="heal_pl"):
            _survival(out)
    assert len(kl_calls) == n_kl - 2, "the two finished evaluations are read back, not measured again"
    assert "heal calibrate: continuing from" in caplog.text
    caplog.clear()
    with monkeypatch.context() as m:
        kl_calls = _counting(m, heal_pl.steering.isokl, "measure_kl", None)
        alpha_calls = _counting(m, heal_pl.survival.sweep, "measure_alpha", None)
        with caplog.at_level(logging.INFO, logger="heal_pl"):
            _survival(out)
    assert (len(kl_calls), len(alpha_calls)) == (0, n_alpha - 1)
    assert "heal survival: continuing from 2 finished steps" in caplog.text  # the probe check and α = 0

    for name in FILES:
        assert (out / name).read_bytes() == (tmp_path / "straight" / name).read_bytes(), name
    calib = [json.loads((d / "calibrate" / "calib.json").read_text()) for d in (out, tmp_path / "straight")]
    assert calib[0]["results"] == calib[1]["results"]


def test_survival_rerun_with_another_config_names_the_argument(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                                              ) -> None:  # fmt: skip
    journal = tmp_path / "run" / "journal"
    Journal(journal, {"w": 9}).record("probe_check", {})  # any earlier run's journal
    assert re.search(r"heal survival: .* \(.*w: 9 there, 10 now", heal_error(
        ["survival", "--config", str(CONFIG), *TINY, "--w", "10", "--out_dir", str(tmp_path / "run"),
         "--calibration", CALIB], capsys))  # fmt: skip


def test_calibrate_rerun_with_another_config_names_the_argument(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    args = ["calibrate", "--config", str(CONFIG.with_name("calibrate.yaml")), "--model", "tiny-llama",
            "--out_dir", str(tmp_path), "--n_fit", "2", "--n_calib", "2", "--n_audit", "1", "--max_new_tokens", "4",
            "--max_iters", "1", "--signs", "[1]"]  # fmt: skip
    main(args)
    assert re.search(r"heal calibrate: .*n_calib: 2 there, 3 now", heal_error([*args, "--n_calib", "3"], capsys))
