"""The ``heal`` command: ``heal fit|validate|test --config configs/rmse.yaml`` (LightningCLI).

``main(args)`` takes the argument list, so tests call ``main(["fit", "--config", path, ...])``
in-process. ``model.model`` is linked to ``data.model``: the data module tokenizes with the model's
own tokenizer and cannot be pointed at another one by mistake.
"""

from __future__ import annotations

import logging

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from heal_pl.data import HealDataModule
from heal_pl.module import HealModule


class HealCLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("model.model", "data.model")


def build_cli(args: list[str] | None = None) -> HealCLI:
    """Parse ``args`` (default: ``sys.argv``), build model, data and trainer, run the subcommand."""
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    return HealCLI(
        HealModule,
        HealDataModule,
        save_config_kwargs={"overwrite": True},
        args=args,
        parser_kwargs={"default_env": False},
    )


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``heal`` console script."""
    build_cli(args)


if __name__ == "__main__":
    main()
