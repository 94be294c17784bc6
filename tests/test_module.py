"""HealModule in a real Lightning Trainer on the tiny Llama: logging, checkpoints, resume, precision, errors."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader

from heal_pl.adapters.lora import LoRASpec
from heal_pl.barrier.kl import KLBarrier
from heal_pl.module import HealModule, warmup_cosine
from tests.helpers import make_batch

BATCHES = [make_batch(seed=s) for s in range(3)]


def loader() -> DataLoader:
    return DataLoader(BATCHES, batch_size=None)


def trainer(tmp_path: Path, **kwargs) -> L.Trainer:
    defaults = dict(
        accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path, num_sanity_val_steps=0,
    )  # fmt: skip
    return L.Trainer(**{**defaults, **kwargs})


def adapter_state(module: HealModule) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}


def module(**kwargs) -> HealModule:
    torch.manual_seed(0)
    defaults = dict(model="tiny-llama", barrier=KLBarrier(agg="rmse", tau=0.05), lr=5e-3, warmup_steps=1)
    return HealModule(**{**defaults, **kwargs})


def test_fit_writes_the_documented_tensorboard_scalars(tmp_path: Path) -> None:
    m = module()
    logger = TensorBoardLogger(tmp_path, name="run")
    trainer(tmp_path, max_steps=3, logger=logger, log_every_n_steps=1).fit(m, loader(), loader())
    events = EventAccumulator(logger.log_dir)
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for stage in ("train", "val"):
        for name in ("sft", "barrier", "barrier_fired", "D", "kl_mean", "kl_rmse", "kl_p95", "kl_max", "loss"):
            assert f"{stage}/{name}" in tags, f"{stage}/{name} missing from {sorted(tags)}"
    fired = [e.value for e in events.Scalars("train/barrier_fired")]
    assert set(fired) <= {0.0, 1.0} and len(fired) == 3
    assert (Path(logger.log_dir) / "hparams.yaml").read_text().count("agg: rmse") == 1


def test_validation_kl_stats_are_pooled_over_all_tokens(tmp_path: Path) -> None:
    m = module(barrier=KLBarrier(agg="p95", tau=0.0))
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.3)
    t = trainer(tmp_path, max_steps=0)
    t.validate(m, loader(), verbose=False)
    with torch.no_grad():
        pooled = torch.cat([m.loss_terms(b)[2] for b in BATCHES]).double().numpy()
    import numpy as np

    assert math.isclose(t.callback_metrics["val/kl_p95"].item(), float(np.percentile(pooled, 95)), rel_tol=1e-5)
    assert math.isclose(t.callback_metrics["val/kl_max"].item(), float(pooled.max()), rel_tol=1e-6)


def test_checkpoint_holds_only_the_adapter_and_resume_reaches_the_same_adapter(tmp_path: Path) -> None:
    straight = module()
    trainer(tmp_path / "a", max_epochs=2).fit(straight, loader())

    class Interrupt(L.Callback):  # the same configured run, stopped after its first epoch
        def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            trainer.should_stop = True

    first = module()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer(tmp_path / "b", max_epochs=2, enable_checkpointing=True, callbacks=[Interrupt(), ckpt]).fit(first, loader())
    assert first.current_epoch == 1 and first.global_step == len(BATCHES)
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert set(saved["state_dict"]) == set(adapter_state(first)), "checkpoint must hold exactly the adapter"
    assert all("lora_" in k for k in saved["state_dict"])

    resumed = module()
    trainer(tmp_path / "c", max_epochs=2).fit(resumed, loader(), ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    a, b = adapter_state(straight), adapter_state(resumed)
    assert any(not torch.equal(a[k], adapter_state(first)[k]) for k in a), "the second epoch must move the adapter"
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-7)


def test_final_adapter_loads_with_plain_transformers_and_peft(tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from heal_pl.models.load import resolve_model

    m = module(adapter_dir=str(tmp_path / "adapter"))
    trainer(tmp_path, max_steps=2).fit(m, loader())
    base = AutoModelForCausalLM.from_pretrained(resolve_model("tiny-llama"))
    plain = PeftModel.from_pretrained(base, tmp_path / "adapter")
    batch = BATCHES[0]
    m.eval()
    plain.eval()
    with torch.no_grad():
        expected = m.student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        got = plain(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed", "32-true"])
def test_precisions_train_with_finite_loss(tmp_path: Path, precision: str) -> None:
    m = module()
    before = adapter_state(m)
    t = trainer(tmp_path, max_steps=2, precision=precision, gradient_clip_val=1.0)
    t.fit(m, loader())
    assert torch.isfinite(t.callback_metrics["train/loss"])
    assert any(not torch.equal(before[k], v) for k, v in adapter_state(m).items())


def test_gradient_clip_val_applies(tmp_path: Path) -> None:
    m = module(lr=1.0, warmup_steps=0)
    seen: list[float] = []

    orig = m.configure_gradient_clipping

    def clip_and_record(optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        orig(optimizer, gradient_clip_val, gradient_clip_algorithm)
        grads = [p.grad for p in m.parameters() if p.grad is not None]
        seen.append(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item())

    m.configure_gradient_clipping = clip_and_record  # type: ignore[method-assign]
    trainer(tmp_path, max_steps=2, gradient_clip_val=1e-3).fit(m, loader())
    assert seen and all(norm <= 1e-3 * (1 + 1e-4) for norm in seen)


def test_nan_logits_raise_an_error_naming_the_step(tmp_path: Path) -> None:
    m = module()
    m.head.proj.weight.data[5] = float("nan")
    with pytest.raises(FloatingPointError, match="train step 0"):
        trainer(tmp_path, max_steps=1).fit(m, loader())


def test_padding_only_batch_gives_zero_loss_and_a_warning() -> None:
    m = module()
    batch = make_batch()
    batch["labels"][:] = -100
    with pytest.warns(UserWarning, match="no completion tokens"):
        loss, scalars, kl = m.loss_terms(batch, "train step 7")
    loss.backward()
    assert loss.item() == 0.0 and kl.numel() == 0 and scalars["barrier"].item() == 0.0
    grads = [p.grad for p in m.parameters() if p.requires_grad]
    assert all(g is not None and not g.isnan().any() and g.abs().sum() == 0 for g in grads)


def test_spectral_penalty_is_added_with_its_weight() -> None:
    m = module(spectral_lam=0.5, barrier=KLBarrier(reg="nll"))
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    loss, scalars, _ = m.loss_terms(BATCHES[0])
    assert scalars["spectral"] > 0
    torch.testing.assert_close(loss.detach(), scalars["sft"] + 0.5 * scalars["spectral"])


def test_layer_range_adapts_only_those_blocks() -> None:
    m = module(lora=LoRASpec(layers=(0.5, 1.0)))  # tiny model: 2 blocks -> block 1 only
    names = list(adapter_state(m))
    assert names and all(".layers.1." in n for n in names)


def test_warmup_cosine_schedule() -> None:
    assert warmup_cosine(0, 4, 20, 0.1) == pytest.approx(1 / 5)
    assert warmup_cosine(3, 4, 20, 0.1) == pytest.approx(4 / 5)
    assert warmup_cosine(4, 4, 20, 0.1) == pytest.approx(1.0)
    assert warmup_cosine(12, 4, 20, 0.1) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert warmup_cosine(20, 4, 20, 0.1) == pytest.approx(0.1)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"lr": -1.0}, "lr"), ({"chunk_size": 0}, "chunk_size"), ({"ref": "prev"}, "ref"), ({"round": -1}, "round")],
)
def test_bad_arguments_name_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        HealModule(model="tiny-llama", **kwargs)


def test_unknown_agg_lists_allowed_values() -> None:
    with pytest.raises(ValueError, match="agg='median'.*mean, rmse, p95, max"):
        KLBarrier(agg="median")  # type: ignore[arg-type]


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-qwen2"])
@pytest.mark.parametrize("reg", ["kl_rev", "kl_fwd", "nll"])
def test_loss_terms_equal_the_naive_full_logits_computation(model: str, reg: str) -> None:
    """HealModule's path (backbone hidden rows + LM head, chunked) == full [B,T,V] logits of both models."""
    from heal_pl.barrier.kl import naive_token_stats

    m = module(model=model, barrier=KLBarrier(reg=reg, agg="max", tau=0.0), chunk_size=5)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.2, generator=torch.Generator().manual_seed(3))
    batch = BATCHES[1]
    _, scalars, kl = m.loss_terms(batch)
    with torch.no_grad():
        student = m.student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        with m.student.disable_adapter():
            base = m.student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    naive = naive_token_stats(student, base, batch["labels"], reg=reg)
    torch.testing.assert_close(kl.detach(), naive.kl, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(scalars["sft"], naive.nll.mean(), rtol=1e-6, atol=1e-6)
    if reg != "nll":
        assert naive.kl.max() > 1e-3, "the perturbed adapter must move the student"


@pytest.mark.parametrize("cuda", [False, True])
def test_auto_dtype_is_bf16_for_the_base_on_cuda_and_the_adapter_trains_in_fp32(cuda: bool, monkeypatch,
                                                                                  tmp_path: Path) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)  # what the module sees; it still runs on the CPU
    module = HealModule(model="tiny-llama", barrier=KLBarrier(agg="rmse", tau=0.0), lr=1e-2, warmup_steps=0)
    assert module.hparams.dtype == "auto"
    base = {p.dtype for p in module.parameters() if not p.requires_grad}
    assert base == ({torch.bfloat16} if cuda else {torch.float32})
    trainable = [p for p in module.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)  # fmt: skip
    trainer.fit(module, DataLoader([make_batch()], batch_size=None))
    states = [t for s in trainer.optimizers[0].state.values() for t in s.values() if t.dim() > 0]
    assert states and all(t.dtype == torch.float32 for t in states)  # AdamW's moments of the fp32 adapter


