"""The adapter card (heal_pl.adapters.card): heal_pl.json next to peft's files says how far the adapter moved."""

from __future__ import annotations

import importlib.metadata
import math
from dataclasses import asdict
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from heal_pl.adapters.card import read_card
from heal_pl.adapters.switch import adapter_off
from heal_pl.barrier.kl import KLBarrier, naive_token_stats
from heal_pl.module import HealModule
from tests.helpers import make_batch

BATCHES = [make_batch(seed=s) for s in range(3)]


def test_fit_writes_the_barrier_and_the_final_validation_kl(tmp_path: Path) -> None:
    torch.manual_seed(0)
    barrier = KLBarrier(agg="max", tau=0.02, lam=2.0, lam_round_pow=1.0)
    m = HealModule(model="tiny-llama", barrier=barrier, round=1, lr=5e-2, warmup_steps=0,
                   adapter_dir=str(tmp_path / "adapter"))  # fmt: skip
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, max_steps=3, val_check_interval=3, num_sanity_val_steps=0)
    trainer.fit(m, DataLoader(BATCHES, batch_size=None), DataLoader(BATCHES, batch_size=None))
    card = read_card(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()  # peft's own files are there too
    assert card["barrier"] == asdict(barrier) and card["round"] == 1 and card["lam_eff"] == 4.0
    assert card["base_model"] == "tiny-llama" and card["adapter"] == "lora" and card["trained_steps"] == 3
    assert card["heal_pl_version"] == importlib.metadata.version("heal_pl")  # the installed heal_pl wrote it
    final = card["final_validation"]
    assert final["step"] == 3
    # the final adapter's KL on the validation batches, from the model's own forward in float64
    peft = m.student.eval()
    with torch.no_grad():
        kls = []
        for b in BATCHES:
            logits = peft(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.double()
            with adapter_off(peft):
                base = peft(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.double()
            kls.append(naive_token_stats(logits, base, b["labels"]).kl)
        kl = torch.cat(kls)
    assert kl.max() > 1e-3, "the run must have moved the adapter for this test to mean anything"
    assert math.isclose(final["kl_max"], kl.max().item(), rel_tol=1e-5)
    assert math.isclose(final["kl_mean"], kl.mean().item(), rel_tol=1e-5)
    assert math.isclose(final["kl_rmse"], kl.square().mean().sqrt().item(), rel_tol=1e-5)
    assert set(final) >= {"kl_p95", "sft", "D", "barrier", "barrier_fired"}


def test_a_folder_without_a_card_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="heal_pl.json"):
        read_card(tmp_path)
