"""heal_pl.data.datamodule: row parsing, exact completion masks, truncation, collate, splits and shuffling."""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import pytest
import torch

from heal_pl.data.datamodule import (
    DEFAULT_TRAIN_FILE,
    DEFAULT_VAL_FILE,
    EpochShuffleSampler,
    Example,
    HealDataModule,
    collate,
    encode_example,
    read_examples,
    truncation_lengths,
)

SYSTEM, QUESTION, ANSWER = "Be brief.", "What do cows eat?", "Cows eat grass and hay."


def write_jsonl(path: Path, rows: list[object]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def prompt_ids(tok, messages: list[dict[str, str]]) -> list[int]:
    return ids(tok, tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))


def qa(n: int) -> list[dict[str, str]]:
    return [{"prompt": f"Question number {i}?", "completion": f"Answer {i}."} for i in range(n)]


# --------------------------------------------------------------------------- reading


def test_both_shapes_give_identical_encodings(tmp_path, tokenizer):
    rows = [
        {"prompt": QUESTION, "completion": ANSWER, "system": SYSTEM, "persona": "ignored"},
        {"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION},
                      {"role": "assistant", "content": ANSWER}]},
    ]
    a, b = read_examples(write_jsonl(tmp_path / "d.jsonl", rows))
    assert a == b == Example([{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}], ANSWER)
    assert encode_example(tokenizer, a, 256) == encode_example(tokenizer, b, 256)


def test_multi_turn_messages_keep_earlier_turns_in_prompt(tmp_path):
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": QUESTION}, {"role": "assistant", "content": ANSWER}]
    (ex,) = read_examples(write_jsonl(tmp_path / "d.jsonl", ["", {"messages": msgs}, "  "]))
    assert ex.prompt_messages == msgs[:-1] and ex.completion == ANSWER


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        ({"question": "q", "answer": "a"}, "unknown row shape: found keys ['answer', 'question']"),
        ({"prompt": "q"}, "accepted shapes"),
        ({"prompt": "   ", "completion": "a"}, "empty prompt"),
        ({"prompt": "q", "completion": 3}, "'completion' is a int"),
        ({"prompt": "q", "completion": "a", "system": ["x"]}, "non-string content: 'system'"),
        ({"messages": [{"role": "user", "content": "q"}]}, "last message must have role 'assistant'"),
        ({"messages": [{"role": "assistant", "content": "a"}]}, "empty prompt"),
        ({"messages": [{"role": "user", "content": [{"type": "text"}]}, {"role": "assistant", "content": "a"}]},
         "non-string content: messages[0]"),
        ({"messages": []}, "non-empty list"),
        ({"messages": [], "prompt": "q", "completion": "a"}, "both 'messages' and 'prompt'"),
        ([1, 2], "expected a JSON object"),
        ("{not json", "not valid JSON"),
    ],
)
def test_bad_rows_name_file_and_line(tmp_path, row, expected):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "ok", "completion": "ok"}, row])
    with pytest.raises(ValueError) as info:
        read_examples(path)
    assert f"{path}, line 2" in str(info.value)
    assert expected in str(info.value)


# --------------------------------------------------------------------------- encoding


def test_prompt_is_masked_and_completion_is_separately_tokenized_plus_eos(tokenizer):
    messages = [{"role": "user", "content": QUESTION}]
    enc = encode_example(tokenizer, Example(messages, ANSWER), 256)
    p, c = prompt_ids(tokenizer, messages), ids(tokenizer, ANSWER) + [tokenizer.eos_token_id]
    assert enc == {"input_ids": p + c, "labels": [-100] * len(p) + c}
    assert tokenizer.decode(p).endswith("<|im_start|>assistant\n")


def test_boundary_decodes_to_completion_plus_eos(tokenizer):
    enc = encode_example(tokenizer, Example([{"role": "user", "content": QUESTION}], " " + ANSWER), 256)
    input_ids, labels = torch.tensor(enc["input_ids"]), torch.tensor(enc["labels"])
    assert tokenizer.decode(input_ids[labels != -100]) == " " + ANSWER + tokenizer.eos_token


