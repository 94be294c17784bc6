"""HealSFTTrainer: TRL's own data preparation and collator, HealModule's objective on the tokens TRL trains on."""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, PeftModel
from trl import SFTConfig

from heal_pl.barrier.kl import KLBarrier
from heal_pl.integrations.trl import HealSFTTrainer, prompt_completion
from heal_pl.models.load import load_model, load_tokenizer, tiny_model, tiny_tokenizer
from tests.integrations.test_trainer import reference_kl, summary

LORA = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])


def config(tmp_path, cls: type = SFTConfig, **kw) -> SFTConfig:
    kw = {"report_to": [], "use_cpu": True, "bf16": False, "gradient_checkpointing": False, "save_strategy": "no",
          "logging_steps": 1, "per_device_train_batch_size": 4, **kw}  # fmt: skip
    return cls(str(tmp_path), **kw)


def assert_logs_own_kl(trainer: HealSFTTrainer, peft: PeftModel, batch: dict) -> None:
    """One more training-mode loss on ``batch``: its logged statistics are the model's own KL (float64)."""
    trainer._logged.clear()
    peft.train()
    trainer.compute_loss(peft, batch)
    ref = summary(reference_kl(peft.eval(), batch))
    for k, v in ref.items():
        assert trainer._logged[k][0] == pytest.approx(v, rel=2e-4, abs=1e-7), k


def rows(n: int = 8) -> Dataset:
    return Dataset.from_list(prompt_completion()[:n])


@pytest.mark.parametrize("checkpointing", [False, True])
def test_counts_the_completion_tokens_trl_trains_on(checkpointing: bool, tmp_path) -> None:
    """The barrier reads exactly the positions TRL's collator labels (its completion_only_loss mask), and each
    step's KL is the model's own (float64, adapter on and off), also with TRL's gradient checkpointing."""
    torch.manual_seed(0)
    trainer = HealSFTTrainer(model=tiny_model("llama"), args=config(tmp_path, max_steps=2, learning_rate=5e-2,
                                                                    gradient_checkpointing=checkpointing),
                             train_dataset=rows(4), processing_class=tiny_tokenizer(), peft_config=LORA,
                             barrier=KLBarrier(agg="rmse", tau=0.0))  # fmt: skip
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    real = batch["attention_mask"].bool()
    assert (real & (batch["labels"] == -100)).any() and (batch["labels"] != -100).any()  # prompt out, completion in
    trainer.train()
    logs = [h for h in trainer.state.log_history if "kl_rmse" in h]
    assert len(logs) == 2 and logs[0]["kl_max"] == 0.0  # the first step starts from the zero adapter
    assert logs[1]["kl_max"] > 0
    peft = trainer.model
    assert isinstance(peft, PeftModel)
    # the adapter after the last step, against a third step's statistics on the same (only) batch
    assert_logs_own_kl(trainer, peft, batch)


