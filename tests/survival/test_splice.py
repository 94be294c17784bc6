"""The probe from the model's own template (``splice: auto``, :func:`heal_pl.survival.probes.probe_splice`) and the
probe check that stops ``heal survival`` / ``heal compare`` before any α when the probe does not suit the model.

The expected turns are written out by hand for tiny Jinja templates in the formats of ChatML, Llama 3, Gemma and
Qwen3 (whose generation prompt holds an empty thinking block when ``enable_thinking`` is false).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

import heal_pl.survival.compare
import heal_pl.survival.run
import heal_pl.survival.sweep
from heal_pl.cli import main
from heal_pl.data.prompts import encode_text
from heal_pl.models.load import load_model, load_tokenizer, tiny_tokenizer
from heal_pl.steering.trajectory import Unsteered
from heal_pl.survival.config import MIN_SHARE_ALIVE, SweepConfig
from heal_pl.survival.probes import AUTO, answer_token_ids, probe_splice, splice_text
from heal_pl.survival.sweep import probe_check
from tests.data.test_formats import GEMMA, LLAMA3
from tests.helpers import heal_error
from tests.survival import test_compare
from tests.survival.test_run import CALIB, CONFIG, TINY

Q = "Is the statement true or false?"
CHATML = f"<|im_end|>\n<|im_start|>user\n{Q}<|im_end|>\n<|im_start|>assistant\n"
QWEN3 = (  # its thinking switch: an empty, closed block opens the answer when enable_thinking is false
    "{% for message in messages %}{{ '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% if enable_thinking is defined and enable_thinking is false %}{{ '<think>\n\n</think>\n\n' }}{% endif %}"
    "{% endif %}"
)
STRICT = "{{ raise_exception('this template takes one user message') }}"
MUTE = "{% for message in messages %}{% if message.role == 'user' %}{{ message.content }}{% endif %}{% endfor %}"


def with_template(template: str | None, thinking: bool = False):
    tok = tiny_tokenizer(chat_template=False)
    tok.chat_template = template
    if thinking:
        tok.add_tokens(["<think>", "</think>"], special_tokens=True)
    return tok


@pytest.mark.parametrize(("template", "expected"), [
    (None, f"\n\nUser: {Q}\n\nAssistant:"),  # no template: the plain turn of heal_pl.data.prompts.chat_prompt
    ("chatml", CHATML),
    (LLAMA3, f"<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n{Q}<|eot_id|>"
             "<|start_header_id|>assistant<|end_header_id|>\n\n"),
    (GEMMA, f"<end_of_turn>\n<start_of_turn>user\n{Q}<end_of_turn>\n<start_of_turn>model\n"),
    (QWEN3, f"{CHATML}<think>\n\n</think>\n\n"),
], ids=["no_template", "chatml", "llama3", "gemma", "qwen3_thinking"])  # fmt: skip
def test_auto_is_the_probe_turn_of_the_template(template: str | None, expected: str, caplog) -> None:
    tok = tiny_tokenizer() if template == "chatml" else with_template(template)
    with caplog.at_level(logging.INFO, logger="heal_pl"):
        assert probe_splice(tok) == probe_splice(tok, AUTO) == expected
    assert repr(expected) in caplog.text  # the resolved probe is logged (with or without a template)
    assert SweepConfig().splice == AUTO and SweepConfig().resolved(tok).splice == expected


def test_a_given_splice_is_kept_as_it_is() -> None:
    config = SweepConfig(splice="\nAnswer:")
    assert probe_splice(tiny_tokenizer(), "\nAnswer:") == "\nAnswer:"
    assert config.resolved(tiny_tokenizer()) is config


def test_the_chatml_turn_ends_the_assistant_turn_with_its_special_tokens() -> None:
    tok = tiny_tokenizer()
    ids = encode_text(tok, probe_splice(tok))
    assert ids[0] == tok.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    assert ids.count(tok.convert_tokens_to_ids("<|im_start|>")) == 2


def test_an_open_thinking_block_is_closed_before_the_auto_turn() -> None:
    tok = with_template(QWEN3, thinking=True)
    splice = probe_splice(tok)
    context = tok.apply_chat_template([{"role": "user", "content": "Is ice cold?"}], add_generation_prompt=True,
                                      tokenize=False) + "<think>\nIce is frozen water"  # fmt: skip
    assert splice_text(context, splice) == "</think>\n\n" + splice
    assert splice_text(context + "</think>\n\nTrue.", splice) == splice


@pytest.mark.parametrize(("template", "message"), [
    (STRICT, r"splice='auto': the chat template .* cannot render the probe turn .*this template takes one user"),
    (MUTE, r"splice='auto': the chat template .* does not write the assistant's words"),
])  # fmt: skip
def test_a_template_that_cannot_write_the_probe_turn_asks_for_the_splice(template: str, message: str) -> None:
    with pytest.raises(ValueError, match=message + r".*give the splice text instead"):
        probe_splice(with_template(template))


def test_probe_check_raises_when_strict_and_warns_otherwise(caplog) -> None:
    model, tok = load_model("tiny-llama"), load_tokenizer("tiny-llama")
    failing = SweepConfig(threshold=0.5).resolved(tok)  # the tiny random model puts ≈ 0.0086 on the answers
    ids = answer_token_ids(tok, failing.answer_sets())
    with pytest.raises(ValueError, match=r"probe check failed.*share_alive=0\.00 of the 16 .*threshold=0\.5 "
                                         r"\(mean pmass 0\.00\d+.*splice='<\|im_end\|>\\n<\|im_start\|>user"):
        probe_check(model, tok, Unsteered(), failing, ids, strict=True)
    with caplog.at_level(logging.WARNING, logger="heal_pl"):
        check = probe_check(model, tok, Unsteered(), failing, ids)  # the training callback's sweep goes on
    assert check["share_alive"] == 0 and "probe check failed" in caplog.text
    caplog.clear()
    passing = SweepConfig(threshold=0.0084).resolved(tok)
    with caplog.at_level(logging.WARNING, logger="heal_pl"):
        assert probe_check(model, tok, Unsteered(), passing, ids, strict=True)["share_alive"] >= MIN_SHARE_ALIVE
    assert not caplog.text


def _no(what: str):
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"{what} ran before the probe check stopped the run")

    return refuse


@pytest.mark.parametrize("command", ["survival", "compare"])
def test_the_probe_check_stops_the_run_before_any_calibration_or_alpha(command: str, tmp_path: Path, monkeypatch,
                                                                       capsys) -> None:  # fmt: skip
    monkeypatch.setattr(heal_pl.survival.run, "calibrate_on", _no("the calibration"))
    monkeypatch.setattr(heal_pl.survival.sweep, "measure_alpha", _no("an α"))
    monkeypatch.setattr(heal_pl.survival.compare, "measure_alpha", _no("the prompt baseline"))
    args = (["survival", "--config", str(CONFIG), *TINY] if command == "survival" else
            ["compare", "--config", str(test_compare.CONFIG), *test_compare.TINY])  # fmt: skip
    error = heal_error([*args, "--threshold", "0.5", "--out_dir", str(tmp_path)], capsys)
    assert "the probe check failed" in error and "share_alive=0.00 of the 16 probe check prompts" in error
    assert "threshold=0.5 " in error and "mean pmass 0.00" in error
    assert f"splice={test_compare.SPLICE!r}" in error  # the same splice in both commands' tests
    assert "splice: auto builds it from the chat template" in error and "threshold below the mean pmass" in error
    assert not list(tmp_path.rglob("*.json")), "nothing journaled: a rerun with a lower threshold may use this out_dir"


@pytest.mark.slow  # a whole heal survival (~4 s) and a stopped one
def test_auto_runs_end_to_end_and_summary_json_records_its_text(tmp_path: Path, monkeypatch, capsys) -> None:
    out = tmp_path / "run"
    # ChatML on the tiny random model: pmass ≈ 0.0083 … 0.0088 at fork 0
    main(["survival", "--config", str(CONFIG), *TINY, "--splice", "auto", "--threshold", "0.0084", "--alphas",
          "[0, 1]", "--signs", "[1]", "--out_dir", str(out), "--calibration", CALIB])  # fmt: skip
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["splice"] == CHATML and summary["probe_check"]["share_alive"] >= MIN_SHARE_ALIVE
    assert [r["label"] for r in summary["table"]] == ["0", "+1"]
    assert json.loads((out / "journal" / "config.json").read_text())["config"]["splice"] == AUTO
    # the same calib.json with a threshold no prompt reaches: stopped once the steering is loaded, before any α
    monkeypatch.setattr(heal_pl.survival.sweep, "measure_alpha", _no("an α"))
    again = tmp_path / "again"
    error = heal_error(["survival", "--config", str(CONFIG), *TINY, "--splice", "auto", "--signs", "[1]",
                        "--calib_json", str(out / "calibrate" / "calib.json"), "--out_dir", str(again)], capsys)
    assert "threshold=0.009 (mean pmass 0.00" in error and f"splice={CHATML!r}" in error
    assert not again.exists() or not list(again.rglob("*.json"))
