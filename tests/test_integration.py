"""The embedded SmolLM2-135M-Instruct end to end (``-m slow``; CI runs these too)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from heal_pl.barrier.kl import KLBarrier
from heal_pl.callbacks import KLBarrierCallback
from heal_pl.data.datamodule import HealDataModule
from heal_pl.module import HealModule
from tests.callbacks.test_kl_barrier import ForeignModule

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smol_data() -> HealDataModule:
    data = HealDataModule(model="smollm2-135m-instruct", batch_size=4, max_length=64, max_examples=16)
    data.setup("fit")
    return data


def test_heal_module_trains_smollm2_on_the_bundled_persona_set(tmp_path: Path, smol_data: HealDataModule) -> None:
    module = HealModule(model="smollm2-135m-instruct", barrier=KLBarrier(agg="rmse", tau=0.0), lr=2e-3)
    batch = next(iter(smol_data.train_dataloader()))
    with torch.no_grad():
        _, before, _ = module.loss_terms(batch)
    assert before["kl_max"].item() < 1e-6, "adapter off at init: student == base"
    trainer = L.Trainer(
        max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        limit_val_batches=1, val_check_interval=3, default_root_dir=tmp_path, num_sanity_val_steps=0,
    )  # fmt: skip
    trainer.fit(module, smol_data)
    metrics = trainer.callback_metrics
    assert torch.isfinite(metrics["train/loss"]) and metrics["train/kl_max"] > 0
    assert metrics["val/kl_max"] >= metrics["val/kl_p95"] > 0 and metrics["val/kl_rmse"] >= metrics["val/kl_mean"]
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


def test_callback_matches_heal_module_on_smollm2(smol_data: HealDataModule) -> None:
    barrier = KLBarrier(agg="p95", tau=0.0)
    module = HealModule(model="smollm2-135m-instruct", barrier=barrier)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.02, generator=torch.Generator().manual_seed(0))
    batch = next(iter(smol_data.val_dataloader()))
    with torch.no_grad():
        _, scalars, _ = module.loss_terms(batch)
        foreign = ForeignModule(module.student)
        cb = KLBarrierCallback(barrier)
        cb.setup(None, foreign, "fit")  # type: ignore[arg-type]
        try:
            value, _ = cb.compute(batch, module.student(**batch).logits)
        finally:
            cb.teardown(None, foreign, "fit")  # type: ignore[arg-type]
    assert scalars["barrier"].item() > 0
    torch.testing.assert_close(value, scalars["barrier"], rtol=1e-4, atol=1e-5)
