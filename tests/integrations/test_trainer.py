"""KLBarrierMixin / HealTrainer: HealModule's loss and gradient in transformers' Trainer, read off the model's own
logits, and the bad inputs refused at construction."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch.utils.data import Dataset
from transformers import TrainingArguments

from heal_pl.adapters.lora import LoRASpec
from heal_pl.barrier.kl import KLBarrier
from heal_pl.data.datamodule import collate
from heal_pl.integrations import HealTrainer
from heal_pl.models.load import tiny_model
from heal_pl.module import HealModule
from tests.helpers import make_batch

FAMILIES = ["llama", "gemma2"]  # gemma2: scaled embeddings and a soft-capped head


class Rows(Dataset):
    """Pre-tokenized rows; ``collate`` pads them (what a user's collator does)."""

    def __init__(self, batch: dict[str, torch.Tensor]) -> None:
        self.rows = [{"input_ids": ids[m.bool()].tolist(), "labels": lab[m.bool()].tolist()}
                     for ids, lab, m in zip(batch["input_ids"], batch["labels"], batch["attention_mask"], strict=True)]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        return self.rows[i]


def args(tmp_path, **kw) -> TrainingArguments:
    kw = {"report_to": [], "use_cpu": True, "save_strategy": "no", "logging_steps": 1, **kw}
    return TrainingArguments(str(tmp_path), **kw)


def perturbed_module(family: str, barrier: KLBarrier, seed: int = 0) -> HealModule:
    module = HealModule(model=f"tiny-{family}", barrier=barrier, lora=LoRASpec(r=4, alpha=8.0, dropout=0.0))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return module.train()


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = {n.removeprefix("student."): p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return out


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(("agg", "tau"), [("rmse", 0.0), ("p95", 0.0), ("max", 1e6), ("mean", 0.0)])
def test_loss_and_gradient_equal_heal_module(family: str, agg: str, tau: float, tmp_path) -> None:
    barrier = KLBarrier(agg=agg, tau=tau, lam=3.0)
    module = perturbed_module(family, barrier)
    batch = make_batch(vocab=module.student.config.vocab_size)
    loss_m, scalars, _ = module.loss_terms(batch)
    loss_m.backward()
    g_m = grads(module)
    assert g_m and float(scalars["barrier_fired"]) == (tau == 0.0)

    trainer = HealTrainer(model=module.student, args=args(tmp_path), barrier=barrier)
    trainer.model.train()  # what Trainer.training_step does before compute_loss
    loss_t = trainer.compute_loss(trainer.model, batch)
    loss_t.backward()
    g_t = grads(module.student)
    torch.testing.assert_close(loss_t, loss_m, rtol=1e-6, atol=0)
    assert g_t.keys() == g_m.keys()
    for name in g_m:
        torch.testing.assert_close(g_t[name], g_m[name], rtol=1e-5, atol=1e-7, msg=name)
    logged = {k: v[0] for k, v in trainer._logged.items()}
    for k in ("sft", "barrier", "D", "kl_mean", "kl_p95", "kl_max", "kl_rmse"):
        assert logged[k] == pytest.approx(float(scalars[k]), rel=1e-6, abs=1e-9), k


def reference_kl(model, batch) -> np.ndarray:
    """KL(student ‖ base) at the counted positions from the model's own forward, float64."""
    with torch.no_grad():
        on = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
        with model.disable_adapter():
            off = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
    lp, lq = on.log_softmax(-1), off.log_softmax(-1)
    kl = (lp.exp() * (lp - lq)).sum(-1)[:, :-1]
    return kl[batch["labels"][:, 1:] != -100].numpy()


def summary(kl: np.ndarray) -> dict[str, float]:
    return {"kl_mean": kl.mean(), "kl_rmse": np.sqrt((kl**2).mean()), "kl_p95": np.quantile(kl, 0.95),
            "kl_max": kl.max()}  # fmt: skip


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma2"])
def test_trained_steps_log_the_models_own_kl(family: str, tmp_path) -> None:
    """A real Trainer run: each step logs the KL of the adapter it starts from, read off the model's own logits
    (float64, adapter on and off); an evaluation logs the pooled statistics of its tokens."""
    torch.manual_seed(0)
    peft = get_peft_model(tiny_model(family), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    batch = make_batch(vocab=peft.config.vocab_size, B=4)
    rows = Rows(batch)
    pad = lambda feats: collate(feats, pad_id=0)  # noqa: E731
    trainer = HealTrainer(model=peft, args=args(tmp_path, max_steps=3, per_device_train_batch_size=4,
                                                learning_rate=3e-2), train_dataset=rows, eval_dataset=rows,
                          data_collator=pad, barrier=KLBarrier(agg="p95", tau=0.0))  # fmt: skip
    seen = []

    class Snapshot:  # the adapter each step starts from
        def __call__(self) -> None:
            seen.append({n: p.detach().clone() for n, p in peft.named_parameters() if p.requires_grad})

    snap = Snapshot()
    original = trainer.training_step

    def step(*a, **k):
        snap()
        return original(*a, **k)

    trainer.training_step = step
    trainer.train()
    logs = [h for h in trainer.state.log_history if "kl_p95" in h]
    assert len(logs) == 3 and logs[0]["kl_max"] == 0.0  # a zero LoRA B: the student is the base
    full = collate(rows.rows, pad_id=0)
    for adapter, log in zip(seen, logs, strict=True):
        with torch.no_grad():
            for n, p in peft.named_parameters():
                if n in adapter:
                    p.copy_(adapter[n])
        ref = summary(reference_kl(peft, full))
        for k, v in ref.items():
            assert log[k] == pytest.approx(v, rel=2e-4, abs=1e-7), (k, log[k], v)
    assert logs[-1]["kl_p95"] > 0
    metrics = trainer.evaluate()
    ref = summary(reference_kl(peft, full))
    for k, v in ref.items():
        assert metrics[f"eval_{k}"] == pytest.approx(v, rel=2e-4, abs=1e-7), k


def test_zero_adapter_reads_zero_kl_under_bf16_autocast(tmp_path) -> None:
    """bf16 mixed precision: the ref runs under the same autocast as the student, so a zero adapter reads 0."""
    torch.manual_seed(0)
    peft = get_peft_model(tiny_model("llama"), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    batch = make_batch(vocab=peft.config.vocab_size, B=4)
    trainer = HealTrainer(model=peft, args=args(tmp_path, max_steps=1, per_device_train_batch_size=4, bf16=True),
                          train_dataset=Rows(batch), data_collator=lambda f: collate(f, 0),
                          barrier=KLBarrier(agg="max", tau=0.0))  # fmt: skip
    trainer.train()
    log = trainer.state.log_history[0]
    assert log["kl_max"] == 0.0 and log["sft"] > 0


def test_refuses_a_model_without_adapter(tmp_path) -> None:
    with pytest.raises(ValueError, match="peft"):
        HealTrainer(model=tiny_model("llama"), args=args(tmp_path))


def test_refuses_labels_on_every_token(tmp_path) -> None:
    batch = make_batch()
    rows = Rows({**batch, "labels": batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)})
    peft = get_peft_model(tiny_model("llama"), LoraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match=r"collator \(function\) gives no completion mask"):
        HealTrainer(model=peft, args=args(tmp_path), train_dataset=rows, data_collator=lambda f: collate(f, 0))


def test_refuses_loss_options(tmp_path) -> None:
    peft = get_peft_model(tiny_model("llama"), LoraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="label_smoothing_factor=0.1 cannot be combined with the KL barrier"):
        HealTrainer(model=peft, args=args(tmp_path, label_smoothing_factor=0.1))


def test_gradient_accumulation_averages_the_micro_batch_objectives(tmp_path) -> None:
    """With 2 accumulation steps the update is that of (L(b1) + L(b2)) / 2, each L HealModule's per-micro-batch
    objective (SFT mean + barrier of that micro-batch), as under Lightning's accumulate_grad_batches."""
    torch.manual_seed(0)
    peft = get_peft_model(tiny_model("llama"), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                          init_lora_weights=False))  # fmt: skip
    batch = make_batch(vocab=peft.config.vocab_size, B=4)
    rows = Rows(batch)
    barrier = KLBarrier(agg="p95", tau=0.0, lam=3.0)

    class InOrder(HealTrainer):
        def _get_train_sampler(self, *args, **kwargs):
            return torch.utils.data.SequentialSampler(self.train_dataset)

    before = {n: p.detach().clone() for n, p in peft.named_parameters() if p.requires_grad}
    expected = HealTrainer(model=peft, args=args(tmp_path / "a"), barrier=barrier)
    peft.train()
    halves = [collate(rows.rows[:2], 0), collate(rows.rows[2:], 0)]
    loss = sum(expected.compute_loss(peft, h) for h in halves) / 2
    loss.backward()
    step = {n: -p.grad.clone() for n, p in peft.named_parameters() if p.requires_grad}
    peft.zero_grad()
    trainer = InOrder(model=peft, args=args(tmp_path / "b", max_steps=1, per_device_train_batch_size=2,
                                            gradient_accumulation_steps=2, optim="sgd", learning_rate=1.0,
                                            max_grad_norm=0.0),
                      train_dataset=rows, data_collator=lambda f: collate(f, 0), barrier=barrier)  # fmt: skip
    trainer.train()
    for n, p in peft.named_parameters():
        if n in step:
            torch.testing.assert_close(p.detach() - before[n], step[n], rtol=1e-5, atol=1e-7, msg=n)


@pytest.mark.parametrize(("kw", "match"), [({"round": -1}, "round=-1 must be >= 0"),
                                           ({"chunk_size": 0}, "chunk_size=0 must be an integer >= 1 or 'auto'"),
                                           ({"barrier": {"agg": "median"}}, "agg")])  # fmt: skip
def test_refuses_bad_barrier_arguments(kw, match, tmp_path) -> None:
    peft = get_peft_model(tiny_model("llama"), LoraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match=match):
        HealTrainer(model=peft, args=args(tmp_path), **kw)


def test_a_head_adapter_is_off_for_the_ref(tmp_path) -> None:
    """A LoRA on lm_head too: the ref reads the base head (adapter off), as the model's own disable_adapter does."""
    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"], init_lora_weights=False)
    peft = get_peft_model(tiny_model("llama"), config)
    batch = make_batch(vocab=peft.config.vocab_size, B=4)
    trainer = HealTrainer(model=peft, args=args(tmp_path), barrier=KLBarrier(agg="max", tau=0.0))
    peft.train()
    trainer.compute_loss(peft, batch)
    ref = summary(reference_kl(peft.eval(), batch))
    assert ref["kl_max"] > 0
    for k, v in ref.items():
        assert trainer._logged[k][0] == pytest.approx(v, rel=2e-4, abs=1e-7), k