@pytest.mark.parametrize("accumulate", [1, 3])
def test_accumulation_is_said_once_at_fit_start(accumulate: int, caplog: pytest.LogCaptureFixture,
                                                tmp_path: Path) -> None:
    module = HealModule(model="tiny-llama", barrier=KLBarrier(agg="p95", tau=0.0), warmup_steps=0)
    trainer = L.Trainer(accelerator="cpu", max_steps=2, accumulate_grad_batches=accumulate, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path)  # fmt: skip
    with caplog.at_level("INFO", logger="heal_pl"):
        trainer.fit(module, DataLoader([make_batch(seed=s) for s in range(6)], batch_size=None))
    notes = [r.getMessage() for r in caplog.records if "per micro-batch" in r.getMessage()]
    assert notes == ([] if accumulate == 1 else [
        "accumulate_grad_batches=3: the KL barrier (p95) is computed per micro-batch and averaged over the 3 "
        "micro-batches of a step, not over their pooled tokens"])  # fmt: skip


def test_around_adapts_the_given_model_in_place_and_unload_gives_it_back() -> None:
    from heal_pl.models.load import load_model

    base = load_model("tiny-qwen2", dtype="bfloat16")
    before = {n: p.detach().clone() for n, p in base.named_parameters()}
    module = HealModule.around(base, barrier=KLBarrier(agg="rmse", tau=0.0))
    assert module.hparams.dtype == "bfloat16" and module.hparams.model == base.name_or_path
    assert module.student.get_base_model() is base, "no copy: the student is the model given"
    assert all(p.dtype == torch.float32 for p in module.parameters() if p.requires_grad)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.normal_(0, 0.1)  # a non-zero adapter: unload must drop it, not merge it
    plain = module.student.unload()
    assert plain is base and dict(plain.named_parameters()).keys() == before.keys()
    assert all(torch.equal(p, before[n]) for n, p in plain.named_parameters())
    with pytest.raises(ValueError, match="HealModule.around: {'quantize': 'nf4'} need a model HealModule loads"):
        HealModule.around(load_model("tiny-llama"), quantize="nf4")
