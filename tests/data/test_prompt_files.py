"""heal_pl.data.prompt_files: your own prompts from JSONL, CSV, plain text or a ``datasets`` source; every bad file
named with its line, the sets cut from one file disjoint, two sets checked for a shared prompt."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from heal_pl.data.formats import ASSETS
from heal_pl.data.prompt_files import SUFFIXES, overlap_problem, read_prompts, split_check_eval
from heal_pl.data.prompts import questions

STATEMENTS = [("The Moon is made of cheese.", False), ("Water is wet.", True), ("Two is even.", True)]


def write(path: Path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


def jsonl(path: Path, rows: list[dict]) -> str:
    return write(path, "".join(json.dumps(r) + "\n" for r in rows))


def test_jsonl_rows_in_file_order_with_their_lines(tmp_path: Path) -> None:
    rows = [{"prompt": p, "answer": a, "id": i} for i, (p, a) in enumerate(STATEMENTS)]
    source = jsonl(tmp_path / "mine.jsonl", rows)
    got = read_prompts(source, answers=True)
    assert [(r["prompt"], r["answer"]) for r in got] == STATEMENTS
    assert [r["where"] for r in got] == [f"prompts: {source}, line {n}" for n in (1, 2, 3)]
    assert read_prompts(source) == [{"prompt": p, "where": f"prompts: {source}, line {n}"}  # answer not read
                                    for n, (p, _) in enumerate(STATEMENTS, 1)]  # fmt: skip


def test_csv_with_a_header_quoted_commas_and_word_answers(tmp_path: Path) -> None:
    source = write(tmp_path / "mine.csv", '\ufeffprompt,answer\n"Is water wet, or not?",TRUE\n\nTwo is odd., false \n')
    got = read_prompts(source, answers=True)
    assert [(r["prompt"], r["answer"], r["where"]) for r in got] == [
        ("Is water wet, or not?", True, f"prompts: {source}, line 2"),
        ("Two is odd.", False, f"prompts: {source}, line 4")]


def test_plain_text_is_one_prompt_per_line(tmp_path: Path) -> None:
    source = write(tmp_path / "mine.txt", "What do cows eat?\n\n  Why is the sky blue?  \r\n")
    assert [r["prompt"] for r in read_prompts(source)] == ["What do cows eat?", "  Why is the sky blue?  "]
    with pytest.raises(ValueError, match=r"mine.txt, line 1: no 'answer' field \(true or false\).*a \.txt file "
                                         r"holds prompts only"):  # fmt: skip
        read_prompts(source, answers=True)


def test_a_datasets_source(tmp_path: Path) -> None:
    import datasets

    datasets.Dataset.from_list([{"prompt": p, "answer": a} for p, a in STATEMENTS]).to_parquet(tmp_path / "d.parquet")
    got = read_prompts(str(tmp_path / "d.parquet"), answers=True)
    assert [(r["prompt"], r["answer"]) for r in got] == STATEMENTS
    assert got[1]["where"] == f"prompts: {tmp_path / 'd.parquet'}, row 1"


def test_a_bundled_file_by_name_reads_like_load_questions() -> None:
    got = read_prompts("yesno_example.jsonl", answers=True)
    assert len(got) == 8 and {r["answer"] for r in got} == {True, False}
    assert got[0]["where"] == f"prompts: {ASSETS / 'yesno_example.jsonl'}, line 1"


@pytest.mark.parametrize(
    ("name", "text", "answers", "message"),
    [
        ("no_prompt.jsonl", '{"prompt": "a", "answer": true}\n\n{"text": "b", "answer": false}\n', True,
         r"^prompts: .*no_prompt.jsonl, line 3: no 'prompt' field \(the text to ask\); found \['answer', 'text'\]"),
        ("no_answer.jsonl", '{"prompt": "a", "answer": true}\n{"prompt": "b"}\n', True,
         r"no_answer.jsonl, line 2: no 'answer' field \(true or false\); found \['prompt'\]"),
        ("null_answer.jsonl", '{"prompt": "a", "answer": null}\n', True, r"line 1: no 'answer' field"),
        ("bad_answer.jsonl", '{"prompt": "a", "answer": "yes"}\n', True,
         r"bad_answer.jsonl, line 1: answer='yes' is not allowed; choose one of true, false"),
        ("int_answer.jsonl", '{"prompt": "a", "answer": 1}\n', True, r"answer=1 is not allowed; choose one of true"),
        ("bad_answer.csv", "prompt,answer\na,true\nb,maybe\n", True,
         r"bad_answer.csv, line 3: answer='maybe' is not allowed; choose one of true, false"),
        ("no_column.csv", "question,answer\na,true\n", True, r"no_column.csv, line 2: no 'prompt' field"),
        ("blank.jsonl", '{"prompt": "  "}\n', False, r"line 1: 'prompt' must be non-empty text, got '  '"),
        ("list.jsonl", '{"prompt": [{"role": "user", "content": "a"}]}\n', False, r"'prompt' must be non-empty text"),
        ("empty.jsonl", "\n\n", False, r"prompts='.*empty.jsonl' is empty: it holds no prompt"),
        ("empty.txt", "", False, r"is empty: it holds no prompt"),
        ("header_only.csv", "prompt,answer\n", True, r"is empty: it holds no prompt"),
        ("not_json.jsonl", '{"prompt": "a"}\n{"prompt": \n', False,
         r"^prompts: .*not_json.jsonl, line 2: not valid JSON"),
        ("twice.jsonl", '{"prompt": "a"}\n{"prompt": "b"}\n{"prompt": "a"}\n', False,
         r"twice.jsonl, line 3: the prompt 'a' is already at .*twice.jsonl, line 1; give each prompt once"),
        ("sheet.xlsx", "a\n", False, r"prompts='.*sheet.xlsx': unknown file type '.xlsx'; accepted: .jsonl, .csv, "
                                     r".txt, .parquet, .json, .arrow$"),
    ],
)
def test_bad_files_are_named_with_the_field_and_the_line(tmp_path: Path, name: str, text: str, answers: bool,
                                                         message: str) -> None:  # fmt: skip
    with pytest.raises(ValueError, match=message):
        read_prompts(write(tmp_path / name, text), answers=answers)


def test_a_missing_file_names_the_option_and_the_accepted_types(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"check_prompts='.*nope.csv' does not exist \(a .jsonl, .csv, .txt"):
        read_prompts(str(tmp_path / "nope.csv"), "check_prompts")
    assert len(SUFFIXES) == len(set(SUFFIXES))


def test_one_file_is_cut_every_fourth_row_for_the_check() -> None:
    rows = [{"prompt": str(i)} for i in range(10)]
    check, evals = split_check_eval(rows)
    assert [r["prompt"] for r in check] == ["0", "4", "8"]
    assert [r["prompt"] for r in evals] == ["1", "2", "3", "5", "6", "7", "9"]
    with pytest.raises(ValueError, match="one file of 1 prompt cannot be cut"):
        split_check_eval(rows[:1])


def test_overlap_names_one_shared_prompt_and_where_it_is() -> None:
    a = [{"prompt": "x", "where": "a.jsonl, line 1"}, {"prompt": "y", "where": "a.jsonl, line 2"}]
    b = [{"prompt": "z"}, {"prompt": "y", "where": "b.csv, line 5"}]
    assert overlap_problem("calibration prompts", a, "evaluation prompts", a[:1]) is not None
    assert overlap_problem("calibration prompts", a, "evaluation prompts", b[:1]) is None
    assert overlap_problem("calibration prompts", a, "evaluation prompts", b) == (
        "the calibration prompts and the evaluation prompts share 1 prompt(s), e.g. 'y' (a.jsonl, line 2; b.csv, "
        "line 5); they must be disjoint")


def test_questions_reads_your_prompts_in_file_order(tmp_path: Path) -> None:
    source = write(tmp_path / "q.txt", "one?\ntwo?\nthree?\n")
    assert questions(2, source) == ["one?", "two?"]
    with pytest.raises(ValueError, match=re.escape(f"n_fit + n_calib + n_audit = 4 exceeds the 3 prompts of "
                                                   f"prompts={source!r}")):  # fmt: skip
        questions(4, source)
    assert questions(3) == questions(3, None)  # the bundled ones stay the default
