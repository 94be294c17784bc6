"""HealTrainer on 2 CPU processes (gloo, with the environment torchrun gives them) logs and trains as one process
holding the global batch: the SFT mean and the p95 pool the tokens of both ranks."""

from __future__ import annotations

import json
import os
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from peft import LoraConfig, get_peft_model
from transformers import TrainingArguments

from heal_pl.barrier.kl import KLBarrier
from heal_pl.data.datamodule import collate
from heal_pl.integrations import HealTrainer
from heal_pl.models.load import tiny_model
from tests.helpers import make_batch
from tests.integrations.test_trainer import Rows
from tests.test_shards import free_port


def train(out: Path, world: int) -> None:
    """3 SGD steps on tiny-llama (Adam would divide tiny gradient elements by their own size and magnify the
    all-reduce's other summation order); the global batch is the 4 rows of make_batch. Rank 0 writes the log."""
    torch.manual_seed(0)
    peft = get_peft_model(tiny_model("llama"), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    rows = Rows(make_batch(vocab=peft.config.vocab_size, B=4, T=16))
    args = TrainingArguments(str(out.with_suffix(".run")), max_steps=3, per_device_train_batch_size=4 // world,
                             optim="sgd", learning_rate=2.0, logging_steps=1, report_to=[], save_strategy="no",
                             use_cpu=True, ddp_backend="gloo" if world > 1 else None, seed=0)  # fmt: skip
    trainer = HealTrainer(model=peft, args=args, train_dataset=rows, data_collator=lambda f: collate(f, 0),
                          barrier=KLBarrier(agg="p95", tau=0.0, lam=5.0))  # fmt: skip
    trainer.train()
    if trainer.is_world_process_zero():
        out.write_text(json.dumps([h for h in trainer.state.log_history if "kl_p95" in h]))


def worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank),
                      LOCAL_RANK=str(rank))  # fmt: skip
    torch.set_num_threads(1)
    try:
        train(Path(out), 2)
    except Exception:  # noqa: BLE001 (reported to the test)
        Path(f"{out}.rank{rank}.error").write_text(traceback.format_exc())
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.slow  # 2 processes (~30 s)
def test_two_ranks_pool_their_tokens(tmp_path: Path) -> None:
    train(tmp_path / "one.json", 1)
    mp.spawn(worker, args=(free_port(), str(tmp_path / "two.json")), nprocs=2, join=True)
    errors = [p.read_text() for p in tmp_path.glob("*.error")]
    assert not errors, errors[0]
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert len(one) == len(two) == 3 and one[0]["kl_max"] == 0.0 and one[-1]["kl_p95"] > 0
    # a KL is a difference of two float32 forwards: batches of 2 and of 4 round differently, ~1e-7 of the logits,
    # which moves a KL by up to ~1e-6 nats (maths §1.12: the float32 floor of any KL heal_pl prints)
    for a, b in zip(one, two, strict=True):
        for key in ("loss", "sft", "D", "barrier", "kl_mean", "kl_rmse", "kl_p95", "kl_max"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=2e-6), (a["step"], key)
