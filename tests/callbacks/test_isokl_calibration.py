"""IsoKLCalibrationCallback in a real Trainer: fit end, every N validations, foreign modules, state, errors.

The tiny models are made "lively" (base weights ×10, as ``tests.steering.test_trajectory.lively``): random-init logits
are nearly flat, so KL(steered ‖ base) would saturate far below 1 nat; sharper logits let the search converge.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import Logger, TensorBoardLogger
from peft.tuners.lora import LoraLayer
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader

import heal_pl.steering.isokl
from heal_pl.callbacks.isokl_calibration import IsoKLCalibrationCallback
from heal_pl.data.datamodule import HealDataModule
from heal_pl.data.prompts import chat_prompt, questions
from heal_pl.module import HealModule
from heal_pl.survival.config import SweepConfig
from tests.callbacks.test_kl_barrier import ForeignModule
from tests.helpers import lively_peft, make_batch

FAST = dict(n_calib=2, n_audit=2, max_new_tokens=8, max_iters=6)
KEYS = ("c_star", "stat_star", "converged", "evaluations", "audit_ratio")


class RecordingLogger(Logger):
    """Keeps every ``log_metrics`` call as ``(step, metrics)``."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[int | None, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "recording"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.calls.append((step, dict(metrics)))

    def isokl(self, prefix: str = "isokl/") -> list[tuple[int | None, dict[str, float]]]:
        return [(s, m) for s, m in self.calls if any(k.startswith(prefix) for k in m)]


def lively_heal_module(seed: int = 0, lr: float = 1e-3) -> HealModule:
    torch.manual_seed(seed)
    module = HealModule(model="tiny-llama", lr=lr, warmup_steps=0)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)  # a non-zero adapter
            elif "lora_" not in name and p.dim() == 2:
                p.mul_(10)
    return module


def lively_foreign(tokenizer) -> ForeignModule:
    model = lively_peft().train()
    foreign = ForeignModule(model, lr=1e-3)
    foreign.tokenizer = tokenizer  # the module's own tokenizer: found first
    return foreign


def trainer(tmp_path: Path, **kwargs: Any) -> L.Trainer:
    defaults = dict(
        accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path, num_sanity_val_steps=0,
    )  # fmt: skip
    return L.Trainer(**{**defaults, **kwargs})


def loader(n: int = 2) -> DataLoader:
    return DataLoader([make_batch(seed=s) for s in range(n)], batch_size=None)


def test_runs_at_fit_end_on_heal_module_and_logs_the_keys(tmp_path: Path, tokenizer) -> None:
    module = lively_heal_module()
    dm = HealDataModule(model="tiny-llama", max_examples=4, max_length=64, batch_size=2).set_tokenizer(tokenizer)
    cb = IsoKLCalibrationCallback(**FAST)  # HealModule has no tokenizer: the datamodule's is used
    logger, tb = RecordingLogger(), TensorBoardLogger(tmp_path, name="tb")
    fit = trainer(tmp_path, max_steps=2, logger=[logger, tb], limit_val_batches=0, callbacks=[cb])
    fit.fit(module, datamodule=dm)
    assert cb.calibrations == 1 and set(cb.results) == {"+"}
    r = cb.results["+"]
    assert r["converged"] and abs(r["stat_star"] - 1.0) < 0.05 and r["c_star"] > 0
    assert r["evaluations"] == len(r["history"]) >= 1 and r["audit"] is not None
    (step, metrics), = logger.isokl()
    assert step == fit.global_step == 2
    assert metrics == {f"isokl/+/{k}": float(r[k]) for k in KEYS}
    events = EventAccumulator(tb.log_dir)
    events.Reload()
    (event,) = events.Scalars("isokl/+/c_star")  # written before the loggers are finalised
    assert event.step == 2 and event.value == pytest.approx(r["c_star"])