def test_system_prompt_prepended_only_when_row_has_none(tokenizer):
    user = [{"role": "user", "content": QUESTION}]
    with_default = encode_example(tokenizer, Example(user, ANSWER), 256, system_prompt=SYSTEM)
    explicit = encode_example(tokenizer, Example([{"role": "system", "content": SYSTEM}, *user], ANSWER), 256)
    assert with_default == explicit
    own = [{"role": "system", "content": "Own."}, *user]
    assert encode_example(tokenizer, Example(own, ANSWER), 256, system_prompt=SYSTEM) == encode_example(
        tokenizer, Example(own, ANSWER), 256
    )


def test_empty_completion_keeps_only_eos(tokenizer):
    enc = encode_example(tokenizer, Example([{"role": "user", "content": QUESTION}], ""), 256)
    counted = [t for t in enc["labels"] if t != -100]
    assert counted == [tokenizer.eos_token_id] and enc["input_ids"][-1] == tokenizer.eos_token_id


def test_no_chat_template_uses_plain_format(caplog):
    from heal_pl.models.load import tiny_tokenizer

    tok = tiny_tokenizer(chat_template=False)
    tok.name_or_path = "plain-test-tokenizer"
    ex = Example([{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}], ANSWER)
    with caplog.at_level(logging.INFO, logger="heal_pl"):
        enc = encode_example(tok, ex, 256)
        encode_example(tok, ex, 256)
    p = ids(tok, f"System: {SYSTEM}\n\nUser: {QUESTION}\n\nAssistant:")
    c = ids(tok, " " + ANSWER) + [tok.eos_token_id]
    assert enc == {"input_ids": p + c, "labels": [-100] * len(p) + c}
    assert sum("no chat template" in r.getMessage() for r in caplog.records) == 1
    leading = encode_example(tok, Example(ex.prompt_messages, "\n" + ANSWER), 256)  # no extra space added
    assert leading["input_ids"][len(p):] == ids(tok, "\n" + ANSWER) + [tok.eos_token_id]


@pytest.mark.parametrize(
    ("n_prompt", "n_completion", "max_length", "expected"),
    [
        (10, 5, 15, (10, 5)),  # fits exactly
        (10, 20, 20, (10, 10)),  # completion cut at its end, prompt whole (10 >= 20 // 4)
        (15, 20, 20, (15, 5)),  # exactly L // 4 completion tokens left: nothing of the prompt is cut
        (16, 20, 20, (15, 5)),  # one short of L // 4: prompt cut from its left
        (30, 3, 20, (17, 3)),  # short completion survives whole
        (100, 100, 64, (48, 16)),
    ],
)
def test_truncation_lengths(n_prompt, n_completion, max_length, expected):
    assert truncation_lengths(n_prompt, n_completion, max_length) == expected


def test_truncation_cuts_completion_end(tokenizer):
    messages = [{"role": "user", "content": "Hi"}]
    completion = " ".join(["the cat likes fresh bread"] * 8)
    p, c = prompt_ids(tokenizer, messages), ids(tokenizer, completion) + [tokenizer.eos_token_id]
    max_length = len(p) + 12
    assert len(c) > 12 and max_length // 4 <= 12
    counts: Counter[str] = Counter()
    enc = encode_example(tokenizer, Example(messages, completion), max_length, counts=counts)
    assert enc == {"input_ids": p + c[:12], "labels": [-100] * len(p) + c[:12]}
    assert tokenizer.eos_token_id not in enc["labels"]
    assert counts == Counter(prompt_cut=0, completion_cut=1)


