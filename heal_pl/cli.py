"""The ``heal`` command: ``heal fit|validate|test --config configs/rmse.yaml`` (LightningCLI).

``main(args)`` takes the argument list, so tests call ``main(["fit", "--config", path, ...])``
in-process. ``model.model`` is linked to ``data.model``: the data module tokenizes with the model's
own tokenizer and cannot be pointed at another one by mistake.

Progress: on a terminal, Lightning's bar. When stdout is not a terminal (a file, a job scheduler) the bar
is off by default and :class:`heal_pl.callbacks.ProgressLog` writes a line every ``progress.every_n_steps``
steps (``--progress.every_n_steps 50``, ``--progress.when always|never``). heal_pl's log lines go to stdout.
"""

from __future__ import annotations

import importlib
import logging
import sys
from pathlib import Path
from typing import Any

import torch
from jsonargparse import CLI
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from heal_pl.callbacks.progress_log import ProgressLog
from heal_pl.data.datamodule import HealDataModule
from heal_pl.journal import config_changes
from heal_pl.module import HealModule


class HealCLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("model.model", "data.model")
        parser.add_lightning_class_args(ProgressLog, "progress")

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Parse, then refuse a ``--ckpt_path`` whose model settings differ from the config's: LightningCLI (≥ 2.5.5)
        would silently replace the config's values by the checkpoint's (a checkpoint of another model, another LoRA
        rank, ...). Checked here, before that replacement, on every Lightning version."""
        super().parse_arguments(parser, args)
        sub = self.config.get("subcommand")
        ckpt_path = self.config[sub].get("ckpt_path") if sub else None
        if ckpt_path and Path(ckpt_path).is_file():
            saved = torch.load(ckpt_path, weights_only=True, map_location="cpu").get("hyper_parameters", {})
            ours = self.config[sub]["model"].as_dict()
            common = [k for k in ours if k in saved]
            changes = config_changes(_flat({k: saved[k] for k in common}), _flat({k: ours[k] for k in common}))
            if changes:
                raise ValueError(f"ckpt_path={str(ckpt_path)!r} was written with other model settings: "
                                 + "; ".join(f"model.{c}" for c in changes)
                                 + ". Resume with the checkpoint's settings, or start a new run without ckpt_path")


def configure_logging() -> None:
    """heal_pl's INFO lines to stdout, where ``heal ... > log.txt`` sends them."""
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", stream=sys.stdout)


def _flat(d: dict[str, Any]) -> dict[str, Any]:
    """One level of nesting as dotted keys: ``{"lora": {"r": 4}}`` -> ``{"lora.r": 4}``."""
    return {f"{k}.{kk}" if isinstance(v, dict) else k: vv
            for k, v in d.items() for kk, vv in (v.items() if isinstance(v, dict) else [(None, v)])}  # fmt: skip


def build_cli(args: list[str] | None = None) -> HealCLI:
    """Parse ``args`` (default: ``sys.argv``), build model, data and trainer, run the subcommand."""
    configure_logging()
    return HealCLI(
        HealModule,
        HealDataModule,
        save_config_kwargs={"overwrite": True},
        trainer_defaults={"enable_progress_bar": sys.stdout.isatty()},  # off in files: ProgressLog writes lines
        args=args,
        parser_kwargs={"default_env": False},
    )


COMMANDS = {
    "calibrate": "heal_pl.steering.run:run_calibration",
    "survival": "heal_pl.survival.run:run_survival",
    "thresholds": "heal_pl.survival.thresholds:run_thresholds",
    "compare": "heal_pl.survival.compare:run_compare",
    "rounds": "heal_pl.rounds.run:run_rounds",
}


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``heal`` console script: fit/validate/test (LightningCLI) or a command of ``COMMANDS``."""
    argv = sys.argv[1:] if args is None else list(args)
    if argv and argv[0] in COMMANDS:
        configure_logging()
        module, name = COMMANDS[argv[0]].split(":")
        CLI(getattr(importlib.import_module(module), name), args=argv[1:], as_positional=False)
        return
    build_cli(argv)


if __name__ == "__main__":
    main()