def test_foreign_module_with_both_signs_and_given_prompts(tmp_path: Path, tokenizer) -> None:
    foreign = lively_foreign(tokenizer)
    prompts = [chat_prompt(tokenizer, q, None) for q in questions(3)]
    cb = IsoKLCalibrationCallback(prompts=prompts, n_audit=0, target=0.5, bracket=(0.05, 20.0), signs=(1, -1),
                                  max_new_tokens=8, prefix="cal/")  # fmt: skip
    logger = RecordingLogger()
    trainer(tmp_path, max_steps=1, logger=logger, callbacks=[cb]).fit(foreign, loader(1))
    assert set(cb.results) == {"+", "-"}
    for name, sign in (("+", 1), ("-", -1)):
        r = cb.results[name]
        assert r["converged"] and r["coeff"] == sign * r["c_star"] and abs(r["stat_star"] - 0.5) < 0.05
        assert r["audit"] is None and r["audit_ratio"] is None  # n_audit = 0: no audit, nothing logged for it
    (_, metrics), = logger.isokl("cal/")
    assert set(metrics) == {f"cal/{s}/{k}" for s in "+-" for k in KEYS if k != "audit_ratio"}


def test_every_n_val_epochs_counts_only_real_validations(tmp_path: Path, tokenizer) -> None:
    foreign = lively_foreign(tokenizer)
    cb = IsoKLCalibrationCallback(every_n_val_epochs=2, n_calib=1, n_audit=1, max_new_tokens=4, max_iters=2)
    logger = RecordingLogger()
    fit = trainer(tmp_path, max_epochs=5, logger=logger, callbacks=[cb], num_sanity_val_steps=1)
    fit.fit(foreign, loader(1), loader(1))
    assert cb.val_epochs == 5  # the sanity check is not counted
    assert cb.calibrations == 3  # after validation epochs 2 and 4, then at the end of training
    assert [s for s, _ in logger.isokl()] == [2, 4, 5]


def test_state_dict_round_trip(tokenizer) -> None:
    foreign = lively_foreign(tokenizer)
    cb = IsoKLCalibrationCallback(signs=(-1,), **FAST)
    cb.results = cb.calibrate(foreign, cb.tokenizer(None, foreign))
    cb.calibrations, cb.val_epochs = 1, 3
    buf = io.BytesIO()
    torch.save(cb.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)  # plain values: loadable the way Lightning loads checkpoints
    other = IsoKLCalibrationCallback()
    other.load_state_dict(state)
    assert other.results == cb.results and set(other.results) == {"-"}
    assert (other.calibrations, other.val_epochs) == (1, 3)
    assert other.metrics() == cb.metrics()


def test_model_outputs_modes_and_scaling_are_restored(tokenizer, monkeypatch) -> None:
    module = lively_heal_module()
    module.train()
    batch = make_batch()
    with torch.no_grad():
        before = module.student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    modes = {n: m.training for n, m in module.named_modules()}
    scaling = [m.scaling["default"] for m in module.modules() if isinstance(m, LoraLayer)]
    during: list[tuple[bool, bool]] = []
    real = heal_pl.steering.isokl.measure_kl

    def recording(*args: Any, **kwargs: Any):
        during.append((any(m.training for m in module.modules()), torch.is_grad_enabled()))
        return real(*args, **kwargs)

    monkeypatch.setattr(heal_pl.steering.isokl, "measure_kl", recording)
    results = IsoKLCalibrationCallback(signs=(1, -1), **FAST).calibrate(module, tokenizer)
    assert set(results) == {"+", "-"}
    assert during and set(during) == {(False, False)}  # every measurement: eval mode, no grad
    assert {n: m.training for n, m in module.named_modules()} == modes
    assert [m.scaling["default"] for m in module.modules() if isinstance(m, LoraLayer)] == scaling
    assert all(p.grad is None for p in module.parameters()) and torch.is_grad_enabled()
    with torch.no_grad():
        after = module.student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.equal(before, after)


