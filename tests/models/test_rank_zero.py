"""``load_on="rank_zero"``: ranks other than 0 build the model without weights, and FSDP's ``sync_module_states``
fills them with rank 0's (checked on 2 CPU processes with torch's FSDP on gloo against the model's own logits)."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy
from torch import nn
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.distributed.fsdp import _init_utils as fsdp_init

from heal_pl.adapters.lora import LoRASpec
from heal_pl.models.fsdp import adapter_tensors, decoder_blocks, gathered_root
from heal_pl.models.load import load_model
from heal_pl.models.rank_zero import is_launch_rank_zero, materialize_empty, parameters_on_meta, prepare_strategy
from heal_pl.module import HealModule
from tests.helpers import make_batch

_RANK_ENV = ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK")


@pytest.fixture
def no_rank_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in _RANK_ENV:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.mark.parametrize(("env", "zero"), [
    ({}, True), ({"RANK": "0"}, True), ({"RANK": "3"}, False), ({"SLURM_PROCID": "1"}, False),
    ({"RANK": "0", "LOCAL_RANK": "0"}, True), ({"LOCAL_RANK": "1"}, False),
    ({"NODE_RANK": "1", "LOCAL_RANK": "0"}, False),
])  # fmt: skip
def test_rank_zero_is_read_from_the_launchers_environment(no_rank_env, env: dict[str, str], zero: bool) -> None:
    for name, value in env.items():
        no_rank_env.setenv(name, value)
    assert is_launch_rank_zero() is zero


def test_parameters_on_meta_moves_parameters_only_and_restores_registration() -> None:
    with parameters_on_meta():
        layer = nn.Linear(4, 3)
        layer.register_buffer("table", torch.arange(3.0))
    assert layer.weight.is_meta and layer.bias.is_meta and layer.weight.requires_grad
    assert torch.equal(layer.table, torch.arange(3.0))
    assert not nn.Linear(2, 2).weight.is_meta  # outside, registration is as usual


@pytest.mark.parametrize("family", ["llama", "gemma3", "qwen3_5"])
def test_an_empty_model_has_no_weights_but_the_loaded_ones_buffers_and_generation_config(family: str) -> None:
    empty, loaded = load_model(f"tiny-{family}", empty=True), load_model(f"tiny-{family}")
    assert type(empty) is type(loaded)
    assert [(n, p.shape, p.dtype) for n, p in empty.named_parameters()] == [
        (n, p.shape, p.dtype) for n, p in loaded.named_parameters()]
    assert all(p.is_meta for p in empty.parameters())
    buffers = dict(loaded.named_buffers())
    assert buffers and all(torch.equal(b, buffers[n]) for n, b in empty.named_buffers()), "buffers are computed"
    assert empty.generation_config.eos_token_id == loaded.generation_config.eos_token_id


def test_an_empty_quantized_model_is_refused() -> None:
    with pytest.raises(ValueError, match="quantize='nf4' cannot build an empty"):
        load_model("tiny-llama", quantize="nf4", empty=True)


def test_only_rank_zero_reads_the_weights(no_rank_env) -> None:
    no_rank_env.setenv("RANK", "1")
    other = HealModule(model="tiny-llama", load_on="rank_zero")
    assert all(p.is_meta for p in other.student.parameters())
    no_rank_env.setenv("RANK", "0")
    zero = HealModule(model="tiny-llama", load_on="rank_zero")
    assert not any(p.is_meta for p in zero.student.parameters())
    assert other.trainable_names() == zero.trainable_names()


def test_rank_zero_loading_makes_fsdp_broadcast_and_refuses_other_strategies(no_rank_env) -> None:
    for load_on, world_size in (("rank_zero", 1), ("every_rank", 2)):
        prepare_strategy(load_on, DDPStrategy(), world_size)  # one process, or every rank loads: nothing to broadcast
        prepare_strategy(load_on, strategy := FSDPStrategy(), world_size)
        assert "sync_module_states" not in strategy.kwargs
    fsdp = FSDPStrategy(auto_wrap_policy=decoder_blocks)
    prepare_strategy("rank_zero", fsdp, world_size=2)
    assert fsdp.kwargs["sync_module_states"] is True and fsdp.kwargs["param_init_fn"] is materialize_empty
    for strategy, why in ((DDPStrategy(), "the strategy is DDPStrategy"),
                          (FSDPStrategy(sync_module_states=False), "was given sync_module_states=False")):  # fmt: skip
        with pytest.raises(ValueError, match=f"load_on='rank_zero' on 2 processes needs FSDPStrategy.*{why}"):
            prepare_strategy("rank_zero", strategy, world_size=2)
    module = HealModule(model="tiny-llama", load_on="rank_zero")
    module._trainer = SimpleNamespace(strategy=DDPStrategy(), world_size=4)
    with pytest.raises(ValueError, match="on 4 processes"):
        module.setup("fit")  # at start-up, on every rank, before any collective
    with pytest.raises(ValueError, match="load_on='rank_zero' needs adapter='lora'"):
        HealModule(model="tiny-llama", adapter="routed", load_on="rank_zero")
    with pytest.raises(ValueError, match="load_on='rank_0' is not"):
        HealModule(model="tiny-llama", load_on="rank_0")  # type: ignore[arg-type]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(rank: int, port: int, family: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    report: dict = {}
    try:
        torch.manual_seed(rank)  # rank 1's own initialisation, if anything survived, would differ
        module = HealModule(model=f"tiny-{family}", lora=LoRASpec(r=4), load_on="rank_zero")
        report["empty"] = all(p.is_meta for p in module.student.parameters())
        names = module.trainable_names()
        batch = make_batch(vocab=300)
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        if rank == 0:
            with torch.no_grad():
                for p in module.parameters():
                    if p.requires_grad:
                        p.normal_(0, 0.05)
                torch.save({"adapter": {n: p.detach().clone() for n, p in module.named_parameters() if n in names},
                            "logits": module.student(**inputs).logits}, Path(out) / "rank0_before.pt")  # fmt: skip
        # torch refuses sync_module_states for CPU tensors only because NCCL needs GPUs; gloo broadcasts CPU tensors,
        # so the check is lifted and torch's own materialisation and broadcast run as they do on GPUs
        fsdp_init._check_module_states_for_sync_module_states = lambda states: None
        root = FSDP(module, auto_wrap_policy=decoder_blocks, use_orig_params=True, device_id=torch.device("cpu"),
                    sync_module_states=True, param_init_fn=materialize_empty)  # fmt: skip
        with torch.no_grad(), gathered_root(root):
            logits = module.student(**inputs).logits
        torch.save({"adapter": adapter_tensors(root, names), "logits": logits}, Path(out) / f"rank{rank}_after.pt")
    finally:
        (Path(out) / f"rank{rank}.json").write_text(json.dumps(report))
        dist.destroy_process_group()


@pytest.mark.slow  # 2 processes (~30 s)
def test_fsdp_fills_the_empty_ranks_with_rank_zeros_weights(tmp_path: Path) -> None:
    mp.spawn(worker, args=(free_port(), "llama", str(tmp_path)), nprocs=2, join=True)
    assert json.loads((tmp_path / "rank0.json").read_text()) == {"empty": False}
    assert json.loads((tmp_path / "rank1.json").read_text()) == {"empty": True}
    before = torch.load(tmp_path / "rank0_before.pt")
    reference = load_model("tiny-llama")  # the checkpoint itself, read here independently
    for rank in (0, 1):
        after = torch.load(tmp_path / f"rank{rank}_after.pt")
        assert after["adapter"].keys() == before["adapter"].keys()
        assert all(torch.equal(after["adapter"][n], before["adapter"][n]) for n in before["adapter"])
        assert (after["logits"] - before["logits"]).abs().max() <= 1e-5
    batch = make_batch(vocab=300)
    with torch.no_grad():  # the adapter moves the logits: equal logits above are not a zero adapter's
        base = reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert (base - before["logits"]).abs().max() > 1e-3
