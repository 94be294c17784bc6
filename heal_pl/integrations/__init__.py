"""The KL barrier in other trainers: transformers' ``Trainer`` (:class:`HealTrainer`, :class:`KLBarrierMixin`) and
TRL's ``SFTTrainer`` (``from heal_pl.integrations.trl import HealSFTTrainer``; extra ``[trl]``)."""

from heal_pl.integrations.trainer import HealTrainer, KLBarrierMixin

__all__ = ["HealTrainer", "KLBarrierMixin"]
