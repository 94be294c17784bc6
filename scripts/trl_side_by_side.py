"""The same barrier from ``heal fit`` and from TRL's ``SFTTrainer``: configs/rmse.yaml's job, both ways, side by side.

    python scripts/trl_side_by_side.py [--steps 36] [--config rmse]

Arm 1 is ``heal fit``'s objects (HealModule + HealDataModule in a Lightning Trainer, the config's precision, clip,
schedule and seed). Arm 2 is :class:`heal_pl.integrations.trl.HealSFTTrainer` given what a TRL user gives it: the
bundled persona set in TRL's standard prompt-completion format (the prompt rendered with the chat template, as
``heal fit`` renders it; TRL tokenizes, appends the EOS and builds the labels with ``completion_only_loss``), the
same LoRA at the same seed, the same optimizer, schedule and gradient clip. Two things are set to match and said
here: the data order (the Trainer draws its batches from heal's epoch sampler instead of its own shuffle) and the
schedule (heal's warm-up + cosine passed as the Trainer's scheduler). The script
first checks that TRL's token ids and counted positions equal heal's on every row, then prints, per step, both arms'
logged ``kl_rmse``, ``kl_p95``, ``kl_max``, ``barrier``, ``barrier_fired`` and the largest difference.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import lightning as L
import torch
import yaml
from datasets import Dataset
from trl import SFTConfig

from heal_pl.barrier.kl import KLBarrier
from heal_pl.data.datamodule import EpochShuffleSampler, HealDataModule
from heal_pl.integrations.trl import HealSFTTrainer, prompt_completion
from heal_pl.models.load import load_tokenizer
from heal_pl.module import HealModule, warmup_cosine

KEYS = ("kl_rmse", "kl_p95", "kl_max", "barrier", "barrier_fired", "sft")
CONFIGS = Path(__file__).resolve().parents[1] / "heal_pl" / "configs"


class Collect(L.Callback):
    """Each training step's logged ``train/*`` scalars."""

    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        m = trainer.callback_metrics
        self.rows.append({k: float(m[f"train/{k}"]) for k in KEYS})


class InHealOrder(HealSFTTrainer):
    """The batches of heal's epoch sampler (the data order is the one thing the two trainers draw differently)."""

    seed = 0

    def _get_train_sampler(self, *args, **kwargs):
        return EpochShuffleSampler(len(self.train_dataset), self.seed)


def heal_fit(cfg: dict, steps: int, seed: int) -> tuple[list[dict[str, float]], HealDataModule]:
    L.seed_everything(seed)
    module = HealModule(**cfg["model"])
    data = HealDataModule(**cfg.get("data", {}), model=cfg["model"]["model"])
    collect = Collect()
    t = cfg["trainer"]
    trainer = L.Trainer(max_steps=steps, precision=t.get("precision", "32-true"), accelerator="cpu", devices=1,
                        gradient_clip_val=t.get("gradient_clip_val"), limit_val_batches=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[collect], default_root_dir=tempfile.mkdtemp())  # fmt: skip
    trainer.fit(module, data)
    return collect.rows, data


def sft_trainer(cfg: dict, steps: int, seed: int) -> tuple[list[dict[str, float]], InHealOrder]:
    L.seed_everything(seed)
    module = HealModule(**cfg["model"])  # the same student, built the same way at the same seed: the same LoRA init
    peft, m = module.student, module.hparams
    d = cfg.get("data", {})
    opt = torch.optim.AdamW([p for p in peft.parameters() if p.requires_grad], lr=m.lr, weight_decay=m.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, m.warmup_steps, steps, m.min_lr_ratio))
    args = SFTConfig(tempfile.mkdtemp(), max_steps=steps, per_device_train_batch_size=d.get("batch_size", 8),
                     max_grad_norm=cfg["trainer"].get("gradient_clip_val") or 0.0, bf16=False,
                     gradient_checkpointing=False, logging_steps=1, report_to=[], save_strategy="no", use_cpu=True,
                     seed=seed, max_length=d.get("max_length", 256), dataset_num_proc=None)  # fmt: skip
    InHealOrder.seed = d.get("seed", 0)
    tok = load_tokenizer(m.model)
    trainer = InHealOrder(model=peft, args=args, train_dataset=Dataset.from_list(prompt_completion(tokenizer=tok)),
                          processing_class=tok, optimizers=(opt, sched),
                          barrier=KLBarrier(**m.barrier), round=m.round, chunk_size=m.chunk_size)  # fmt: skip
    trainer.train()
    return [{k: h[k] for k in KEYS} for h in trainer.state.log_history if "kl_p95" in h], trainer


def same_tokens(data: HealDataModule, trainer: InHealOrder) -> int:
    """Rows whose TRL token ids or labels differ from heal's (the script stops if any does)."""
    theirs = trainer.train_dataset
    if len(theirs) != len(data.train_set):
        raise SystemExit(f"TRL kept {len(theirs)} rows, heal {len(data.train_set)}")
    bad = 0
    for i, mine in enumerate(data.train_set):
        batch = trainer.data_collator([theirs[i]])
        labels = batch["labels"][0].tolist()
        bad += batch["input_ids"][0].tolist() != mine["input_ids"] or labels != mine["labels"]
    return bad


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="rmse")
    p.add_argument("--steps", type=int, default=36)
    a = p.parse_args(argv)
    cfg = yaml.safe_load((CONFIGS / f"{a.config}.yaml").read_text())
    seed = cfg.get("seed_everything", 0)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    heal, data = heal_fit(cfg, a.steps, seed)
    trl, trainer = sft_trainer(cfg, a.steps, seed)
    bad = same_tokens(data, trainer)
    print(f"token ids and labels: {len(data.train_set) - bad} of {len(data.train_set)} rows identical")
    if bad:
        raise SystemExit("TRL tokenizes the persona set differently: the two runs would not see the same data")
    print(f"\n{a.config}.yaml, {a.steps} steps, seed {seed}: heal fit | HealSFTTrainer (TRL "
          f"{__import__('trl').__version__})\n")
    print("| step | " + " | ".join(f"{k} fit | {k} TRL" for k in KEYS[:5]) + " |")
    print("|---" * (1 + 2 * 5) + "|")
    worst = dict.fromkeys(KEYS, 0.0)
    for i, (h, t) in enumerate(zip(heal, trl, strict=True), start=1):
        print(f"| {i} | " + " | ".join(f"{h[k]:.5g} | {t[k]:.5g}" for k in KEYS[:5]) + " |")
        for k in KEYS:
            worst[k] = max(worst[k], abs(h[k] - t[k]) / max(abs(h[k]), 1e-12))
    print("\nlargest relative difference over the steps: " + ", ".join(f"{k} {v:.1e}" for k, v in worst.items()))


if __name__ == "__main__":
    main()
