"""heal_pl/configs/gpu/: the GPU recipes parse through ``heal`` with the settings their comments promise, and the
FSDP ones build an FSDPStrategy whose wrap policy makes a unit of exactly the decoder blocks, in any family.

Lightning refuses FSDPStrategy on a CPU accelerator ("requires a GPU accelerator"), and the recipes name models of
the Hub, so they are checked by parsing, not by running: ``--print_config`` through :func:`heal_pl.cli.build_cli`,
and the strategy block instantiated by jsonargparse the way LightningCLI does (tests/models/test_fsdp.py runs the
module under torch's FSDP on 2 CPU processes).
"""

from __future__ import annotations

import pytest
import yaml
from jsonargparse import ArgumentParser
from lightning.pytorch.strategies import FSDPStrategy, Strategy
from torch.distributed.fsdp import ShardingStrategy

from heal_pl.cli import build_cli
from heal_pl.configs import FOLDER
from heal_pl.models.fsdp import decoder_blocks
from heal_pl.models.lm import find_blocks
from heal_pl.models.load import tiny_model

RECIPES = sorted((FOLDER / "gpu").glob("*.yaml"))
FSDP_RECIPES = [p for p in RECIPES if "strategy" in yaml.safe_load(p.read_text())["trainer"]]
# what each recipe must say (its header's promise)
EXPECTED = {
    "fsdp": {"precision": "bf16-mixed", "checkpointing": True, "quantize": "none"},
    "llama8b_24gb": {"precision": "bf16-mixed", "checkpointing": True, "quantize": "nf4", "batch": 4, "length": 2048},
    "llama8b_80gb": {"precision": "bf16-mixed", "checkpointing": True, "quantize": "none", "batch": 8, "length": 2048},
    "llama70b_fsdp": {"precision": "bf16-mixed", "checkpointing": True, "quantize": "none", "devices": 8,
                      "load_on": "rank_zero"},
}


def test_every_recipe_is_checked() -> None:
    assert {p.stem for p in RECIPES} == set(EXPECTED)


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_print_config_has_what_the_recipe_promises(recipe, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        build_cli(["fit", "--config", str(recipe), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    want = EXPECTED[recipe.stem]
    assert printed["trainer"]["precision"] == want["precision"]
    assert printed["model"]["gradient_checkpointing"] is want["checkpointing"]
    assert printed["model"]["quantize"] == want["quantize"]
    assert printed["model"]["load_on"] == want.get("load_on", "every_rank")
    assert printed["model"]["barrier"]["agg"] == "rmse"
    assert printed["data"].get("batch_size") == want.get("batch", printed["data"].get("batch_size"))
    assert printed["data"].get("max_length") == want.get("length", printed["data"].get("max_length"))
    assert printed["trainer"]["devices"] == want.get("devices", printed["trainer"]["devices"])


@pytest.mark.parametrize("recipe", FSDP_RECIPES, ids=lambda p: p.stem)
def test_strategy_block_instantiates_with_block_wrapping_and_orig_params(recipe) -> None:
    parser = ArgumentParser()
    parser.add_argument("--strategy", type=Strategy)
    block = yaml.safe_load(recipe.read_text())["trainer"]["strategy"]
    strategy = parser.instantiate(parser.parse_object({"strategy": block})).strategy
    assert isinstance(strategy, FSDPStrategy)
    assert strategy.kwargs["auto_wrap_policy"] is decoder_blocks
    assert strategy.kwargs["use_orig_params"] is True  # frozen base + trainable LoRA in one FSDP unit
    assert strategy.sharding_strategy == ShardingStrategy.FULL_SHARD
    assert strategy._state_dict_type == "full"


@pytest.mark.parametrize("family", ["llama", "gemma3", "qwen3_5", "gpt2", "phi3", "cohere"])
def test_the_wrap_policy_makes_a_unit_of_exactly_the_decoder_blocks(family: str) -> None:
    model = tiny_model(family)
    wrapped = [m for m in model.modules() if decoder_blocks(m, recurse=False, nonwrapped_numel=0)]
    assert wrapped == list(find_blocks(model))
    assert all(decoder_blocks(m, recurse=True, nonwrapped_numel=0) for m in model.modules())  # FSDP descends
