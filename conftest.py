"""For the whole run, tests/ and the doctests in heal_pl/ alike: offline, with an isolated model cache.

Set ``HEAL_PL_TEST_CACHE=/some/dir`` to keep the model cache (notably the ~20 s SmolLM2 conversion for
``-m slow`` tests) across runs; otherwise every session gets a fresh temporary cache. Each doctest runs in a
temporary folder, so an example that writes where its reader would (``adapter/``, ``runs/``) leaves no file behind.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

# huggingface_hub reads HF_HUB_OFFLINE once, at import: set it before anything imports transformers.
os.environ["HF_HUB_OFFLINE"] = "1"


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


@pytest.fixture(autouse=True)
def _doctest_in_a_temporary_folder(request: pytest.FixtureRequest) -> None:
    if type(request.node).__name__ == "DoctestItem":
        request.getfixturevalue("monkeypatch").chdir(request.getfixturevalue("tmp_path"))


@pytest.fixture(autouse=True)
def _no_seed_left_in_the_environment() -> Iterator[None]:
    """Lightning's ``seed_everything`` (``heal rounds`` calls it each round, ``seed_everything: 0`` in a config) writes
    ``PL_GLOBAL_SEED`` into the environment, where every later Trainer of the process, and its spawned DDP ranks,
    would read it: each test starts and ends without it."""
    names = ("PL_GLOBAL_SEED", "PL_SEED_WORKERS")
    for name in names:
        os.environ.pop(name, None)
    yield
    for name in names:
        os.environ.pop(name, None)
