"""Training data: the Lightning datamodule (``datamodule``), the row formats it reads (``formats``), the chat
turn ends (``turns``), question prompts (``prompts``), your own prompt files (``prompt_files``) and the bundled data
sets (``assets/``)."""

from heal_pl.data.datamodule import ASSETS, EpochShuffleSampler, HealDataModule

__all__ = ["ASSETS", "EpochShuffleSampler", "HealDataModule"]
