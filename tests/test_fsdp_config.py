"""heal_pl/configs/gpu/fsdp.yaml: the FSDP recipe for GPU users parses through ``heal`` and builds an FSDPStrategy.

Lightning refuses FSDPStrategy on a CPU accelerator ("requires a GPU accelerator"), so the recipe is
checked by parsing, not by running: ``--print_config`` through :func:`heal_pl.cli.build_cli`, and the
strategy block instantiated by jsonargparse the way LightningCLI does.
"""

from __future__ import annotations

import pytest
import yaml
from jsonargparse import ArgumentParser
from lightning.pytorch.strategies import FSDPStrategy, Strategy
from torch.distributed.fsdp import ShardingStrategy
from torch.distributed.fsdp.wrap import ModuleWrapPolicy
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

from heal_pl.cli import build_cli
from heal_pl.configs import FOLDER
from heal_pl.models.load import load_model

CONFIG = FOLDER / "gpu" / "fsdp.yaml"


def test_print_config_names_fsdp_strategy(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        build_cli(["fit", "--config", str(CONFIG), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    strategy = printed["trainer"]["strategy"]
    assert strategy["class_path"] == "lightning.pytorch.strategies.FSDPStrategy"
    assert strategy["init_args"]["auto_wrap_policy"] == ["transformers.models.llama.modeling_llama.LlamaDecoderLayer"]
    assert strategy["init_args"]["sharding_strategy"] == "FULL_SHARD"
    assert printed["model"]["barrier"]["agg"] == "rmse" and printed["trainer"]["precision"] == "bf16-mixed"


def test_strategy_block_instantiates_with_block_wrapping_and_orig_params() -> None:
    parser = ArgumentParser()
    parser.add_argument("--strategy", type=Strategy)
    block = yaml.safe_load(CONFIG.read_text())["trainer"]["strategy"]
    strategy = parser.instantiate_classes(parser.parse_object({"strategy": block})).strategy
    assert isinstance(strategy, FSDPStrategy)
    policy = strategy.kwargs["auto_wrap_policy"]
    assert isinstance(policy, ModuleWrapPolicy) and set(policy._module_classes) == {LlamaDecoderLayer}
    assert strategy.kwargs["use_orig_params"] is True  # frozen base + trainable LoRA in one FSDP unit
    assert strategy.sharding_strategy == ShardingStrategy.FULL_SHARD
    assert strategy._state_dict_type == "full"


def test_wrapped_class_is_the_default_models_decoder_block() -> None:
    """The auto-wrap class must be the block class of the config's model, or nothing would be sharded."""
    spec = yaml.safe_load(CONFIG.read_text())
    wrap = spec["trainer"]["strategy"]["init_args"]["auto_wrap_policy"]
    model = load_model("tiny-llama")  # same architecture family as the default SmolLM2 (Llama blocks)
    blocks = {f"{type(b).__module__}.{type(b).__name__}" for b in model.model.layers}
    assert blocks == set(wrap)
