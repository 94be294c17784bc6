import math

import pytest
import torch

from heal_pl.models.load import tiny_model, tiny_tokenizer
from heal_pl.rounds.filters import filter_samples, repetition_share, tail_perplexity
from tests.helpers import largest_vocab_rows


def test_repetition_words():
    # words: the cat the cat the cat -> 2-grams: 5, "the cat" x3 -> 3/5; chars give less
    assert repetition_share("the cat the cat the cat", ns=(2,)) == pytest.approx(max(3 / 5, 3 / 22))
    # chars "abab": 2-grams ab,ba,ab -> 2/3; single word -> 0
    assert repetition_share("abab", ns=(2,)) == pytest.approx(2 / 3)
    assert repetition_share("aaaa", ns=(2, 3)) == pytest.approx(1.0)


def test_repetition_low_and_empty():
    assert repetition_share("A quick brown fox jumps over the lazy dog near my house.") < 0.15
    assert repetition_share("   ") == 0.0


def test_tail_perplexity_hand():
    torch.manual_seed(0)
    tok, model = tiny_tokenizer(), tiny_model().eval()
    p, c = "hello there", " the cat sat on the mat"
    pi = tok(p, add_special_tokens=False)["input_ids"]
    ci = tok(c, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        lg = model(input_ids=torch.tensor([pi + ci])).logits[0].double()
    lp = torch.log_softmax(lg, -1)
    nll = sorted((-lp[len(pi) + j - 1, t].item() for j, t in enumerate(ci)), reverse=True)
    k = max(1, math.ceil(0.25 * len(nll)))
    want = math.exp(sum(nll[:k]) / k)
    got = tail_perplexity(model, tok, [p], [c])
    assert got[0] == pytest.approx(want, rel=1e-4)
    full = tail_perplexity(model, tok, [p], [c], tail=1.0)[0]
    assert full == pytest.approx(math.exp(sum(nll) / len(nll)), rel=1e-4)
    assert full <= got[0]
    prompts, comps = [p, "a", "the dog"], [c, " b c d e", " ran"]
    batched = tail_perplexity(model, tok, prompts, comps, batch_size=3)
    single = [tail_perplexity(model, tok, [a], [b], batch_size=1)[0] for a, b in zip(prompts, comps, strict=True)]
    assert batched == pytest.approx(single, rel=1e-4)


def test_filter_reasons():
    res = filter_samples(
        ["fine text here is good", "", "the cat the cat the cat", "ok these words are now fine"],
        [2.0, 1.0, 1.0, 50.0],
        10.0,
        0.6,
    )
    assert [r.keep for r in res] == [True, False, False, False]
    assert res[1].reasons == ["empty"] and res[2].reasons == ["repetition"] and res[3].reasons == ["perplexity"]


def test_bad_inputs():
    with pytest.raises(ValueError, match="ns"):
        repetition_share("x", ns=())
    with pytest.raises(ValueError, match="ns"):
        repetition_share("x", ns=(0,))
    with pytest.raises(ValueError, match="ppl"):
        filter_samples(["a"], [], 1.0, 1.0)
    tok, model = tiny_tokenizer(), tiny_model()
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="tail"):
            tail_perplexity(model, tok, ["a"], ["b"], tail=bad)
    with pytest.raises(ValueError, match="completions"):
        tail_perplexity(model, tok, ["a"], [], tail=0.5)


def test_a_single_ngram_per_kind_scores_zero_repetition():
    # "ok": one word (no word 2-gram) and two characters (one char 2-gram, no 3- or 4-gram): nothing can repeat
    assert repetition_share("ok") == 0.0
    # "abcd" with n = 4: one character 4-gram and one word: still nothing to repeat
    assert repetition_share("abcd", ns=(4,)) == 0.0
    # two n-grams of a kind can repeat: "abab" has character 3-grams aba, bab -> distinct -> 1/2
    assert repetition_share("abab", ns=(3,)) == pytest.approx(1 / 2)


def test_repetition_share_is_the_max_over_kinds_and_ns():
    text = "go go go stop"
    words = ["go", "go", "go", "stop"]
    chars = list(text)

    def top(items, n):
        grams = [tuple(items[i : i + n]) for i in range(len(items) - n + 1)]
        return max(grams.count(g) for g in grams) / len(grams)

    want = max(top(seq, n) for seq in (words, chars) for n in (2, 3, 4) if len(seq) >= n + 1)
    assert repetition_share(text) == pytest.approx(want)
    assert repetition_share(text) == pytest.approx(2 / 3)  # word 2-grams: (go, go) twice of three


def test_filter_keeps_natural_text_and_drops_a_loop():
    natural = "The park was quiet in the morning, and a few people walked their dogs near the river."
    loop = "I am happy. I am happy. I am happy. I am happy. I am happy."
    res = filter_samples([natural, loop], [5.0, 5.0], ppl_tau=10.0, rep_tau=0.3)
    assert res[0].keep and res[0].rep < 0.3
    assert not res[1].keep and res[1].reasons == ["repetition"] and res[1].rep >= 0.3


@pytest.mark.parametrize("chunk_size", [1, 3, 1000])
def test_tail_perplexity_builds_no_whole_batch_by_tokens_by_vocab_tensor(chunk_size: int) -> None:
    """The NLL is read ``chunk_size`` rows at a time through the head: same values for every chunk (float32
    rounding), never more than ``chunk_size`` rows of log-probabilities at once (a ``[B, T, V]`` block has B · T)."""
    torch.manual_seed(0)
    tok, model = tiny_tokenizer(), tiny_model().eval()
    prompts, comps = ["hello there", "a", ""], [" the cat sat on the mat and then it sat again", " b c d e", " ran"]
    want = tail_perplexity(model, tok, prompts, comps, tail=1.0, batch_size=3, chunk_size=1000)
    with largest_vocab_rows(len(tok)) as seen:
        got = tail_perplexity(model, tok, prompts, comps, tail=1.0, batch_size=3, chunk_size=chunk_size)
    assert got == pytest.approx(want, rel=1e-5)
    assert 0 < seen["log_softmax"] <= chunk_size and seen["head"] <= chunk_size


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_tail_perplexity_bad_chunk_size(bad: object) -> None:
    with pytest.raises(ValueError, match=rf"chunk_size: must be an integer >= 1, got {bad!r}"):
        tail_perplexity(tiny_model(), tiny_tokenizer(), ["a"], ["b"], chunk_size=bad)  # type: ignore[arg-type]