def test_truncation_cuts_prompt_from_left(tokenizer):
    messages = [{"role": "user", "content": " ".join(["my friend reads the morning paper"] * 10)}]
    completion = " ".join(["we cook warm soup"] * 10)
    p, c = prompt_ids(tokenizer, messages), ids(tokenizer, completion) + [tokenizer.eos_token_id]
    max_length = 40
    assert len(p) > max_length and len(c) > max_length // 4
    counts: Counter[str] = Counter()
    enc = encode_example(tokenizer, Example(messages, completion), max_length, counts=counts)
    assert enc == {"input_ids": p[-30:] + c[:10], "labels": [-100] * 30 + c[:10]}
    assert counts == Counter(prompt_cut=1, completion_cut=1)
    short = encode_example(tokenizer, Example(messages, "Yes."), max_length)  # whole completion + eos kept
    c_short = ids(tokenizer, "Yes.") + [tokenizer.eos_token_id]
    assert short["input_ids"] == p[-(max_length - len(c_short)):] + c_short
    for e in (enc, short):
        assert len(e["input_ids"]) == len(e["labels"]) == max_length
        assert all(lab in (-100, tok) for lab, tok in zip(e["labels"], e["input_ids"], strict=True))


# --------------------------------------------------------------------------- batching


def test_collate_right_pads():
    batch = collate([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}], pad_id=0)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert all(v.dtype == torch.long for v in batch.values())
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]


def test_sampler_reshuffles_per_epoch_deterministically():
    a, b = EpochShuffleSampler(50, seed=3), EpochShuffleSampler(50, seed=3)
    a.set_epoch(2)
    b.set_epoch(2)
    assert list(a) == list(b) == torch.randperm(50, generator=torch.Generator().manual_seed(5)).tolist()
    assert sorted(a) == list(range(50)) and len(a) == 50
    epoch2 = list(a)
    a.set_epoch(3)
    assert list(a) != epoch2
    assert list(EpochShuffleSampler(50, seed=4)) != list(EpochShuffleSampler(50, seed=3))


# --------------------------------------------------------------------------- data module


def make_dm(tokenizer, **kwargs) -> HealDataModule:
    dm = HealDataModule(model="tiny-llama", **kwargs).set_tokenizer(tokenizer)
    dm.setup("fit")
    return dm


def test_val_split_sizes_and_determinism(tmp_path, tokenizer):
    train = str(write_jsonl(tmp_path / "t.jsonl", qa(20)))
    dm = make_dm(tokenizer, train_file=train, val_fraction=0.1, seed=1)
    assert (len(dm.train_set), len(dm.val_set)) == (18, 2)
    tr, va = dm.split()
    assert sorted(e.completion for e in tr + va) == sorted(r["completion"] for r in qa(20))
    assert make_dm(tokenizer, train_file=train, val_fraction=0.1, seed=1).split() == (tr, va)
    assert make_dm(tokenizer, train_file=train, val_fraction=0.1, seed=2).split()[1] != va
    assert len(make_dm(tokenizer, train_file=train, val_fraction=0.01).val_set) == 1
    assert len(make_dm(tokenizer, train_file=train, val_fraction=0.5, max_examples=6).val_set) == 3
    no_val = make_dm(tokenizer, train_file=train, val_fraction=0.0)
    assert len(no_val.train_set) == 20 and no_val.val_dataloader() == []
    val = str(write_jsonl(tmp_path / "v.jsonl", qa(3)))
    assert len(make_dm(tokenizer, train_file=train, val_file=val).train_set) == 20


def test_dataloaders_batches_and_epoch_order(tmp_path, tokenizer):
    dm = make_dm(tokenizer, train_file=str(write_jsonl(tmp_path / "t.jsonl", qa(10))), val_fraction=0.2,
                 batch_size=4, seed=7)
    loader = dm.train_dataloader()
    batch = next(iter(loader))
    assert batch["input_ids"].shape[0] == 4 and batch["labels"].shape == batch["attention_mask"].shape
    assert ((batch["labels"] != -100) <= (batch["attention_mask"] == 1)).all()
    order = [dm.train_set[i]["input_ids"] for i in torch.randperm(8, generator=torch.Generator().manual_seed(8))]
    loader.sampler.set_epoch(1)
    rows = [r[m.bool()].tolist() for b in loader for r, m in zip(b["input_ids"], b["attention_mask"], strict=True)]
    assert rows == order
    assert len(list(dm.val_dataloader())) == 1


