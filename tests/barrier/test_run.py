"""``heal tau`` (heal_pl.barrier.run): a finished run's event file read back, and a tiny config run barrier-free."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from heal_pl.barrier.tau import AGGS, read_scalars, read_trajectory
from heal_pl.cli import main
from heal_pl.configs import FOLDER
from tests.barrier.test_tau import trajectory, write_events
from tests.helpers import heal_error

ROW = re.compile(r"^\| (mean|rmse|p95|max) \| .*? \| .*? \| (.*) \|$", re.M)


def printed_taus(out: str) -> dict[str, list[float]]:
    """The taus of the printed table, per aggregate, in the order of the margins."""
    return {agg: [float(cell.split(" (")[0]) for cell in cells.split(" | ")] for agg, cells in ROW.findall(out)}


def test_events_of_a_finished_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    traj = trajectory(20)
    write_events(tmp_path, {**traj, "barrier_fired": [0.0] * 15 + [1.0] * 5})
    config = {"model": {"barrier": {"reg": "kl_rev", "agg": "p95", "tau": 2.0, "lam": 1.0}}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))  # as `heal fit` leaves it in the log folder
    main(["tau", "--events", str(tmp_path), "--ms", "[1.2, 3]"])
    out = capsys.readouterr().out
    saved = json.loads((tmp_path / "tau.json").read_text())
    assert (tmp_path / "tau.png").stat().st_size > 10_000
    assert saved["steps"] == 20 and saved["window"] == 5 and saved["run_fired"] == 0.25
    for agg in AGGS:
        x = np.asarray(read_trajectory(tmp_path)[f"kl_{agg}"], dtype=np.float64)
        for m in (1.2, 3.0):
            assert saved["aggregates"][agg]["tau"][f"{m:g}"] == pytest.approx(m * x[-5:].mean(), rel=1e-12)
    assert printed_taus(out) == {a: [float(f"{saved['aggregates'][a]['tau'][m]:.3g}") for m in ("1.2", "3")]
                                 for a in AGGS}  # fmt: skip
    assert "note: this run's own barrier (lam 1.0) fired on 25 % of its steps" in out
    assert re.search(r"^use: heal fit --config <your config> --model.barrier.tau TAU, TAU = \S+ \(m = 1.2\) or \S+ "
                     r"\(m = 3\) \(the p95 row: the config's agg\)$", out, re.M)  # fmt: skip


def test_bad_input_is_one_line_naming_the_field(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert "events=" in heal_error(["tau", "--events", str(tmp_path / "missing")], capsys)
    write_events(tmp_path, {"sft": [1.0, 0.9]})
    assert "reg: nll" in heal_error(["tau", "--events", str(tmp_path)], capsys)
    write_events(tmp_path / "ok", trajectory(4))
    assert "ms=" in heal_error(["tau", "--events", str(tmp_path / "ok"), "--ms", "[1.5, -1]"], capsys)
    assert "model.barrier.reg='nll'" in heal_error(["tau", "--config", "nll"], capsys)
    assert "give events" in heal_error(["tau"], capsys)
    assert "steps=0" in heal_error(["tau", "--config", "rmse", "--steps", "0", "--out", str(tmp_path)], capsys)


def test_print_config_shows_the_config_to_run(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["tau", "--config", "rmse", "--steps", "5", "--print_config"])
    assert done.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["config"] == str(FOLDER / "rmse.yaml") and printed["steps"] == 5


def test_config_runs_barrier_free_and_prints_m_times_the_last_quarter(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = yaml.safe_load((FOLDER / "p95.yaml").read_text())
    spec["model"]["model"] = "tiny-llama"
    spec["data"].update(batch_size=2, max_length=48)
    spec["trainer"].update(log_every_n_steps=5, enable_progress_bar=False)  # heal tau logs every step anyway
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(spec))
    monkeypatch.chdir(tmp_path)
    main(["tau", "--config", "tiny.yaml", "--steps", "8", "--out", "runs"])
    out = capsys.readouterr().out
    (run,) = (tmp_path / "runs" / "tiny").glob("version_*")
    scalars = read_scalars(run)
    assert len(scalars["kl_p95"]) == 8 and not list(run.rglob("*.ckpt"))
    assert sum(scalars["barrier"]) == 0.0  # lam 0: the hinge closed, SFT's gradient
    assert yaml.safe_load((run / "config.yaml").read_text())["model"]["barrier"]["lam"] == 0.0
    taus = printed_taus(out)
    for agg in AGGS:
        last = np.mean(np.asarray(scalars[f"kl_{agg}"], dtype=np.float64)[-2:])  # the last quarter of 8 steps
        assert taus[agg] == [float(f"{m * last:.3g}") for m in (1.1, 1.5, 2.0)]
    assert "use: heal fit --config tiny.yaml --model.barrier.tau TAU" in out and "(the p95 row" in out
    assert (run / "tau.json").is_file() and (run / "tau.png").is_file()
