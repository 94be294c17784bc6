"""The KL barrier in TRL's ``SFTTrainer`` (``pip install 'heal_pl[trl]'``).

:class:`HealSFTTrainer` is ``SFTTrainer`` with :class:`heal_pl.integrations.trainer.KLBarrierMixin` in front: TRL
prepares the data (chat templates, prompt-completion, ``completion_only_loss``, ``assistant_only_loss``) and its
collator builds the labels; the mixin's ``compute_loss`` trains on SFT + the barrier at exactly the positions those
labels count. Why a subclass overriding ``compute_loss``: it is the one method TRL documents for changing the loss
(``compute_loss_func`` is deprecated there), it sees the collated batch with its masks, and everything else
(datasets, logging, checkpoints, ``accelerate`` launchers) stays TRL's own.
"""

from __future__ import annotations

import os
from typing import Any

from transformers import PreTrainedTokenizerBase
from trl import SFTTrainer

from heal_pl.data.datamodule import render
from heal_pl.data.formats import DEFAULT_TRAIN_FILE, read_examples
from heal_pl.integrations.trainer import KLBarrierMixin

KL_OPTIONS = ("beta", "kl_coef", "init_kl_coef")  # a KL penalty of TRL's own, in configs that carry one


class HealSFTTrainer(KLBarrierMixin, SFTTrainer):
    """``trl.SFTTrainer`` with the KL barrier on its peft model (:class:`KLBarrierMixin`: ``barrier``, ``round``,
    ``chunk_size``, keyword-only; everything else is ``SFTTrainer``'s).

    Example::

        trainer = HealSFTTrainer(model=model, args=SFTConfig("out", max_steps=100), train_dataset=dataset,
                                 peft_config=LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"),
                                 barrier=KLBarrier(agg="rmse", tau=1.0))
        trainer.train()
    """

    def refusals(self) -> list[tuple[str, bool, str]]:
        a: Any = self.args
        return [
            (f"loss_type={a.loss_type!r}", getattr(a, "loss_type", "nll") != "nll",
             "the SFT term is the plain NLL; use loss_type='nll'"),
            ("packing=True", bool(getattr(a, "packing", False)), "the ref forward needs padded rows; packing=False"),
            ("padding_free=True", bool(getattr(a, "padding_free", False)), "use padding_free=False"),
            *[(f"{k}={getattr(a, k, 0)}", bool(getattr(a, k, 0)), f"the barrier is the KL term; set {k} to 0")
              for k in KL_OPTIONS],
            *super().refusals(),
        ]  # fmt: skip

def prompt_completion(
    source: str | os.PathLike = DEFAULT_TRAIN_FILE, tokenizer: PreTrainedTokenizerBase | None = None
) -> list[dict[str, Any]]:
    """The rows of a heal_pl data file (any shape :func:`heal_pl.data.formats.parse_row` reads; default the bundled
    persona set) in TRL's prompt-completion format: ``SFTTrainer`` then trains on the completions only
    (``completion_only_loss``).

    Without ``tokenizer`` the rows are conversational, ``{"prompt": [messages], "completion": [{"role":
    "assistant", "content": ...}]}``, and TRL renders them with the chat template; its completion then also holds
    what the template writes after the assistant turn (ChatML: the newline after ``<|im_end|>``). With
    ``tokenizer`` they are TRL's standard rows, ``{"prompt": text, "completion": text}``, the prompt rendered with
    the tokenizer's chat template as ``heal fit`` renders it; TRL appends the EOS token, which gives the tokens
    ``heal fit`` trains on wherever the EOS ends the assistant turn (SmolLM2, Qwen: ``<|im_end|>``).

    Example:
        >>> prompt_completion()[0]["completion"][0]["role"]
        'assistant'
    """
    examples = read_examples(source)
    if tokenizer is None:
        return [{"prompt": e.prompt_messages, "completion": [{"role": "assistant", "content": e.completion}]}
                for e in examples]  # fmt: skip
    return [dict(zip(("prompt", "completion"), render(tokenizer, e.prompt_messages, e.completion), strict=True))
            for e in examples]  # fmt: skip
