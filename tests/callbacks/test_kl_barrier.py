"""KLBarrierCallback on a LightningModule that knows nothing of heal_pl."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from heal_pl.barrier.kl import KLBarrier
from heal_pl.callbacks import KLBarrierCallback
from heal_pl.module import HealModule
from tests.helpers import make_batch


class ForeignModule(L.LightningModule):
    """A user's SFT module: a peft model, HF's own loss, plain SGD. No heal_pl inside."""

    def __init__(self, model: torch.nn.Module, lr: float = 0.5) -> None:
        super().__init__()
        self.model, self.lr = model, lr

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self.model(**batch).loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.log("val_loss", self.model(**batch).loss)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=self.lr)


def perturbed_heal_module(barrier: KLBarrier, seed: int = 0) -> HealModule:
    module = HealModule(model="tiny-llama", barrier=barrier)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return module


def lora_grads(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.requires_grad and p.grad is not None}


@pytest.mark.parametrize("agg", ["mean", "rmse", "p95", "max"])
@pytest.mark.parametrize("reg", ["kl_rev", "kl_fwd"])
def test_callback_barrier_equals_heal_module(agg: str, reg: str) -> None:
    barrier = KLBarrier(reg=reg, agg=agg, tau=0.01, lam=2.0)
    heal = perturbed_heal_module(barrier)
    batch = make_batch()

    heal.zero_grad()
    loss, scalars, _ = heal.loss_terms(batch)  # SFT + barrier, HealModule's own path (hidden rows + LM head)
    loss.backward()
    grads_heal = lora_grads(heal)
    expected, D_expected = scalars["barrier"], scalars["D"]

    foreign = ForeignModule(heal.student)
    cb = KLBarrierCallback(barrier)
    cb.setup(None, foreign, "fit")  # type: ignore[arg-type]
    try:
        heal.zero_grad()
        out = foreign.model(**batch)
        value, cb_scalars = cb.compute(batch, out.logits)
        (value + out.loss).backward()
        grads_cb = lora_grads(heal)
    finally:
        cb.teardown(None, foreign, "fit")  # type: ignore[arg-type]

    assert expected.item() > 0, "the test must exercise a firing barrier"
    torch.testing.assert_close(value.detach(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cb_scalars["D"], D_expected, rtol=1e-5, atol=1e-6)
    assert grads_cb.keys() == grads_heal.keys() and grads_cb
    for name in grads_cb:
        torch.testing.assert_close(grads_cb[name], grads_heal[name], rtol=1e-4, atol=1e-6)


def test_callback_adds_barrier_gradient_in_a_real_trainer(tmp_path) -> None:
    """One SGD step under Trainer + callback moves the adapter by -lr * grad(SFT + barrier)."""
    barrier = KLBarrier(agg="rmse", tau=0.0, lam=3.0)
    heal = perturbed_heal_module(barrier, seed=1)
    batch = make_batch(seed=2)
    lr = 0.5

    # expected update, computed by hand: HF's SFT loss + the barrier from HealModule's code path
    ref_model = copy.deepcopy(heal)
    ref_model.zero_grad()
    sft_hf = ref_model.student(**batch).loss
    _, _, kl = ref_model.loss_terms(batch)
    (sft_hf + ref_model.barrier(kl).value).backward()
    expected = {n: p.detach() - lr * p.grad for n, p in ref_model.named_parameters() if p.requires_grad}

    foreign = ForeignModule(heal.student, lr=lr)
    names = {n.removeprefix("student."): n for n in expected}
    trainer = L.Trainer(
        max_steps=1, callbacks=[KLBarrierCallback(barrier)], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path, accelerator="cpu",
    )  # fmt: skip
    trainer.fit(foreign, DataLoader([batch], batch_size=None))
    assert "train/barrier" in trainer.callback_metrics and trainer.callback_metrics["train/barrier"] > 0
    got = {names[n.removeprefix("model.")]: p.detach() for n, p in foreign.named_parameters() if p.requires_grad}
    assert got.keys() == expected.keys()
    for name, value in got.items():
        torch.testing.assert_close(value, expected[name], rtol=1e-4, atol=1e-6)
    assert "training_step" not in foreign.__dict__, "teardown must restore the module's own training_step"


def test_callback_without_peft_model_says_so() -> None:
    from heal_pl.models.load import tiny_model

    foreign = ForeignModule(tiny_model("llama"))
    with pytest.raises(ValueError, match="peft"):
        KLBarrierCallback().setup(None, foreign, "fit")  # type: ignore[arg-type]


def test_callback_batch_without_labels_says_so() -> None:
    heal = perturbed_heal_module(KLBarrier())
    foreign = ForeignModule(heal.student)
    cb = KLBarrierCallback()
    cb.setup(None, foreign, "fit")  # type: ignore[arg-type]
    try:
        with pytest.raises(ValueError, match="labels"):
            cb._student({"input_ids": torch.zeros(1, 3)}, [], "step 0")
    finally:
        cb.teardown(None, foreign, "fit")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- which forward is the student


class StepModule(ForeignModule):
    """A foreign module whose training step is given as a function of (model, batch)."""

    def __init__(self, model: torch.nn.Module, step) -> None:  # noqa: ANN001
        super().__init__(model)
        self.step = step

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self.step(self.model, batch)


def _wrapped_step(step, batch: dict, zero: bool = False) -> tuple[torch.Tensor, StepModule]:  # noqa: ANN001
    heal = perturbed_heal_module(KLBarrier(agg="mean", tau=0.0))
    if zero:
        with torch.no_grad():
            for name, p in heal.named_parameters():
                if "lora_B" in name:
                    p.zero_()
    module = StepModule(heal.student, step)
    cb = KLBarrierCallback(KLBarrier(agg="mean", tau=0.0))
    cb.setup(None, module, "fit")  # type: ignore[arg-type]
    try:
        return module.training_step(batch, 0), module
    finally:
        cb.teardown(None, module, "fit")  # type: ignore[arg-type]


def _true_mean_kl(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    logits = model(**batch).logits
    with torch.no_grad(), model.disable_adapter():
        ref = model(**batch).logits
    lp, lq = logits[:, :-1].double().log_softmax(-1), ref[:, :-1].double().log_softmax(-1)
    return (lp.exp() * (lp - lq)).sum(-1)[batch["labels"][:, 1:] != -100].mean()


def test_a_no_grad_metric_pass_is_not_taken_as_the_student() -> None:
    def step(model, batch):  # noqa: ANN001, ANN202
        loss = model(**batch).loss
        with torch.no_grad(), model.disable_adapter():  # a metric pass: base logits, no graph
            model(**batch)
        return loss

    batch = make_batch()
    total, module = _wrapped_step(step, batch)
    assert total.requires_grad
    barrier = total - module.model(**batch).loss
    assert barrier > 1e-3
    torch.testing.assert_close(barrier.double(), _true_mean_kl(module.model, batch), rtol=1e-5, atol=1e-7)


def test_an_unused_grad_forward_is_not_taken_as_the_student() -> None:
    def step(model, batch):  # noqa: ANN001, ANN202
        loss = model(**batch).loss
        with model.disable_adapter():
            model(**batch).logits.sum().item()  # grad-enabled, but the loss does not depend on it
        return loss

    batch = make_batch()
    total, module = _wrapped_step(step, batch)
    barrier = total - module.model(**batch).loss
    torch.testing.assert_close(barrier.double(), _true_mean_kl(module.model, batch), rtol=1e-5, atol=1e-7)


def test_two_forwards_feeding_the_loss_cannot_be_told_apart() -> None:
    with pytest.raises(ValueError, match="cannot tell the student forward: 2 grad-enabled forwards"):
        _wrapped_step(lambda model, batch: model(**batch).loss + model(**batch).loss, make_batch())


def test_a_step_without_a_grad_forward_says_so() -> None:
    def step(model, batch):  # noqa: ANN001, ANN202
        with torch.no_grad():
            model(**batch)
        return torch.zeros((), requires_grad=True)

    with pytest.raises(ValueError, match="no grad-enabled forward"):
        _wrapped_step(step, make_batch())


def test_every_argument_of_the_student_forward_is_replayed() -> None:
    """Packed sequences: position_ids restart inside a row. The ref must see them (zero adapter: KL 0)."""
    batch = make_batch(B=2, T=12)
    batch["attention_mask"] = torch.ones_like(batch["input_ids"])
    batch["labels"] = batch["input_ids"].clone()
    batch["labels"][:, 0] = -100
    position_ids = torch.cat([torch.arange(5), torch.arange(7)]).repeat(2, 1)  # two packed sequences per row

    total, module = _wrapped_step(lambda model, b: model(**b, position_ids=position_ids).loss, batch, zero=True)
    barrier = total - module.model(**batch, position_ids=position_ids).loss
    assert abs(float(barrier)) <= 1e-6
    with torch.no_grad():  # the test is sensitive: default positions give other logits
        moved = module.model(**batch).logits - module.model(**batch, position_ids=position_ids).logits
    assert moved.abs().max() > 1e-3
