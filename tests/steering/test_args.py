"""The typed arguments of ``heal calibrate`` (heal_pl.steering.args) and the typed iso-KL result: every bad field named
in one error, one sign rule for calibrate, survival, compare and the callback, and results that keep their JSON keys.
"""

from __future__ import annotations

import csv
import dataclasses
import inspect
import json
import math
import re
from pathlib import Path
from typing import get_args, get_type_hints

import pytest

from heal_pl.callbacks.isokl_calibration import IsoKLCalibrationCallback
from heal_pl.configs import FOLDER
from heal_pl.steering.args import CALIBRATION_KEYS, CalibrateArgs, CalibrationSettings
from heal_pl.steering.isokl import IsoKLResult
from heal_pl.steering.run import _write_outputs, run_calibration
from heal_pl.steering.trajectory import STATS
from tests.helpers import heal_error

CONFIGS = FOLDER
# the keys of one sign's result in calib.json (and in the callback's state), in their order
RESULT_KEYS = ["sign", "stat", "target", "c_star", "coeff", "stat_star", "converged", "evaluations", "message",
               "history", "stats_star", "audit", "audit_ratio"]  # fmt: skip
TWICE = "signs=[1, 1] must hold +1 and/or -1, each once"


def result(sign: int = 1, audit: bool = True) -> IsoKLResult:
    stats = {s: 0.1 * (i + 1) for i, s in enumerate(STATS)}
    history = [{"c": 2.0, "coeff": 2.0 * sign, **stats}, {"c": 3.0, "coeff": 3.0 * sign, **stats}]
    return IsoKLResult(sign=sign, stat="p95", target=1.0, c_star=3.0, coeff=3.0 * sign, stat_star=stats["p95"],
                       converged=False, evaluations=2, message="max_iters=2 reached", history=history,
                       stats_star=stats, audit=dict(stats) if audit else None,
                       audit_ratio=1.0 if audit else None)  # fmt: skip


def test_one_error_names_every_bad_field_and_its_allowed_values() -> None:
    with pytest.raises(ValueError) as info:
        CalibrateArgs(stat="p42", signs=[1, 1], dtype="half", method="adapter", n_calib=0, bracket=(5.0, 1.0),
                      tol=0.0, target=-1.0, max_iters=0)  # type: ignore[arg-type]  # fmt: skip
    message = str(info.value)
    assert message.startswith("heal calibrate: ")
    for part in ("stat='p42' is not allowed; choose one of mean, p50, p90, p95, p99, max, rms", TWICE,
                 "dtype='half' is not allowed; choose one of auto, float32, bfloat16, float16",
                 "method='adapter' needs adapter_dir", "n_calib=0 must be >= 1", "bracket=(5.0, 1.0) must be (lo, hi)",
                 "tol=0.0 must be a finite number > 0", "target=-1.0 must be a finite number > 0",
                 "max_iters=0 must be >= 1"):  # fmt: skip
        assert part in message, f"{part!r} is not in {message!r}"


def test_the_stat_choices_are_STATS() -> None:
    assert get_args(get_type_hints(CalibrateArgs)["stat"]) == STATS  # --stat {mean,p50,...}, from one definition


def test_run_calibration_takes_the_fields_of_CalibrateArgs_as_keywords() -> None:
    params = inspect.signature(run_calibration).parameters
    fields = dataclasses.fields(CalibrateArgs)
    assert list(params) == [f.name for f in fields]
    assert params["signs"].default == [1, -1] and params["bracket"].default == (0.5, 64.0)
    assert set(CALIBRATION_KEYS) == {f.name for f in dataclasses.fields(CalibrationSettings)} < set(params)
    with pytest.raises(ValueError, match="n_audit=0 must be >= 1"):
        run_calibration(model="tiny-llama", n_audit=0)  # checked before any model is loaded