GENERATION_TEMPLATE = (  # ChatML with the {% generation %} markers TRL's assistant_only_loss reads
    "{% for m in messages %}{% if m['role'] == 'assistant' %}{{ '<|im_start|>assistant\\n' }}{% generation %}"
    "{{ m['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}{% else %}"
    "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def test_counts_the_assistant_tokens_of_assistant_only_loss(tmp_path) -> None:
    """Conversations with two assistant turns: TRL's assistant mask leaves the user turns out, and the barrier's
    statistics are the model's own KL over exactly the assistant tokens."""
    tok = tiny_tokenizer()
    tok.chat_template = GENERATION_TEMPLATE
    talks = [{"messages": [{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": f"purr {i} purr"},
                           {"role": "user", "content": "more?"}, {"role": "assistant", "content": "meow"}]}
             for i in range(4)]  # fmt: skip
    torch.manual_seed(0)
    trainer = HealSFTTrainer(model=tiny_model("llama"), args=config(tmp_path, max_steps=1, assistant_only_loss=True),
                             train_dataset=Dataset.from_list(talks), processing_class=tok, peft_config=LORA,
                             barrier=KLBarrier(agg="max", tau=0.0))  # fmt: skip
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    counted = tok.decode(batch["input_ids"][batch["labels"] != -100])
    assert "purr" in counted and "meow" in counted and "hi" not in counted and "more?" not in counted
    trainer.train()
    peft = trainer.model
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn_like(p) * 0.3)  # a nonzero adapter, so the statistics differ by position
    assert_logs_own_kl(trainer, peft, batch)


def test_refuses_data_without_a_completion_mask(tmp_path) -> None:
    text = Dataset.from_list([{"text": "plain language-modelling text, no prompt"}] * 4)
    with pytest.raises(ValueError, match=r"collator \(DataCollatorForLanguageModeling\) gives no completion mask"):
        HealSFTTrainer(model=tiny_model("llama"), args=config(tmp_path), train_dataset=text,
                       processing_class=tiny_tokenizer(), peft_config=LORA)  # fmt: skip


@dataclasses.dataclass
class KLConfig(SFTConfig):
    """A TRL config carrying TRL's own KL coefficient (GKD's and DPO's ``beta``)."""

    beta: float = 0.1


@pytest.mark.parametrize(("cls", "kw", "match"), [
    (SFTConfig, {"loss_type": "dft"}, "loss_type='dft' cannot be combined with the KL barrier"),
    (SFTConfig, {"packing": True}, "packing=True cannot be combined"),
    (KLConfig, {}, "beta=0.1 cannot be combined with the KL barrier"),
])  # fmt: skip
def test_refuses_trl_loss_options(cls, kw, match, tmp_path) -> None:
    with pytest.raises(ValueError, match=match):
        HealSFTTrainer(model=tiny_model("llama"), args=config(tmp_path, cls, **kw), train_dataset=rows(4),
                       processing_class=tiny_tokenizer(), peft_config=LORA)  # fmt: skip


def test_refuses_a_model_without_adapter(tmp_path) -> None:
    with pytest.raises(ValueError, match="peft"):
        HealSFTTrainer(model=tiny_model("llama"), args=config(tmp_path), train_dataset=rows(4),
                       processing_class=tiny_tokenizer())  # fmt: skip


@pytest.mark.slow
def test_sft_trainer_on_smollm2_logs_the_saved_adapters_kl(tmp_path) -> None:
    """A real SFTTrainer run on the embedded SmolLM2 and the bundled persona set in TRL's prompt-completion format:
    every logged step's KL statistics equal a float64 recomputation, with the model's own forward, from the adapter
    TRL saved at the step before (one batch, so every step sees the same tokens)."""
    model, tok = load_model("smollm2-135m-instruct"), load_tokenizer("smollm2-135m-instruct")
    torch.manual_seed(0)
    steps = 3
    trainer = HealSFTTrainer(model=model, args=config(tmp_path, max_steps=steps, learning_rate=2e-3,
                                                      save_strategy="steps", save_steps=1),
                             train_dataset=rows(4), processing_class=tok, peft_config=LORA,
                             barrier=KLBarrier(agg="p95", tau=0.0))  # fmt: skip
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    trainer.train()
    logs = [h for h in trainer.state.log_history if "kl_p95" in h]
    assert len(logs) == steps and logs[0]["kl_max"] == 0.0 and logs[-1]["kl_p95"] > 1e-4  # the adapter moved
    base = trainer.model.get_base_model()
    for step, log in enumerate(logs[1:], start=1):
        saved = PeftModel.from_pretrained(base, os.path.join(tmp_path, f"checkpoint-{step}"), adapter_name=f"s{step}")
        saved.set_adapter(f"s{step}")
        ref = summary(reference_kl(saved.eval(), batch))
        for k, v in ref.items():
            assert log[k] == pytest.approx(v, rel=1e-3, abs=1e-6), (step, k, log[k], v)
        assert log["barrier"] == pytest.approx(ref["kl_p95"], rel=1e-3)
        saved.unload()


@pytest.mark.slow
def test_readme_example_runs_as_written(tmp_path, monkeypatch) -> None:
    """The README's SFTTrainer example (after ``<!-- ci: trl -->``), run as written from an empty folder."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    code = re.search(r"<!-- ci: trl -->\n```python\n(.*?)^```", readme, re.S | re.M).group(1)
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, "README.md (ci: trl)", "exec"), scope)
    logs = [h for h in scope["trainer"].state.log_history if "kl_rmse" in h]
    assert len(logs) == 2 and logs[0]["kl_max"] == 0.0 and logs[1]["kl_max"] > 0
    assert list(Path("runs/trl").rglob("events.out.tfevents.*"))  # report_to="tensorboard" wrote its file
