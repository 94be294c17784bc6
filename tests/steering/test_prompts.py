"""``heal calibrate --prompts FILE``: your own questions, in file order, are the ones the vector is fitted on, c*
searched on and audited on; a bad file is refused before any model is loaded."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

import heal_pl.steering.run
from heal_pl.configs import FOLDER
from heal_pl.steering.args import CalibrateArgs
from tests.helpers import heal_error

CONFIG = FOLDER / "calibrate.yaml"
MINE = ["What do goats eat?", "Name a blue fruit.", "Why do ships float?", "How far is the Moon?",
        "Who wrote Hamlet?", "What is a prime number?", "Where do owls sleep?"]  # fmt: skip
SMALL = ["--model", "tiny-llama", "--n_fit", "3", "--n_calib", "2", "--n_audit", "2", "--max_new_tokens", "4",
         "--max_iters", "2", "--signs", "[1]"]  # fmt: skip


def test_calibrate_reads_your_prompts(tmp_path: Path, monkeypatch, capsys: pytest.CaptureFixture[str]) -> None:
    from heal_pl.cli import main

    source = tmp_path / "mine.txt"
    source.write_text("\n".join(MINE) + "\n")
    seen: list[list[str]] = []
    calibrate_method = heal_pl.steering.run.calibrate_method

    def spy(model, tokenizer, steering, prompts, audit_prompts, **kwargs):  # type: ignore[no-untyped-def]
        seen.extend([prompts, audit_prompts])
        return calibrate_method(model, tokenizer, steering, prompts, audit_prompts, **kwargs)

    monkeypatch.setattr(heal_pl.steering.run, "calibrate_method", spy)
    main(["calibrate", "--config", str(CONFIG), *SMALL, "--prompts", str(source), "--out_dir", str(tmp_path / "o")])
    saved = json.loads((tmp_path / "o" / "calib.json").read_text())
    assert saved["config"]["prompts"] == str(source)
    assert saved["questions"] == {"fit": MINE[:3], "calib": MINE[3:5], "audit": MINE[5:7]}  # in file order
    calib, audit = seen
    assert [sum(q in p for p in calib) for q in MINE[3:5]] == [1, 1] and len(calib) == 2  # chat prompts of those
    assert [sum(q in p for p in audit) for q in MINE[5:7]] == [1, 1] and len(audit) == 2
    config = json.loads((tmp_path / "o" / "journal" / "config.json").read_text())["config"]
    assert len(config["prompts_digest"]) == 64  # an edited file under the same name is another config

    source.write_text("\n".join(reversed(MINE)) + "\n")
    assert "another config (prompts_digest: " in heal_error(
        ["calibrate", "--config", str(CONFIG), *SMALL, "--prompts", str(source), "--out_dir", str(tmp_path / "o")],
        capsys)  # fmt: skip


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("few.txt", "a?\nb?\n", r"n_fit \+ n_calib \+ n_audit = 7 exceeds the 2 prompts of prompts='.*few.txt'"),
        ("field.jsonl", '{"prompt": "a?"}\n{"question": "b?"}\n', r"field.jsonl, line 2: no 'prompt' field"),
        ("empty.csv", "", r"prompts='.*empty.csv' is empty"),
        ("prompts.docx", "a?\n", r"unknown file type '.docx'; accepted: .jsonl, .csv, .txt"),
        ("twice.txt", "a?\nb?\na?\n", r"twice.txt, line 3: the prompt 'a\?' is already at .*line 1"),
    ],
)
def test_a_bad_prompts_file_is_refused_before_the_model_loads(tmp_path: Path, name: str, text: str, message: str,
                                                              monkeypatch, capsys) -> None:  # fmt: skip
    def no_model(*args: object) -> None:
        raise AssertionError("the model was loaded before the bad input was reported")

    monkeypatch.setattr(heal_pl.steering.run, "load_on", no_model)
    (tmp_path / name).write_text(text)
    line = heal_error(["calibrate", "--config", str(CONFIG), *SMALL, "--prompts", str(tmp_path / name),
                       "--out_dir", str(tmp_path / "o")], capsys)  # fmt: skip
    assert re.search(message, line), line
    assert not (tmp_path / "o").exists()


def test_the_bundled_questions_stay_the_default() -> None:
    args = CalibrateArgs(n_fit=2, n_calib=1, n_audit=1)
    assert args.prompts is None and len(set(args.questions())) == 4
