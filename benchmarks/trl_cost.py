"""Step time of HealSFTTrainer ÷ TRL's own SFTTrainer, every arm side by side in one process.

    OMP_NUM_THREADS=2 python benchmarks/trl_cost.py --batch 8 --steps 5

The baseline is TRL's SFTTrainer as its users run it: its ``compute_loss`` with TRL's own fused, chunked LM head
(the per-token log-probabilities without ``[B, T, V]`` logits), on the same peft LoRA. The arms, each a trainer on
its own copy of the model, all on the same collated batch of the bundled persona set (TRL's prompt-completion rows):

- ``trl sft``: ``SFTTrainer`` (the baseline);
- ``heal nll``: ``HealSFTTrainer`` with ``reg: nll`` (no barrier: heal's head path for the SFT term alone);
- ``heal closed``: the rmse barrier with ``tau`` above any KL (0 % fired: the ref's forward and KL values, no KL
  gradient);
- ``heal fired``: ``tau = 0`` (fired on every step: the KL's gradient too).

Each step is the trainer's own ``training_step`` (forward, loss, backward) plus an AdamW step; the arms alternate
step by step so machine noise hits all of them, one warm-up step then ``--steps`` timed ones (min / median / max).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import tempfile
import time

import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from trl import SFTConfig, SFTTrainer

from heal_pl.barrier.kl import KLBarrier
from heal_pl.integrations.trl import HealSFTTrainer, prompt_completion
from heal_pl.models.load import load_model, load_tokenizer


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=5)
    a = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tok = load_tokenizer(a.model)
    base = load_model(a.model)
    torch.manual_seed(0)
    peft = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    data = Dataset.from_list(prompt_completion(tokenizer=tok))
    args = SFTConfig(tempfile.mkdtemp(), per_device_train_batch_size=a.batch, bf16=False, report_to=[],
                     gradient_checkpointing=False, use_cpu=True, save_strategy="no", max_steps=1)  # fmt: skip
    arms = {
        "trl sft": (SFTTrainer, {}),
        "heal nll": (HealSFTTrainer, {"barrier": KLBarrier(reg="nll")}),
        "heal closed": (HealSFTTrainer, {"barrier": KLBarrier(agg="rmse", tau=1e9)}),
        "heal fired": (HealSFTTrainer, {"barrier": KLBarrier(agg="rmse", tau=0.0)}),
    }
    trainers = {}
    for name, (cls, extra) in arms.items():
        model = copy.deepcopy(peft)
        with torch.no_grad():  # a trained-looking adapter: nonzero KL
            for n, q in model.named_parameters():
                if "lora_B" in n:
                    q.copy_(torch.randn_like(q) * 0.01)
        trainers[name] = cls(model=model, args=args, train_dataset=data, processing_class=tok, **extra)
        trainers[name].create_optimizer_and_scheduler(num_training_steps=a.steps + 1)
        trainers[name].current_gradient_accumulation_steps = 1  # what Trainer.train sets before its steps
    some = next(iter(trainers.values()))
    batch = some.data_collator([some.train_dataset[i] for i in range(a.batch)])
    counted = int((batch["labels"][:, 1:] != -100).sum())
    times: dict[str, list[float]] = {name: [] for name in trainers}
    for step in range(a.steps + 1):
        for name, t in trainers.items():
            t.model.train()
            start = time.perf_counter()
            t.training_step(t.model, dict(batch))
            t.optimizer.step()
            t.optimizer.zero_grad()
            if step:
                times[name].append(time.perf_counter() - start)
    print(f"{a.model}, batch {a.batch} × {batch['input_ids'].shape[1]} tokens ({counted} counted), float32, "
          f"{torch.get_num_threads()} threads; {a.steps} timed steps per arm after 1 warm-up, arms alternated\n")
    base_median = statistics.median(times["trl sft"])
    print("| arm | min (s) | median (s) | max (s) | median ÷ trl sft |\n|---|---|---|---|---|")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"| {name} | {min(ts):.2f} | {med:.2f} | {max(ts):.2f} | {med / base_median:.2f} |")


if __name__ == "__main__":
    main()
