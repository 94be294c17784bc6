"""``heal survival``: heal_pl/configs/survival.yaml runs on a tiny model, and its files agree with each other.

The Kaplan–Meier check recomputes the table from ``trajectories.csv`` with lifelines directly (not through
heal_pl.survival.table), so a wrong death time, censoring or written value in either file fails it.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
from lifelines import KaplanMeierFitter
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import heal_pl.survival.run
from heal_pl.cli import main
from heal_pl.configs import FOLDER
from heal_pl.survival.config import SweepConfig, load_questions
from tests.helpers import heal_error
from tests.survival.test_probes import word_level

CONFIG = FOLDER / "survival.yaml"
CALIB = "{n_fit: 3, n_calib: 2, n_audit: 2, max_new_tokens: 6, max_iters: 3}"
# the tiny random model puts ≈ 0.009 of its mass on the answers: this threshold gives deaths and survivors
TINY = ["--model", "tiny-llama", "--w", "9", "--fork_step", "2", "--n_eval", "5", "--alphas", "[0, 1, 4]",
        "--threshold", "0.009", "--splice", "\nSo the answer (true or false) is:", "--batch_size", "2",
        "--fork_batch", "3"]  # fmt: skip


THRESHOLDS = "[0.005, 0.009, 0.02]"


def km_reference(pmass: np.ndarray, gen_lens: np.ndarray, forks: np.ndarray, threshold: float) -> dict:
    """Death/censoring times by a plain loop, then lifelines: S at the fork nearest w/2 and at w, t at S ≤ 0.5."""
    durations, observed = [], []
    for row, g in zip(pmass, gen_lens, strict=True):
        reached = [j for j, t in enumerate(forks) if t <= g]
        dead = [j for j in reached if row[j] < threshold]
        durations.append(forks[dead[0]] if dead else forks[reached[-1]])
        observed.append(bool(dead))
    kmf = KaplanMeierFitter().fit(durations, event_observed=observed)
    s = kmf.survival_function_at_times(forks).to_numpy()
    w = forks[-1]
    j_mid = int(np.argmin(np.abs(forks - w / 2)))
    below = np.flatnonzero(s <= 0.5)
    return {"n": len(durations), "died": sum(observed),
            "censored": sum(1 for o, g in zip(observed, gen_lens, strict=True) if not o and g < w),
            "S_mid": s[j_mid], "S_end": s[-1], "t_half": str(forks[below[0]]) if below.size else "never"}  # fmt: skip


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.mark.slow  # a whole heal survival (~6 s)
def test_survival_config_runs_with_a_tiny_model(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "run"
    caplog.set_level("INFO", logger="heal_pl")
    main(["survival", "--config", str(CONFIG), *TINY, "--out_dir", str(out), "--calibration", CALIB,
          "--thresholds", THRESHOLDS])  # fmt: skip
    summary = json.loads((out / "summary.json").read_text())
    forks = np.asarray(summary["fork_points"])
    assert forks.tolist() == [0, 2, 4, 6, 8, 9]
    labels = ["0", "+1", "+4", "-1", "-4"]
    table = read_csv(out / "survival.csv")
    assert [r["label"] for r in table] == labels
    assert [m.split()[1] for m in caplog.messages if m.startswith("survival α=")] == [f"α={lab}" for lab in labels]
    assert sum(m.startswith("survival sweep: 5/5 α · ") for m in caplog.messages) == 1  # stderr is no terminal
    calib = json.loads((out / "calibrate" / "calib.json").read_text())["results"]
    assert summary["c_star"] == {s: calib[s]["c_star"] for s in "+-"}
    for r in table:
        sign, alpha = (1.0, 0.0) if r["label"] == "0" else (float(r["label"][0] + "1"), float(r["label"][1:]))
        assert float(r["coeff"]) == pytest.approx(sign * alpha * calib["+" if sign > 0 else "-"]["c_star"])

    def no_nan(token: str) -> None:
        raise AssertionError(f"trajectories.json is not standard JSON: {token}")

    trajectories = json.loads((out / "trajectories.json").read_text(), parse_constant=no_nan)["trajectories"]
    rows = read_csv(out / "trajectories.csv")
    kl_rows = read_csv(out / "kl.csv")
    assert len(trajectories) == len(labels) * 5 and len(rows) == len(trajectories) * len(forks)
    assert len(kl_rows) == sum(t["gen_len"] for t in trajectories)
    for t in trajectories:  # a fork past the end: NaN in the CSV, null in the JSON
        csv_nan = [x["pmass"] == "nan" for x in rows if x["label"] == t["label"] and
                   int(x["prompt_index"]) == t["prompt_index"]]  # fmt: skip
        assert [p is None for p in t["pmass"]] == csv_nan
    questions = [q["prompt"] for q in load_questions("eval")[:5]]
    died_somewhere = survived_somewhere = False
    for r in table:
        mine = [t for t in trajectories if t["label"] == r["label"]]
        assert [t["question"] for t in mine] == questions
        assert all(len(t["kl"]) == t["gen_len"] == len(t["tokens"]) for t in mine)
        # the table from the CSV's pmass by an independent computation
        csv_rows = [x for x in rows if x["label"] == r["label"]]
        pmass = np.array([[float(x["pmass"]) for x in csv_rows if int(x["prompt_index"]) == i] for i in range(5)])
        gen_lens = np.array([int(next(x["gen_len"] for x in csv_rows if int(x["prompt_index"]) == i))
                             for i in range(5)])  # fmt: skip
        ref = km_reference(pmass, gen_lens, forks, 0.009)
        assert int(r["n"]) == ref["n"] == 5 and int(r["died"]) == ref["died"]
        assert int(r["censored"]) == ref["censored"] and r["t_half"] == ref["t_half"]
        assert float(r["S_mid"]) == pytest.approx(ref["S_mid"]) and float(r["S_end"]) == pytest.approx(ref["S_end"])
        assert sum(t["died"] for t in mine) == int(r["died"])
        died_somewhere |= int(r["died"]) > 0
        survived_somewhere |= int(r["died"]) < 5
    assert died_somewhere and survived_somewhere  # the check above saw both outcomes
    md = (out / "survival.md").read_text().splitlines()
    assert len(md) == 2 + len(labels) and md[0].startswith("| label | sign | alpha")

    figures = {p.name: p.stat().st_size for p in (out / "figures").glob("*.png")}
    expected = {"spaghetti_0.png", "spaghetti_plus_1.png", "spaghetti_plus_4.png", "spaghetti_minus_1.png",
                "spaghetti_minus_4.png", "survival_plus.png", "survival_minus.png"}  # fmt: skip
    expected |= {f"{kind}_{sign}.png" for kind in ("attribution", "fan", "thresholds") for sign in ("plus", "minus")}
    assert set(figures) == expected and min(figures.values()) > 5000
    events = EventAccumulator(str(out), size_guidance={"images": 0})
    events.Reload()
    tags = events.Tags()
    assert set(tags["images"]) == {f"survival/spaghetti/{lab}" for lab in labels} | {
        f"survival/{kind}/{sign}" for kind in ("curves", "attribution", "fan", "thresholds") for sign in "+-"}
    s_end = events.Scalars("survival/+/S_end")
    assert [e.step for e in s_end] == [0, 100, 400]
    assert [e.value for e in s_end] == pytest.approx([float(r["S_end"]) for r in table[:3]])

    # the analyses of the stored trajectories: the run's threshold row is the run's table, heal thresholds agrees
    by_threshold = read_csv(out / "thresholds.csv")
    assert [(r["threshold"], r["label"]) for r in by_threshold] == [(t, lab) for t in ("0.005", "0.009", "0.02")
                                                                    for lab in labels]  # fmt: skip
    keys = ("n", "died", "censored", "S_mid", "S_end", "t_half")
    assert [{k: r[k] for k in keys} for r in by_threshold if r["threshold"] == "0.009"] == [
        {k: r[k] for k in keys} for r in table]
    main(["thresholds", "--trajectories", str(out / "trajectories.json"), "--thresholds", THRESHOLDS,
          "--out_dir", str(tmp_path / "th")])  # fmt: skip
    assert (tmp_path / "th" / "thresholds.csv").read_text() == (out / "thresholds.csv").read_text()
    attribution = read_csv(out / "attribution.csv")
    assert [(r["label"], r["died"]) for r in attribution] == [(r["label"], r["died"]) for r in table]
    assert len(read_csv(out / "attribution_deaths.csv")) == sum(int(r["died"]) for r in table)

    # a second run reuses the calib.json (no calibration), one sign only
    again = tmp_path / "again"
    main(["survival", "--config", str(CONFIG), *TINY, "--out_dir", str(again), "--signs", "[-1]",
          "--calib_json", str(out / "calibrate" / "calib.json")])  # fmt: skip
    assert not (again / "calibrate").exists()
    # heal_pl/configs/survival.yaml's own threshold grid, five thresholds × three labels
    assert [r["threshold"] for r in read_csv(again / "thresholds.csv")] == [t for t in ("0.5", "0.6", "0.75", "0.9",
                                                                                       "0.95") for _ in range(3)]
    table2 = read_csv(again / "survival.csv")
    assert [r["label"] for r in table2] == ["0", "-1", "-4"]
    assert [r["died"] for r in table2] == [r["died"] for r in table if r["label"] in ("0", "-1", "-4")]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--threshold", "1.5"], r"threshold=1.5 must be in the open interval \(0, 1\)"),
        (["--threshold", "0"], r"threshold=0.0 must be in the open interval \(0, 1\)"),
        (["--fork_step", "0"], "fork step=0 must be an integer > 0"),
        (["--fork_step", "-3"], "fork step=-3 must be an integer > 0"),
        (["--w", "600"], r"w=600 is longer than the model's context.*max_position_embeddings=512"),
        (["--n_eval", "99"], r"n_eval=99 must be None or an integer in \[1, 32\]"),
        (["--alphas", "[0, -1]"], "alphas=.* must be distinct finite numbers >= 0"),
        (["--calibration", "{n_fits: 3}"], r"calibration keys \['n_fits'\] are not heal calibrate arguments"),
        (["--signs", "[2]"], r"signs=\[2\] must hold \+1 and/or -1"),
        (["--calib_json", "/nonexistent/calib.json"], "calib_json='/nonexistent/calib.json' does not exist"),
        (["--thresholds", "[0.5, 1.5]"], r"thresholds=\[0.5, 1.5\] must be a non-empty list of distinct numbers"),
    ],
)
def test_bad_input_fails_before_any_calibration(args: list[str], message: str, tmp_path: Path, monkeypatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    def no_calibration(*args: object) -> None:
        raise AssertionError("calibration ran before the bad input was reported")

    monkeypatch.setattr(heal_pl.survival.run, "calibrate_on", no_calibration)
    assert re.search(message, heal_error(["survival", "--config", str(CONFIG), *TINY, "--out_dir", str(tmp_path),
                                          *args], capsys))  # fmt: skip


def test_answer_variants_missing_from_the_vocabulary_are_named(tmp_path: Path, monkeypatch,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(heal_pl.survival.run, "load_tokenizer", lambda name: word_level())
    assert re.search(r"not in the tokenizer's vocabulary.*true:'yes'", heal_error(
        ["survival", "--config", str(CONFIG), *TINY, "--out_dir", str(tmp_path),
         "--true_variants", "[\"true\", \"yes\"]"], capsys))  # fmt: skip


def test_sweep_config_forks_and_both_schedules() -> None:
    assert SweepConfig(w=10, fork_step=4).fork_points().tolist() == [0, 4, 8, 10]
    assert SweepConfig(w=100, fork_step=None, n_log_forks=4).fork_points().tolist() == [0, 1, 10, 100]
    with pytest.raises(ValueError, match="give exactly one of fork_step or n_log_forks"):
        SweepConfig(fork_step=None)


def test_thresholds_are_no_journal_argument(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The threshold grid is read from the stored pmass: a rerun with another grid continues from the journal."""
    out = tmp_path / "run"
    args = ["survival", "--config", str(CONFIG), *TINY, "--alphas", "[0, 1]", "--signs", "[1]", "--out_dir", str(out),
            "--calibration", CALIB]  # fmt: skip
    main([*args, "--thresholds", "null"])
    assert not (out / "thresholds.csv").exists()
    table = (out / "survival.csv").read_text()
    caplog.set_level("INFO", logger="heal_pl")
    main([*args, "--thresholds", "[0.009, 0.5]"])
    assert any("heal survival: continuing from" in m for m in caplog.messages)
    assert (out / "survival.csv").read_text() == table
    rows = read_csv(out / "thresholds.csv")
    assert [(r["threshold"], r["label"]) for r in rows] == [(t, lab) for t in ("0.009", "0.5") for lab in ("0", "+1")]
