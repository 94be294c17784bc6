"""Shared fixtures: the tiny tokenizer and tiny Llama / Qwen2 models (the offline, isolated model cache of the
whole run, doctests included, is in the root ``conftest.py``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerFast


@pytest.fixture
def tokenizer() -> PreTrainedTokenizerFast:
    from heal_pl.models.load import tiny_tokenizer

    return tiny_tokenizer()


@pytest.fixture
def tiny_llama() -> PreTrainedModel:
    from heal_pl.models.load import tiny_model

    return tiny_model("llama")


@pytest.fixture
def tiny_qwen2() -> PreTrainedModel:
    from heal_pl.models.load import tiny_model

    return tiny_model("qwen2")
