"""Tests of heal_pl.survival.probes (docs/maths.md §4.1): answer-token discovery, pmass / p_true, the thinking-block
splice.

pmass and p_true are checked against a float64 numpy softmax written here; token ids against the
tokenizer's own vocabulary lookups of hand-listed tokens.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformers import PreTrainedTokenizerFast

from heal_pl.models.load import tiny_tokenizer
from heal_pl.survival.probes import (
    DEFAULT_ANSWER_SETS,
    AnswerSet,
    answer_token_ids,
    has_thinking_tokens,
    probe_from_logits,
    splice_text,
)

WORDS = ["[UNK]", "the", "answer", "is", "true", "True", "false", "False", "1", "0", "<think>", "</think>"]


def word_level(words: list[str] = WORDS, raw: bool = False):
    """A word-level tokenizer with whitespace splitting: no leading-space tokens at all (" true" → "true")."""
    tok = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    if raw:
        return tok
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


def test_default_sets_match_spec():
    sets = {s.name: set(s.variants) for s in DEFAULT_ANSWER_SETS}
    assert sets == {"true": {"true", "True", " true", " True", "1", " 1"},
                    "false": {"false", "False", " false", " False", "0", " 0"}}


def test_answer_ids_tiny_bpe_with_leading_space_tokens():
    tok = tiny_tokenizer()
    ids = answer_token_ids(tok)
    c = tok.convert_tokens_to_ids
    # hand-listed last pieces: "true"/"True" → "rue"; " true" → "Ġtrue"; " True" → "ĠTrue"; "1"/" 1" → "1"
    assert ids["true"] == [c("rue"), c("Ġtrue"), c("ĠTrue"), c("1")]
    # "false"/"False"/" False" → "se"; " false" → "Ġfalse"; "0"/" 0" → "0"
    assert ids["false"] == [c("se"), c("Ġfalse"), c("0")]
    assert tok.unk_token_id not in ids["true"] + ids["false"]


@pytest.mark.parametrize("raw", [False, True])
def test_answer_ids_word_level_without_leading_space_tokens(raw):
    tok = word_level(raw=raw)
    ids = answer_token_ids(tok)
    w = {x: i for i, x in enumerate(WORDS)}
    # " true" has no token of its own: it tokenises to "true" and is deduplicated
    assert ids == {"true": [w["true"], w["True"], w["1"]], "false": [w["false"], w["False"], w["0"]]}


def test_missing_variants_are_named():
    tok = word_level([w for w in WORDS if w not in ("0", "False")])
    with pytest.raises(ValueError, match="vocabulary") as e:
        answer_token_ids(tok)
    msg = str(e.value)
    for v in ("false:'False'", "false:' False'", "false:'0'", "false:' 0'"):
        assert v in msg
    assert "true:" not in msg
    with pytest.raises(ValueError, match="'   '"):  # tokenises to nothing
        answer_token_ids(word_level(), [AnswerSet("blank", ("   ",)), AnswerSet("x", ("true",))])


def test_colliding_variants_are_named():
    tok = tiny_tokenizer()  # "1" and " 1" share the last token "1"
    with pytest.raises(ValueError, match=r"across sets: yes:'1' and no:' 1'"):
        answer_token_ids(tok, [AnswerSet("yes", ("1",)), AnswerSet("no", (" 1",))])
    with pytest.raises(ValueError, match="unique"):
        answer_token_ids(tok, [AnswerSet("a", ("1",)), AnswerSet("a", ("0",))])


def test_answer_set_validation():
    with pytest.raises(ValueError, match="name"):
        AnswerSet("", ("x",))
    with pytest.raises(ValueError, match="variants"):
        AnswerSet("a", ())
    with pytest.raises(ValueError, match="variants"):
        AnswerSet("a", ("x", ""))


def ref_probe(z: np.ndarray, ids: dict[str, list[int]]) -> tuple[np.ndarray, np.ndarray]:
    z = z.astype(np.float64)
    e = np.exp(z - z.max(-1, keepdims=True))
    p = e / e.sum(-1, keepdims=True)
    pt = p[:, ids["true"]].sum(-1)
    pf = p[:, ids["false"]].sum(-1)
    return pt + pf, pt / (pt + pf)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_probe_from_logits_matches_numpy_softmax(dtype):
    tok = tiny_tokenizer()
    ids = answer_token_ids(tok)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(5, len(tok), generator=g) * 3
    z[1, ids["true"]] += 30.0  # confidently true
    z[2, ids["false"]] += 30.0  # confidently false
    z = z.to(dtype)
    pmass, p_true = probe_from_logits(z, ids)
    assert pmass.dtype == torch.float32 and pmass.shape == (5,) and p_true.shape == (5,)
    ref_m, ref_t = ref_probe(z.float().numpy(), ids)
    np.testing.assert_allclose(pmass.numpy(), ref_m, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(p_true.numpy(), ref_t, rtol=1e-5, atol=1e-7)
    assert pmass[1] > 0.99 and p_true[1] > 0.99 and pmass[2] > 0.99 and p_true[2] < 0.01


def test_probe_zero_mass_guard_and_extra_sets():
    z = torch.full((2, 6), -torch.inf)
    z[:, 5] = 0.0  # all mass on a non-answer token: p(answers) = 0 exactly
    z[1, 0] = 0.0
    pmass, p_true = probe_from_logits(z, {"true": [0], "false": [1], "maybe": [2]})
    np.testing.assert_allclose(pmass.numpy(), [0.0, 0.5])
    np.testing.assert_allclose(p_true.numpy(), [0.0, 1.0])
    assert not torch.isnan(p_true).any()


@pytest.mark.parametrize(("logits", "ids", "match"), [
    (torch.zeros(4), {"true": [0], "false": [1]}, "2-D"),
    (torch.zeros(1, 4), {"yes": [0], "no": [1]}, "true_name"),
    (torch.zeros(1, 4), {"true": [0], "false": [4]}, "outside the vocabulary"),
    (torch.zeros(1, 4), {"true": [0], "false": []}, "no token ids"),
    (torch.zeros(1, 4), {"true": [0], "false": [0]}, "distinct"),
])
def test_probe_bad_inputs(logits, ids, match):
    with pytest.raises(ValueError, match=match):
        probe_from_logits(logits, ids)


def test_splice_closes_an_open_think_block_only():
    s = "The answer is"
    assert splice_text("Q? <think> hmm, let me see", s) == "</think>\n\n" + s
    assert splice_text("Q? <think>a</think> b <think> c", s, sep="") == "</think>" + s
    assert splice_text("Q? <think> hmm </think> so", s) == s
    assert splice_text("Q? no thinking here", s) == s
    assert splice_text("", s) == s
    assert splice_text("[T] x", s, think_open="[T]", think_close="[/T]", sep=" ") == "[/T] " + s
    with pytest.raises(ValueError, match="think_open"):
        splice_text("x", s, think_open="")


def test_has_thinking_tokens():
    assert not has_thinking_tokens(tiny_tokenizer())
    assert has_thinking_tokens(word_level())
    assert has_thinking_tokens(word_level(raw=True))
