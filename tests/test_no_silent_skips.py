"""Checks that used to be skipped silently when a model lacks a field: now an error or a documented, logged default.

- no EOS anywhere (tokenizer, generation config, caller): rollouts would never stop → ``ValueError``;
- no hidden size in the config: a steering direction is checked against the block output when the hook runs;
- no context length in the config: the window is not checked, with a one-time warning (recurrent models have none);
  a declared one (``max_position_embeddings`` or an alias) bounds ``measure_kl``'s rollouts and the fork window.
"""

from __future__ import annotations

import logging

import pytest
import torch
from torch import Tensor, nn
from transformers import PretrainedConfig

from heal_pl.models.context import context_length
from heal_pl.models.generate import eos_ids
from heal_pl.models.load import tiny_model, tiny_tokenizer
from heal_pl.steering import SteeringVector, steer
from heal_pl.steering.trajectory import measure_kl
from heal_pl.survival.forks import check_window
from tests.helpers import lively

POS, NEG = ["The cat likes warm soup.", "We cook fresh bread."], ["Is the sun cold?", "What time is it?"]
PROMPT = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"


def no_eos_anywhere() -> tuple[nn.Module, object]:
    tok = tiny_tokenizer()
    tok.eos_token = None
    model = tiny_model("llama")
    model.generation_config.eos_token_id = None
    return model, tok


# ----------------------------------------------------------------------------- EOS


def test_eos_ids_sources() -> None:
    model, tok = no_eos_anywhere()
    assert eos_ids(tok, model, 7).tolist() == [7]
    assert eos_ids(tok, model, [9, 3, 9]).tolist() == [3, 9]
    model.generation_config.eos_token_id = [5, 6]
    assert eos_ids(tok, model, None).tolist() == [5, 6]
    assert eos_ids(tiny_tokenizer(), model, None).tolist() == [2, 5, 6]  # the tokenizer's <|im_end|> (id 2) too


def test_no_eos_anywhere_is_an_error() -> None:
    model, tok = no_eos_anywhere()
    with pytest.raises(ValueError, match="no end-of-sequence id.*LlamaForCausalLM.*never stop; pass eos_token_id"):
        eos_ids(tok, model, None)
    assert eos_ids(tok, model, []).tolist() == []  # the caller's explicit "no EOS": rollouts run to their limit
    vec = SteeringVector.fit(model, tok, POS, NEG, layers=[0])
    with pytest.raises(ValueError, match="no end-of-sequence id"):
        measure_kl(model, tok, [PROMPT], vec, 1.0, max_new_tokens=2)
    assert measure_kl(model, tok, [PROMPT], vec, 1.0, max_new_tokens=2, eos_token_id=2).coeff == 1.0  # caller's


# ----------------------------------------------------------------------------- hidden size


class Bare(nn.Module):
    """A model without a config (hence no hidden size): blocks at ``model.layers``, width 8."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(8, 8), nn.Linear(8, 8)])

    def forward(self, x: Tensor) -> Tensor:
        for block in self.layers:
            x = block(x)
        return x


def test_direction_width_is_checked_without_a_hidden_size() -> None:
    torch.manual_seed(0)
    model, x = Bare(), torch.randn(2, 3, 8)
    base = model(x)
    with steer(model, torch.ones(1), 1.0, layers=[1]), pytest.raises(ValueError, match="1 entries but the block "
                                                                                      "outputs width 8"):
        model(x)  # a [1] direction would broadcast over the width without the check
    with steer(model, torch.ones(8), 1.0, layers=[1]):
        torch.testing.assert_close(model(x) - base, torch.ones(2, 3, 8))
    with pytest.raises(ValueError, match=r"expected \(64,\)"):  # with a hidden size: checked at once
        steer(tiny_model("llama"), torch.ones(8), 1.0, layers=[0])


# ----------------------------------------------------------------------------- context length


def test_context_length_fields() -> None:
    assert context_length(tiny_model("llama")) == 512  # max_position_embeddings
    assert context_length(lively("gpt2")) == 256  # GPT-2's n_positions
    model = Bare()
    assert context_length(model) is None
    model.config = PretrainedConfig(seq_length=64)  # type: ignore[assignment]
    assert context_length(model) == 64


def test_measure_kl_checks_the_window(tokenizer) -> None:
    model = lively()
    vec = SteeringVector.fit(model, tokenizer, POS, NEG, layers=[0])
    n_prompt = len(tokenizer(PROMPT, add_special_tokens=False)["input_ids"])
    with pytest.raises(ValueError, match=rf"max_new_tokens={513 - n_prompt}: the longest prompt \({n_prompt}\).*"
                                         rf"max_position_embeddings=512; use max_new_tokens <= {512 - n_prompt}"):
        measure_kl(model, tokenizer, [PROMPT, "Hi"], vec, 1.0, max_new_tokens=513 - n_prompt)


def test_no_context_length_is_not_checked_but_logged(caplog: pytest.LogCaptureFixture) -> None:
    model = Bare()
    model.config = PretrainedConfig()  # type: ignore[assignment]  # a config that declares no context length
    assert context_length(model) is None
    with caplog.at_level(logging.WARNING, logger="heal_pl"):
        check_window(model, 10_000, 10_000, 10)  # nothing to check against
        check_window(model, 10_000, 10_000, 10)
    warned = [r.getMessage() for r in caplog.records if "Bare declares none of" in r.getMessage()]
    assert len(warned) == 1 and "the fork window w is not checked" in warned[0]  # once per model class
    with pytest.raises(ValueError, match="w=600 is longer than the model's context.*max_position_embeddings=512"):
        check_window(tiny_model("mistral"), 10, 600, 2)