def test_tokenizer_sources(tokenizer) -> None:
    foreign = lively_foreign(tokenizer)
    cb = IsoKLCalibrationCallback()
    assert cb.tokenizer(None, foreign) is tokenizer
    del foreign.tokenizer
    with pytest.raises(ValueError, match=r"`\.tokenizer` attribute.*trainer\.datamodule\.tokenizer.*tokenizer_name="):
        cb.tokenizer(None, foreign)
    named = IsoKLCalibrationCallback(tokenizer_name="tiny-llama").tokenizer(None, foreign)
    assert named.eos_token == tokenizer.eos_token


def test_module_without_peft_model_says_so(tokenizer) -> None:
    from heal_pl.models.load import tiny_model

    foreign = ForeignModule(tiny_model("llama"))
    with pytest.raises(ValueError, match="peft"):
        IsoKLCalibrationCallback(**FAST).calibrate(foreign, tokenizer)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        (dict(stat="p42"), "stat='p42' is not allowed; choose one of mean, p50"),
        (dict(signs=(0,)), "signs=(0,) must hold +1 and/or -1"),
        (dict(signs=(1, 2)), "signs=(1, 2)"),
        (dict(signs=()), "signs=()"),
        (dict(signs=(True,)), "signs=(True,)"),
        (dict(every_n_val_epochs=0), "every_n_val_epochs=0 must be an integer >= 1"),
        (dict(target=0.0), "target=0.0 must be a finite number > 0"),
        (dict(bracket=(5.0, 1.0)), "bracket=(5.0, 1.0)"),
        (dict(n_calib=0), "n_calib=0"),
        (dict(n_audit=-1), "n_audit=-1"),
        (dict(prompts=[]), "prompts is empty"),
        (dict(max_iters=0), "max_iters=0"),
        (dict(survival={"w": 4}), "survival must be a heal_pl.survival.config.SweepConfig or None, got dict"),
    ],
)
def test_bad_arguments_name_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field.replace("(", r"\(").replace(")", r"\)").replace("+", r"\+")):
        IsoKLCalibrationCallback(**kwargs)


def test_survival_sweep_after_calibrating(tmp_path: Path, tokenizer) -> None:
    module = lively_heal_module()
    dm = HealDataModule(model="tiny-llama", max_examples=4, max_length=64, batch_size=2).set_tokenizer(tokenizer)
    sweep = SweepConfig(alphas=[0.0, 1.0, 2.0], w=6, fork_step=2, n_eval=3, threshold=0.5, batch_size=3)
    cb = IsoKLCalibrationCallback(survival=sweep, survival_dir=str(tmp_path / "sv"), **FAST)
    tb = TensorBoardLogger(tmp_path, name="tb")
    fit = trainer(tmp_path, max_steps=2, logger=tb, limit_val_batches=0, callbacks=[cb])
    fit.fit(module, datamodule=dm)
    assert module.training  # modes restored after the sweep too
    c_star = cb.results["+"]["c_star"]
    assert [r["label"] for r in cb.survival_table] == ["0", "+1", "+2"]
    assert [r["coeff"] for r in cb.survival_table] == pytest.approx([0.0, c_star, 2 * c_star])
    assert all(r["n"] == 3 for r in cb.survival_table)
    out = tmp_path / "sv" / "step_2"
    with open(out / "survival.csv") as f:
        assert [row["label"] for row in csv.DictReader(f)] == ["0", "+1", "+2"]
    assert {p.name for p in (out / "figures").glob("*.png")} == {
        "spaghetti_0.png", "spaghetti_plus_1.png", "spaghetti_plus_2.png", "survival_plus.png", "attribution_plus.png",
        "fan_plus.png"}
    events = EventAccumulator(tb.log_dir, size_guidance={"images": 0})
    events.Reload()
    assert set(events.Tags()["images"]) == {"isokl/survival/spaghetti/0", "isokl/survival/spaghetti/+1",
                                            "isokl/survival/spaghetti/+2", "isokl/survival/curves/+",
                                            "isokl/survival/attribution/+", "isokl/survival/fan/+"}
    assert [e.step for e in events.Scalars("isokl/survival/+/S_end")] == [0, 100, 200]
