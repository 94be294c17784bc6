"""``heal survival`` / ``heal compare`` with your own true/false statements (``prompts``, ``check_prompts``) and your
own calibration questions (``calibration: {prompts: ...}``): those are the ones measured, the sets are disjoint, and a
bad file is refused before any model is loaded."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

import heal_pl.survival.run
from heal_pl.cli import main
from heal_pl.configs import FOLDER
from heal_pl.survival.args import CompareArgs, SurvivalArgs
from heal_pl.survival.config import load_questions
from tests.helpers import heal_error

STATEMENTS = [("Snow is cold.", True), ("Fish can fly to the Moon.", False), ("Cats are animals.", True),
              ("Ice is hot.", False), ("Bread is food.", True), ("Stones are alive.", False)]  # fmt: skip
OPEN = ["Tell me about rivers.", "What is a cloud?", "Describe a horse.", "Why is grass green?"]
CALIB = "{prompts: %s, n_fit: 2, n_calib: 1, n_audit: 1, max_new_tokens: 4, max_iters: 2}"
TINY = ["--model", "tiny-llama", "--w", "4", "--fork_step", "2", "--alphas", "[0, 1]", "--signs", "[1]",
        "--threshold", "0.009", "--splice", "\nSo the answer (true or false) is:", "--batch_size", "3",
        "--n_eval", "null"]  # fmt: skip


def statements(path: Path, rows: list[tuple[str, bool]]) -> str:
    path.write_text("".join(json.dumps({"prompt": p, "answer": a}) + "\n" for p, a in rows))
    return str(path)


def open_prompts(path: Path) -> str:
    path.write_text("\n".join(OPEN) + "\n")
    return str(path)


@pytest.mark.slow  # a whole heal survival (~3 s)
def test_survival_measures_your_statements(tmp_path: Path) -> None:
    mine = statements(tmp_path / "mine.jsonl", STATEMENTS)
    out = tmp_path / "run"
    main(["survival", "--config", str(FOLDER / "survival.yaml"), *TINY, "--prompts", mine, "--out_dir", str(out),
          "--calibration", CALIB % open_prompts(tmp_path / "open.txt")])  # fmt: skip
    summary = json.loads((out / "summary.json").read_text())
    evals = [STATEMENTS[i] for i in (1, 2, 3, 5)]  # one file: rows 1 and 5 are the probe check's
    assert summary["probe_check"]["n"] == 2 and summary["config"]["prompts"] == mine
    trajectories = json.loads((out / "trajectories.json").read_text())["trajectories"]
    assert [(t["question"], t["answer"]) for t in trajectories if t["label"] == "0"] == evals
    assert [r["n"] for r in summary["table"]] == [4, 4]
    calib = json.loads((out / "calibrate" / "calib.json").read_text())["questions"]
    assert calib == {"fit": OPEN[:2], "calib": OPEN[2:3], "audit": OPEN[3:4]}


@pytest.mark.slow  # a whole heal compare (~4 s)
def test_compare_measures_your_statements_in_every_row(tmp_path: Path) -> None:
    mine = statements(tmp_path / "eval.jsonl", STATEMENTS[:3])
    check = statements(tmp_path / "check.jsonl", STATEMENTS[3:])
    out = tmp_path / "run"
    main(["compare", "--config", str(FOLDER / "compare.yaml"), *TINY, "--methods", "[pca]", "--prompts", mine,
          "--check_prompts", check, "--calibration", CALIB % open_prompts(tmp_path / "open.txt"),
          "--out_dir", str(out)])  # fmt: skip
    table = json.loads((out / "compare.json").read_text())["table"]
    assert [(r["method"], r["n"]) for r in table] == [("pca", 3), ("pca", 3), ("prompt", 3)]
    asked = [t["question"] for t in json.loads((out / "prompt" / "prompt.json").read_text())["trajectories"]]
    assert asked == [p for p, _ in STATEMENTS[:3]]
    summary = json.loads((out / "pca" / "summary.json").read_text())
    assert summary["probe_check"]["n"] == 3 and summary["config"]["check_prompts"] == check


def test_the_bundled_sets_stay_the_default() -> None:
    check, evals = SurvivalArgs().question_sets()
    assert check == load_questions("calib") and evals == load_questions("eval")


def test_n_eval_is_capped_by_your_evaluation_prompts(tmp_path: Path) -> None:
    rows = [(f"Statement {i}.", i % 2 == 0) for i in range(40)]
    mine = statements(tmp_path / "many.jsonl", rows)
    assert SurvivalArgs(prompts=mine, n_eval=30).n_eval == 30  # more than the 32 bundled ones would allow
    with pytest.raises(ValueError, match=r"n_eval=31 must be None or an integer in \[1, 30\] \(evaluation prompts "
                                         r"of prompts='.*many.jsonl'\)"):  # fmt: skip
        SurvivalArgs(prompts=mine, n_eval=31)
    assert len(SurvivalArgs(prompts=mine, check_prompts="yesno_example.jsonl", n_eval=40).question_sets()[1]) == 40


def test_calibration_and_evaluation_must_not_share_a_prompt(tmp_path: Path) -> None:
    mine = statements(tmp_path / "mine.jsonl", STATEMENTS)
    shared = (r"the probe check prompts and the evaluation prompts share 1 prompt\(s\), e.g. 'Ice is hot.' "
              r"\(check_prompts: .*check.jsonl, line 1; prompts: .*mine.jsonl, line 4\)")
    with pytest.raises(ValueError, match=shared):
        SurvivalArgs(prompts=mine, check_prompts=statements(tmp_path / "check.jsonl", STATEMENTS[3:4]))
    same = tmp_path / "open.txt"
    same.write_text("\n".join(p for p, _ in STATEMENTS) + "\n")
    calibration = {"prompts": str(same), "n_fit": 2, "n_calib": 1, "n_audit": 1}
    with pytest.raises(ValueError, match=r"the calibration prompts and the evaluation prompts share 3 prompt"):
        CompareArgs(prompts=mine, calibration=calibration)
    with pytest.raises(ValueError, match=r"the calibration prompts and the evaluation prompts share 4 prompt"):
        SurvivalArgs(calibration={**calibration, "prompts": "yesno_eval.jsonl"})  # vs the bundled evaluation set
    assert SurvivalArgs(prompts=mine, calibration=calibration, calib_json="calib.json").calib_json  # not calibrated


@pytest.mark.parametrize(
    ("flag", "name", "text", "message"),
    [
        ("--prompts", "no_answer.jsonl", '{"prompt": "a"}\n',
         r"error: prompts: .*no_answer.jsonl, line 1: no 'answer' field \(true or false\)"),
        ("--prompts", "answer.csv", "prompt,answer\na,true\nb,yes\n",
         r"answer.csv, line 3: answer='yes' is not allowed; choose one of true, false"),
        ("--prompts", "plain.txt", "Is snow cold?\n", r"plain.txt, line 1: no 'answer' field .*a .txt file holds"),
        ("--check_prompts", "empty.jsonl", "\n", r"check_prompts='.*empty.jsonl' is empty"),
        ("--prompts", "mine.tsv", "a\ttrue\n", r"prompts='.*mine.tsv': unknown file type '.tsv'; accepted: .jsonl"),
        ("--prompts", "one.jsonl", '{"prompt": "a", "answer": true}\n', r"one file of 1 prompt cannot be cut"),
    ],
)
def test_a_bad_file_is_refused_before_any_model_loads(flag: str, name: str, text: str, message: str, tmp_path: Path,
                                                      monkeypatch, capsys: pytest.CaptureFixture[str]) -> None:
    def no_model(*args: object) -> None:
        raise AssertionError("a model was loaded before the bad input was reported")

    monkeypatch.setattr(heal_pl.survival.run, "load_tokenizer", no_model)
    (tmp_path / name).write_text(text)
    for command in ("survival", "compare"):
        line = heal_error([command, "--config", str(FOLDER / f"{command}.yaml"), *TINY, flag, str(tmp_path / name),
                           "--out_dir", str(tmp_path / "o")], capsys)  # fmt: skip
        assert re.search(message, line), line
    assert not (tmp_path / "o").exists()