@pytest.mark.parametrize("where", ["calibrate", "survival", "compare", "callback"])
def test_repeated_signs_are_refused_everywhere_with_the_same_message(where: str, tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """``[1, 1]`` used to pass ``heal calibrate`` (and calibrate + once); now one rule for all."""
    args = ["--model", "tiny-llama", "--signs", "[1, 1]", "--out_dir", str(tmp_path)]
    if where == "callback":
        with pytest.raises(ValueError, match=re.escape(TWICE)):
            IsoKLCalibrationCallback(signs=[1, 1])
    else:
        assert TWICE in heal_error([where, "--config", str(CONFIGS / f"{where}.yaml"), *args], capsys)
    assert not list(tmp_path.iterdir()), "refused before any work"


def test_signs_may_be_either_or_both_once() -> None:
    for signs in ([1], [-1], [1, -1], [-1, 1]):
        assert CalibrateArgs(signs=signs).signs == signs
        IsoKLCalibrationCallback(signs=signs)
    for signs in ([], [0], [2], [True], [1.0]):
        with pytest.raises(ValueError, match=re.escape(f"signs={signs!r} must hold +1 and/or -1, each once")):
            CalibrateArgs(signs=signs)  # type: ignore[arg-type]


def test_the_adapter_method_needs_no_vector_questions() -> None:
    assert CalibrateArgs(method="adapter", adapter_dir="x", n_fit=0).n_fit == 0
    with pytest.raises(ValueError, match=r"n_fit=0 must be >= 1"):
        CalibrateArgs(n_fit=0)
    with pytest.raises(ValueError, match=r"adapter_dir is only read with method='adapter', got method='pca'"):
        CalibrateArgs(method="pca", adapter_dir="x")


@pytest.mark.parametrize("audit", [True, False], ids=["audit", "no_audit"])
def test_result_round_trips_through_json_with_the_same_keys(audit: bool) -> None:
    r = result(-1, audit)
    data = json.loads(json.dumps(r.to_dict()))
    assert list(data) == RESULT_KEYS
    assert IsoKLResult.from_dict(data) == r
    assert r["c_star"] == r.c_star == 3.0 and r.name == "-" and r["history"] is r.history
    with pytest.raises(KeyError):
        _ = r["c"]
    assert r.summary() == {"c_star": 3.0, "stat_star": r.stat_star, "converged": False, "evaluations": 2,
                           "audit_ratio": 1.0 if audit else None}  # fmt: skip
    assert set(r.scalars()) == set(IsoKLResult.SCALARS) - (set() if audit else {"audit_ratio"})
    with pytest.raises(ValueError, match=r"an iso-KL result lacks coeff, stat_star"):
        IsoKLResult.from_dict({k: v for k, v in data.items() if k not in ("coeff", "stat_star")})


def test_calibrate_files_keep_their_keys(tmp_path: Path) -> None:
    results = {"+": result(1), "-": result(-1, audit=False)}
    config = dataclasses.asdict(CalibrateArgs(out_dir=str(tmp_path)))
    _write_outputs(tmp_path, config, results, "p95")
    saved = json.loads((tmp_path / "calib.json").read_text())
    assert set(saved["config"]) == {f.name for f in dataclasses.fields(CalibrateArgs)}
    assert {s: list(r) for s, r in saved["results"].items()} == {"+": RESULT_KEYS, "-": RESULT_KEYS}
    assert {s: IsoKLResult.from_dict(r) for s, r in saved["results"].items()} == results
    with open(tmp_path / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["sign"] for r in rows] == ["+", "-"] and float(rows[1]["coeff"]) == -3.0
    assert rows[1]["audit_ratio"] == "" and math.isclose(float(rows[0]["audit_ratio"]), 1.0)
    with open(tmp_path / "audit.csv") as f:
        assert [r["sign"] for r in csv.DictReader(f)] == ["+"]


def test_callback_state_holds_plain_results() -> None:
    cb = IsoKLCalibrationCallback(signs=(1, -1))
    cb.results = {"+": result(1), "-": result(-1, audit=False)}
    state = cb.state_dict()
    assert all(type(r) is dict and list(r) == RESULT_KEYS for r in state["results"].values())
    other = IsoKLCalibrationCallback(signs=(1, -1))
    other.load_state_dict(json.loads(json.dumps(state)))
    assert other.results == cb.results and other.metrics() == cb.metrics()
    assert "isokl/-/audit_ratio" not in cb.metrics() and cb.metrics()["isokl/+/converged"] == 0.0
