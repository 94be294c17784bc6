"""HealModule sharded by torch's FSDP on 2 CPU processes (gloo): adapter names and checkpoints, the adapter gathered
and saved in peft's format (reloaded, it gives the unsharded model's own logits), and forwards outside the step.

Lightning's FSDPStrategy needs GPUs (the GPU check runs it on 2+); here the module is wrapped by torch's FSDP itself
with heal_pl's block policy, and HealModule's hooks are driven with a stand-in for the trainer."""

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
from peft import PeftModel
from torch.distributed.fsdp import FullStateDictConfig, StateDictType
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

from heal_pl.adapters.lora import LoRASpec
from heal_pl.models.fsdp import adapter_tensors, clean_name, decoder_blocks, gathered_root
from heal_pl.models.load import load_model
from heal_pl.module import HealModule
from tests.helpers import make_batch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    report: dict = {}
    try:
        torch.manual_seed(0)
        module = HealModule(model="tiny-llama", lora=LoRASpec(r=4), adapter_dir=str(Path(out) / "adapter"))
        with torch.no_grad():
            torch.manual_seed(1)
            for p in module.parameters():
                if p.requires_grad:
                    p.normal_(0, 0.05)
        names = module.trainable_names()
        expected = {n: p.detach().clone() for n, p in module.named_parameters() if n in names}
        batch = make_batch(vocab=300)
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        with torch.no_grad():
            own = module.student(**inputs).logits
        root = FSDP(module, auto_wrap_policy=decoder_blocks, use_orig_params=True, device_id=torch.device("cpu"))
        report["units"] = sum(isinstance(m, FSDP) for m in root.modules())
        report["sharded"] = any("_fsdp_wrapped_module" in n for n, _ in module.named_parameters())
        report["names_kept"] = module.trainable_names() == names
        got = adapter_tensors(root, names)
        report["gathered_equal"] = got.keys() == names and all(torch.equal(got[n], expected[n]) for n in names)
        cfg = FullStateDictConfig(offload_to_cpu=False, rank0_only=False)
        with FSDP.state_dict_type(root, StateDictType.FULL_STATE_DICT, cfg):
            checkpoint = {"state_dict": root.state_dict(), "hyper_parameters": dict(module.hparams)}
        module.on_save_checkpoint(checkpoint)
        report["checkpoint_keys"] = sorted(checkpoint["state_dict"]) == sorted(names)
        module.on_load_checkpoint(checkpoint)  # the shapes recorded before sharding: accepted
        with torch.no_grad(), gathered_root(root):
            outside = module.student(**inputs).logits
        report["outside_max_diff"] = (outside - own).abs().max().item()
        module._trainer = SimpleNamespace(strategy=SimpleNamespace(model=root), is_global_zero=rank == 0,
                                          log_dir=out, default_root_dir=out, global_step=0)  # fmt: skip
        module.on_train_end()  # collective gather on both ranks; rank 0 writes the peft folder
        dist.barrier()
        if rank == 0:
            reloaded = PeftModel.from_pretrained(load_model("tiny-llama"), str(Path(out) / "adapter"))
            with torch.no_grad():
                report["reloaded_max_diff"] = (reloaded(**inputs).logits - own).abs().max().item()
            report["card"] = (Path(out) / "adapter" / "heal_pl.json").is_file()
        try:  # last: a forward refused half-way leaves FSDP's state unusable
            with torch.no_grad():
                module.student(**inputs)
            report["outside_without_gather"] = "ran"
        except RuntimeError:
            report["outside_without_gather"] = "refused"
    finally:
        (Path(out) / f"rank{rank}.json").write_text(json.dumps(report))
        dist.destroy_process_group()


@pytest.mark.slow  # 2 processes (~30 s)
def test_fsdp_names_checkpoints_gathers_and_saves_the_adapter(tmp_path: Path) -> None:
    mp.spawn(worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        report = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert report["units"] == 3 and report["sharded"]  # the root and the two decoder blocks
        assert report["names_kept"] and report["gathered_equal"] and report["checkpoint_keys"], report
        assert report["outside_without_gather"] == "refused", "outside the step the root unit is sharded"
        assert report["outside_max_diff"] <= 1e-5, report
    report = json.loads((tmp_path / "rank0.json").read_text())
    assert report["reloaded_max_diff"] <= 1e-5 and report["card"], report


def test_clean_name_drops_every_wrapper_segment() -> None:
    assert clean_name("_fsdp_wrapped_module.student.layers.0._fsdp_wrapped_module._checkpoint_wrapped_module.w") == (
        "student.layers.0.w")
    assert clean_name("student.base_model.model.lm_head.weight") == "student.base_model.model.lm_head.weight"


def test_the_block_policy_refuses_a_model_without_transformers_blocks() -> None:
    from lightning.pytorch.strategies import FSDPStrategy

    from heal_pl.models.fsdp import check_block_units

    model = load_model("tiny-llama")
    check_block_units(model, decoder_blocks)  # every family's blocks are GradientCheckpointingLayers
    module = HealModule(model="tiny-llama")
    module._trainer = SimpleNamespace(strategy=FSDPStrategy(auto_wrap_policy=decoder_blocks), world_size=2)
    module.setup("fit")
    model.model.layers = torch.nn.ModuleList(torch.nn.Linear(4, 4) for _ in range(2))  # blocks of a custom class
    with pytest.raises(ValueError, match=r"decoder_blocks finds no decoder block in LlamaForCausalLM: its blocks "
                                         r"\(Linear\) are not transformers GradientCheckpointingLayers"):  # fmt: skip
        check_block_units(model, decoder_blocks)
    check_block_units(model, {torch.nn.Linear})  # a policy of the user's own: not second-guessed
