"""heal_pl.data.formats and heal_pl.data.turns: TRL / heal_pl row shapes, ``datasets`` sources, the chat template's
turn end."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from heal_pl.data.datamodule import HealDataModule, encode_example
from heal_pl.data.formats import Example, parse_row, read_examples
from heal_pl.data.turns import turn_end_ids
from heal_pl.models.load import tiny_tokenizer

SYSTEM, QUESTION, ANSWER = "Be brief.", "What do cows eat?", "Cows eat grass and hay."
USER = {"role": "user", "content": QUESTION}
ASSISTANT = {"role": "assistant", "content": ANSWER}
EXPECTED = Example([{"role": "system", "content": SYSTEM}, USER], ANSWER)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# --------------------------------------------------------------------------- one test per row shape

SHAPES = {
    "messages": {"messages": [{"role": "system", "content": SYSTEM}, USER, ASSISTANT]},
    "standard_prompt_completion": {"prompt": QUESTION, "completion": ANSWER, "system": SYSTEM},
    "conversational_prompt_completion": {"prompt": [{"role": "system", "content": SYSTEM}, USER],
                                         "completion": [ASSISTANT]},
    "string_prompt_message_completion": {"system": SYSTEM, "prompt": QUESTION, "completion": [ASSISTANT]},
    "message_prompt_string_completion": {"system": SYSTEM, "prompt": [USER], "completion": ANSWER},
}


@pytest.mark.parametrize("shape", SHAPES)
def test_every_shape_reads_from_jsonl_and_encodes_the_same(shape, tmp_path, tokenizer):
    extra = {"id": 7, "persona": "ignored", "images": None}  # unknown keys and null columns are ignored
    (example,) = read_examples(write_jsonl(tmp_path / f"{shape}.jsonl", [{**SHAPES[shape], **extra}]))
    assert example == EXPECTED
    assert encode_example(tokenizer, example, 256) == encode_example(tokenizer, EXPECTED, 256)


def test_conversational_prompt_keeps_earlier_turns():
    earlier = [USER, {"role": "assistant", "content": "Grass."}, {"role": "user", "content": "And?"}]
    assert parse_row({"prompt": earlier, "completion": [ASSISTANT]}) == Example(earlier, ANSWER)


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        ({"text": "Once upon a time"}, "found keys ['text']"),
        ({"chosen": [ASSISTANT], "rejected": [ASSISTANT], "prompt": [USER]}, "found keys ['chosen', 'prompt', "),
        ({"prompt": [USER], "completion": [ASSISTANT, ASSISTANT]}, "one assistant message, got roles"),
        ({"prompt": [USER], "completion": [USER]}, "got roles ['user']"),
        ({"prompt": [], "completion": ANSWER}, "'prompt' must be a non-empty list"),
        ({"prompt": [{"role": "user", "content": " "}], "completion": ANSWER}, "empty prompt"),
        ({"prompt": [{"role": "system", "content": "x"}, USER], "completion": ANSWER, "system": SYSTEM},
         "both a 'system' key and a system message"),
        ({"prompt": {"role": "user"}, "completion": ANSWER}, "'prompt' is a dict"),
        ({"prompt": QUESTION, "completion": {"content": ANSWER}}, "'completion' is a dict"),
    ],
)
def test_bad_rows_list_keys_and_accepted_shapes(row, expected):
    with pytest.raises(ValueError) as info:
        parse_row(row)
    assert expected in str(info.value)
    if "found keys" in expected:
        assert '"messages"' in str(info.value) and '"prompt": [messages]' in str(info.value)


# --------------------------------------------------------------------------- bytes that are not UTF-8

JSON_LINES = '{"prompt": "Hi?", "completion": "Hello."}\n{"prompt": "Ça va?", "completion": "Très bien."}\n'
LATIN_1 = {  # suffix -> (the file's bytes, the line of the first bad byte): "Ç" is 0xc7 in Latin-1
    ".jsonl": (JSON_LINES.encode("latin-1"), 2),
    ".json": (JSON_LINES.encode("latin-1"), 2),  # JSON lines, read by `datasets`
    ".csv": ("prompt,completion\nHi?,Hello.\nÇa va?,Très bien.\n".encode("latin-1"), 3),
}


@pytest.mark.parametrize("suffix", LATIN_1)
def test_bytes_that_are_not_utf8_name_the_file_and_line(suffix, tmp_path):
    data, line = LATIN_1[suffix]
    path = tmp_path / f"rows{suffix}"
    path.write_bytes(data)
    column = data.split(b"\n")[line - 1].index(b"\xc7") + 1
    with pytest.raises(ValueError, match=rf"rows{re.escape(suffix)}, line {line}: not valid UTF-8 \(byte 0xc7 at "
                                         rf"column {column}\); save the file as UTF-8"):  # fmt: skip
        read_examples(path)
    path.write_bytes(data.decode("latin-1").encode("utf-8"))
    assert [e.completion for e in read_examples(path)] == ["Hello.", "Très bien."]


def test_read_examples_locates_each_row(tmp_path):
    examples = read_examples(write_jsonl(tmp_path / "d.jsonl", [SHAPES["messages"], SHAPES["messages"]]))
    assert [e.where for e in examples] == [f"{tmp_path / 'd.jsonl'}, line {i}" for i in (1, 2)]
    assert examples[0] == EXPECTED, "where is not compared"


# --------------------------------------------------------------------------- sources through `datasets`

ROWS = [SHAPES["standard_prompt_completion"], {"prompt": "Hi?", "completion": "Hello.", "system": None}]


def test_parquet_json_and_saved_folders_read_like_jsonl(tmp_path):
    import datasets

    ds = datasets.Dataset.from_list(ROWS)
    ds.to_parquet(str(tmp_path / "d.parquet"))
    (tmp_path / "d.json").write_text(json.dumps(ROWS))  # a JSON array, not JSON lines
    ds.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": ds, "test": ds.select([1])}).save_to_disk(str(tmp_path / "splits"))
    reference = read_examples(write_jsonl(tmp_path / "d.jsonl", ROWS))
    assert reference[1] == Example([{"role": "user", "content": "Hi?"}], "Hello.")
    for source in ("d.parquet", "d.json", "saved", "splits", "splits:train"):
        assert read_examples(str(tmp_path / source)) == reference, source
    assert read_examples(f"{tmp_path / 'splits'}:test") == reference[1:]
    with pytest.raises(ValueError, match=r"no split 'dev'; its splits are \['test', 'train'\]"):
        read_examples(f"{tmp_path / 'splits'}:dev")


def test_conversational_rows_in_parquet(tmp_path):
    import datasets

    row = SHAPES["conversational_prompt_completion"]
    datasets.Dataset.from_list([row, row]).to_parquet(str(tmp_path / "c.parquet"))
    datasets.Dataset.from_list([SHAPES["messages"]]).to_parquet(str(tmp_path / "m.parquet"))
    assert read_examples(tmp_path / "c.parquet") == [EXPECTED, EXPECTED] == read_examples(tmp_path / "m.parquet") * 2


def test_bad_row_in_a_dataset_names_the_row(tmp_path):
    import datasets

    datasets.Dataset.from_list([{"prompt": "q", "answer": "a"}]).to_parquet(str(tmp_path / "bad.parquet"))
    with pytest.raises(ValueError, match=r"bad.parquet, row 0: unknown row shape: found keys \['answer', 'prompt'\]"):
        read_examples(tmp_path / "bad.parquet")


def test_data_module_reads_dataset_sources(tmp_path, tokenizer):
    import datasets

    rows = [{"prompt": f"Question {i}?", "completion": [{"role": "assistant", "content": f"Answer {i}."}]}
            for i in range(6)]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:4]),
                          "test": datasets.Dataset.from_list(rows[4:])}).save_to_disk(str(tmp_path / "saved"))
    dm = HealDataModule(train_file=str(tmp_path / "saved"), val_file=f"{tmp_path / 'saved'}:test", batch_size=2)
    dm.set_tokenizer(tokenizer).setup("fit")
    plain = [{"prompt": r["prompt"], "completion": r["completion"][0]["content"]} for r in rows]
    reference = HealDataModule(train_file=str(write_jsonl(tmp_path / "t.jsonl", plain[:4])),
                               val_file=str(write_jsonl(tmp_path / "v.jsonl", plain[4:])), batch_size=2)
    reference.set_tokenizer(tokenizer).setup("fit")
    assert dm.train_set == reference.train_set and dm.val_set == reference.val_set and len(dm.val_set) == 2


def test_missing_sources_name_the_field(tmp_path):
    with pytest.raises(ValueError, match=r"train_file='.*nope.parquet' is not an existing file or folder"):
        HealDataModule(train_file=str(tmp_path / "nope.parquet"))
    with pytest.raises(ValueError, match=r"val_file='data/missing.jsonl:test' is not an existing"):
        HealDataModule(val_file="data/missing.jsonl:test")


def test_offline_hub_name_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    HealDataModule(train_file="someone/no-such-dataset")  # a Hub-style name passes the argument check
    with pytest.raises(ValueError, match="could not load 'someone/no-such-dataset': not a local file or folder"):
        read_examples("someone/no-such-dataset")


# --------------------------------------------------------------------------- the turn end of each chat format

LLAMA3 = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
GEMMA = (
    "{{ bos_token }}{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
NO_SPECIAL_CLOSE = (  # a template that ends turns with blank lines only: the eos is the stop
    "{% for message in messages %}{{ message['role'] + ': ' + message['content'] + '\n\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
)


def family_tokenizer(family: str):
    """The tiny tokenizer dressed as a ChatML, Llama-3 or Gemma tokenizer: their specials, eos and template."""
    tok = tiny_tokenizer()
    if family == "llama3":  # an early Llama-3 tokenizer: eos <|end_of_text|>, turns closed by <|eot_id|>
        headers = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
        tok.add_special_tokens({"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>",
                                "additional_special_tokens": headers})
        tok.chat_template = LLAMA3
    elif family == "gemma":
        tok.add_special_tokens({"bos_token": "<bos>", "eos_token": "<eos>",
                                "additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
        tok.chat_template = GEMMA
    elif family == "no_special_close":
        tok.chat_template = NO_SPECIAL_CLOSE
    return tok


@pytest.mark.parametrize(("family", "close"), [("chatml", "<|im_end|>"), ("llama3", "<|eot_id|>"),
                                               ("gemma", "<end_of_turn>"), ("no_special_close", "<|im_end|>")])
def test_completion_ends_with_the_templates_turn_end(family, close):
    tok = family_tokenizer(family)
    assert tok.convert_ids_to_tokens(turn_end_ids(tok)) == [close]
    if family in ("llama3", "gemma"):
        assert tok.eos_token != close  # the case the rule exists for
    messages = [{"role": "system", "content": SYSTEM}, USER]
    enc = encode_example(tok, Example(messages, ANSWER), 256)
    # the template's own rendering of the whole conversation, tokenized in one go, through the turn end
    full_text = tok.apply_chat_template([*messages, ASSISTANT], tokenize=False)
    close_text = close if family != "no_special_close" else ""
    full = tok(full_text[: full_text.rindex(ANSWER) + len(ANSWER)] + close_text, add_special_tokens=False)["input_ids"]
    if family == "no_special_close":
        full = [*full, tok.eos_token_id]
    assert enc["input_ids"] == full
    prompt = tok(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False),
                 add_special_tokens=False)["input_ids"]
    assert enc["labels"] == [-100] * len(prompt) + full[len(prompt):]
    assert tok.decode([t for t in enc["labels"] if t != -100]).endswith(ANSWER + tok.convert_ids_to_tokens(full[-1]))


def test_empty_completion_is_the_turn_end_only():
    tok = family_tokenizer("gemma")
    enc = encode_example(tok, Example([USER], ""), 256)
    assert [t for t in enc["labels"] if t != -100] == tok.convert_tokens_to_ids(["<end_of_turn>"])


def test_turn_end_follows_a_changed_template():
    tok = family_tokenizer("gemma")
    assert tok.convert_ids_to_tokens(turn_end_ids(tok)) == ["<end_of_turn>"]
    tok.chat_template = None  # no template: the eos
    assert turn_end_ids(tok) == [tok.eos_token_id] == tok.convert_tokens_to_ids(["<eos>"])