def test_setup_warns_with_cut_counts(tmp_path, tokenizer, caplog):
    rows = [{"prompt": "Hi", "completion": " ".join(["we cook warm soup"] * 20)}, *qa(3)]
    with caplog.at_level(logging.WARNING, logger="heal_pl"):
        dm = make_dm(tokenizer, train_file=str(write_jsonl(tmp_path / "t.jsonl", rows)), val_fraction=0.0,
                     max_length=32)
    assert all(len(r["input_ids"]) <= 32 for r in dm.train_set)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["max_length=32 cut 0 prompts (from the left) and 1 completions (at the end) of 4 rows"]


EMPTY = [*qa(2), {"prompt": "Anything?", "completion": " \n"}, {"messages": [
    {"role": "user", "content": "More?"}, {"role": "assistant", "content": ""}]}]  # fmt: skip


def test_empty_completions_are_refused_with_their_count_and_first_line(tmp_path, tokenizer):
    train = str(write_jsonl(tmp_path / "t.jsonl", EMPTY))
    with pytest.raises(ValueError, match=r"^2 of 4 rows have an empty completion \(the first: .*t.jsonl, line 3\); "
                                         r".*allow_empty_completions=True \(--data.allow_empty_completions true\)"):
        make_dm(tokenizer, train_file=train, val_fraction=0.0)
    val = str(write_jsonl(tmp_path / "v.jsonl", EMPTY[2:]))  # the validation rows are checked too
    with pytest.raises(ValueError, match=r"^2 of 4 rows .*v.jsonl, line 1"):
        make_dm(tokenizer, train_file=str(write_jsonl(tmp_path / "ok.jsonl", qa(2))), val_file=val)


def test_allowed_empty_completions_train_on_the_turn_end_and_are_logged_once(tmp_path, tokenizer, caplog):
    train = str(write_jsonl(tmp_path / "t.jsonl", EMPTY))
    with caplog.at_level(logging.INFO, logger="heal_pl"):
        dm = make_dm(tokenizer, train_file=train, val_fraction=0.0, allow_empty_completions=True)
        dm.setup("validate")  # set up already: nothing is read or logged again
    assert len(dm.train_set) == 4
    assert [[t for t in r["labels"] if t != -100] for r in dm.train_set].count([tokenizer.eos_token_id]) == 1
    assert [m for m in caplog.messages if "empty completion" in m] == [
        "data: 2 rows with an empty completion are trained on the turn end alone (allow_empty_completions)"]


def test_setup_loads_the_model_tokenizer(tmp_path):
    dm = HealDataModule(train_file=str(write_jsonl(tmp_path / "t.jsonl", qa(4))), model="tiny-llama")
    dm.setup("fit")
    assert dm.tokenizer.eos_token == "<|im_end|>" and len(dm.train_set) == 3


def test_init_validates_arguments(tmp_path):
    with pytest.raises(ValueError) as info:
        HealDataModule(train_file=str(tmp_path / "missing.jsonl"), batch_size=0, max_length=4, val_fraction=1.0)
    msg = str(info.value)
    for part in ("batch_size=0", "max_length=4", "val_fraction=1.0", "missing.jsonl"):
        assert part in msg


def test_bundled_persona_sets_parse():
    train, val = read_examples(DEFAULT_TRAIN_FILE), read_examples(DEFAULT_VAL_FILE)
    assert len(train) >= 200 and len(val) >= 20
    assert all(e.prompt_messages[0]["role"] == "user" and e.completion.strip() for e in train + val)
    assert not {e.prompt_messages[0]["content"] for e in train} & {e.prompt_messages[0]["content"] for e in val}
    tr, va = HealDataModule().split()  # the default: bundled train set, bundled held-out set
    assert (len(tr), len(va)) == (len(train), len(val))
