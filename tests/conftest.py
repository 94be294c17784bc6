"""Shared fixtures: an isolated model cache, the tiny tokenizer and tiny Llama / Qwen2 models.

Set ``HEAL_PL_TEST_CACHE=/some/dir`` to keep the model cache (notably the ~20 s SmolLM2 conversion for
``-m slow`` tests) across runs; otherwise every session gets a fresh temporary cache.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

# huggingface_hub reads HF_HUB_OFFLINE once, at import: set it before anything imports transformers.
os.environ["HF_HUB_OFFLINE"] = "1"

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerFast


@pytest.fixture(scope="session", autouse=True)
def _offline_isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Never touch the network nor the user's ``~/.cache/heal_pl``."""
    saved = os.environ.get("HEAL_PL_CACHE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HEAL_PL_CACHE"] = os.environ.get("HEAL_PL_TEST_CACHE") or str(tmp_path_factory.mktemp("cache"))
    yield
    if saved is None:
        os.environ.pop("HEAL_PL_CACHE", None)
    else:
        os.environ["HEAL_PL_CACHE"] = saved


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
