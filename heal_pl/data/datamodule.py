r"""Chat data: rows -> token ids with an exact completion mask -> right-padded batches (docs/maths.md §1.2).

Rows come from a JSONL file or anything the Hugging Face ``datasets`` library reads (a ``save_to_disk``
folder, parquet / JSON files, a Hub name), in TRL's or heal_pl's shapes: ``messages``, or a
``prompt`` / ``completion`` pair whose sides are strings or lists of chat messages (``heal_pl.data.formats``).

Encoding. Prompt text = ``tokenizer.apply_chat_template(messages, add_generation_prompt=True,
tokenize=False)``. Prompt and completion are tokenized separately (``add_special_tokens=False``) and
concatenated, so no BPE merge crosses the boundary; the completion ends with the tokens that close an
assistant turn in the chat template (``<|im_end|>`` for ChatML, ``<|eot_id|>`` for Llama-3, ``<end_of_turn>``
for Gemma: ``heal_pl.data.turns.turn_end_ids``; the eos without a template), so the model learns to stop as its
chat format stops. ``labels`` follow Hugging Face (aligned with ``input_ids``; the model shifts):
-100 on prompt tokens, the token id on completion tokens. An empty completion (or one of whitespace only) would
leave the turn end as its only completion tokens (teaching "answer nothing"): :class:`HealDataModule` refuses such
rows, naming their count and the first one's line, unless ``allow_empty_completions=True``, which logs their count.

Without a chat template (``tokenizer.chat_template is None``; logged once per tokenizer) the prompt is
plain text, one ``Role: content`` block per message, then the answer cue, e.g.
``"System: {system}\n\nUser: {question}\n\nAssistant:"``, and the completion is tokenized as
``" " + completion`` (unless empty or starting with whitespace), so its first word gets the
space-prefixed token it has inside a sentence.

Truncation to ``max_length`` = L, with P prompt tokens, C completion tokens (turn end included),
k = min(C, L // 4):

1. P + C <= L: keep everything.
2. otherwise, if L - P >= k: keep the whole prompt; cut the completion at its END to L - P tokens
   (the turn end is lost: the model is not taught to stop there).
3. otherwise: keep the first k completion tokens and the LAST L - k prompt tokens (the prompt is cut
   from its left, so the question right before the answer survives).

At least one completion token always survives. ``len(labels) == len(input_ids)`` and ``labels[i]`` is
``input_ids[i]`` or -100. :class:`HealDataModule` logs one warning per ``setup`` with the numbers of cut
prompts and completions; a row left without a completion token is dropped with a warning, never silently.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Iterator
from functools import partial
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Sampler
from transformers import PreTrainedTokenizerBase

from heal_pl.barrier.positions import IGNORE_INDEX
from heal_pl.data.formats import (  # noqa: F401 (re-exported)
    ASSETS,
    DEFAULT_TRAIN_FILE,
    DEFAULT_VAL_FILE,
    ROW_SHAPES,
    Example,
    jsonl_rows,
    read_examples,
    source_problem,
)
from heal_pl.data.turns import turn_end_ids
from heal_pl.resume import data_state, resume_point

log = logging.getLogger("heal_pl")

_fallback_logged: set[str] = set()


# --------------------------------------------------------------------------- encoding


def truncation_lengths(n_prompt: int, n_completion: int, max_length: int) -> tuple[int, int]:
    """How many prompt and completion tokens survive (the rule in the module docstring)."""
    if n_prompt + n_completion <= max_length:
        return n_prompt, n_completion
    k = min(n_completion, max_length // 4)
    if max_length - n_prompt >= k:
        return n_prompt, max_length - n_prompt
    return max_length - k, k


def render(tok: PreTrainedTokenizerBase, messages: list[dict[str, str]], completion: str) -> tuple[str, str]:
    """(prompt text, completion text) with the chat template, or the plain fallback format."""
    if getattr(tok, "chat_template", None) is not None:
        return tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False), completion
    name = getattr(tok, "name_or_path", "") or type(tok).__name__
    if name not in _fallback_logged:
        _fallback_logged.add(name)
        log.info("tokenizer %s has no chat template; using the plain 'User: ...\\n\\nAssistant:' format", name)
    blocks = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
    if completion and not completion[0].isspace():
        completion = " " + completion
    return "\n\n".join([*blocks, "Assistant:"]), completion


def encode_example(
    tokenizer: PreTrainedTokenizerBase,
    example: Example,
    max_length: int,
    system_prompt: str | None = None,
    counts: Counter[str] | None = None,
) -> dict[str, list[int]] | None:
    """``{"input_ids", "labels"}`` of one example, or None when no completion token survives.

    ``system_prompt`` is prepended as a system message when the example has none. ``counts`` (optional)
    is incremented at ``prompt_cut``, ``completion_cut`` and ``dropped``.
    """
    messages = example.prompt_messages
    if system_prompt is not None and not any(m["role"] == "system" for m in messages):
        messages = [{"role": "system", "content": system_prompt}, *messages]
    prompt_text, completion_text = render(tokenizer, messages, example.completion)
    prompt = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    completion = [*tokenizer(completion_text, add_special_tokens=False)["input_ids"], *turn_end_ids(tokenizer)]
    n_prompt, n_completion = truncation_lengths(len(prompt), len(completion), max_length)
    counts = counts if counts is not None else Counter()
    counts["prompt_cut"] += n_prompt < len(prompt)
    counts["completion_cut"] += n_completion < len(completion)
    if n_completion < 1:
        counts["dropped"] += 1
        return None
    prompt, completion = prompt[len(prompt) - n_prompt:], completion[:n_completion]
    return {"input_ids": prompt + completion, "labels": [IGNORE_INDEX] * len(prompt) + completion}


def collate(features: list[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest row: ``input_ids`` (pad_id), ``attention_mask`` (1 = real), ``labels`` (-100)."""
    if not features:
        raise ValueError("collate got an empty list of features")
    width = max(len(f["input_ids"]) for f in features)
    input_ids = torch.full((len(features), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    for i, f in enumerate(features):
        n = len(f["input_ids"])
        input_ids[i, :n] = torch.tensor(f["input_ids"], dtype=torch.long)
        attention_mask[i, :n] = 1
        labels[i, :n] = torch.tensor(f["labels"], dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


class EpochShuffleSampler(Sampler[int]):
    """Epoch ``e`` visits ``torch.randperm(n, generator=Generator().manual_seed(seed + e))``.

    Lightning calls ``set_epoch`` at the start of every epoch (also after resuming from a checkpoint),
    so the order depends on ``(seed, epoch)`` only. ``resume=(epoch, skip)`` (a run resumed mid-epoch,
    :mod:`heal_pl.resume`) drops the first ``skip`` indices of that epoch's permutation, once; ``len`` stays
    ``n``, as Lightning counts the skipped batches as done. Under DDP Lightning swaps in its own distributed
    sampler.
    """

    def __init__(self, n: int, seed: int = 0, resume: tuple[int, int] | None = None) -> None:
        self.n, self.seed, self.epoch, self.resume = n, seed, 0, resume

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        skip = self.resume[1] if self.resume is not None and self.resume[0] == self.epoch else 0
        self.resume = None
        yield from torch.randperm(self.n, generator=generator).tolist()[skip:]

    def __len__(self) -> int:
        return self.n


# --------------------------------------------------------------------------- data module


class HealDataModule(L.LightningDataModule):
    """Prompt/completion chat data, tokenized with the model's tokenizer (module docstring: the rules).

    Args:
        train_file: training rows: a JSONL file, a ``save_to_disk`` folder, a parquet / JSON / arrow / CSV file or a
            Hugging Face dataset name, with an optional ``:split`` (``heal_pl.data.formats``); None = the bundled
            persona set ``heal_pl/data/assets/persona_train.jsonl``
            (whose held-out ``persona_val.jsonl`` is then the validation set unless ``val_file`` is given).
        val_file: validation rows, the same kinds of source; when given, ``val_fraction`` is ignored.
        val_fraction: share of the training rows held out for validation when there is no ``val_file``,
            a seeded random pick of at least one row (0 = no validation: ``val_dataloader`` returns ``[]``).
        model: model alias, folder or Hugging Face id whose tokenizer is used (linked to the module's).
        max_length: token budget of one row, prompt + completion + turn end.
        batch_size: rows per batch.
        num_workers: DataLoader worker processes.
        system_prompt: system message prepended to rows that have none.
        seed: seed of the validation split and of the per-epoch shuffle.
        max_examples: read only the first N rows of each file (quick runs).
        allow_empty_completions: train rows whose completion is empty or whitespace on the turn end alone (logged
            with their count); False = refuse them, naming the count and the first row.

    Raises:
        ValueError: an argument is out of range or a file does not exist (all problems in one message); in
            ``setup``, a row is malformed or (without ``allow_empty_completions``) has an empty completion.

    Example::

        dm = HealDataModule(model="tiny-llama", max_length=128, batch_size=4)
        trainer.fit(HealModule(model="tiny-llama"), datamodule=dm)

    Tests inject a tokenizer with ``dm.set_tokenizer(tok)`` before ``setup``. ``test_dataloader`` is the
    validation loader.
    """

    def __init__(
        self,
        train_file: str | None = None,
        val_file: str | None = None,
        val_fraction: float = 0.1,
        model: str = "smollm2-135m-instruct",
        max_length: int = 256,
        batch_size: int = 8,
        num_workers: int = 0,
        system_prompt: str | None = None,
        seed: int = 0,
        max_examples: int | None = None,
        allow_empty_completions: bool = False,
    ) -> None:
        super().__init__()
        checks = [
            (batch_size >= 1, f"batch_size={batch_size} must be >= 1"),
            (max_length >= 8, f"max_length={max_length} must be >= 8"),
            (0 <= val_fraction < 1, f"val_fraction={val_fraction} must be in [0, 1)"),
            (num_workers >= 0, f"num_workers={num_workers} must be >= 0"),
            (max_examples is None or max_examples >= 1, f"max_examples={max_examples} must be >= 1 or None (all rows)"),
        ]
        checks += [(False, p) for p in (source_problem("train_file", train_file), source_problem("val_file", val_file))
                   if p]
        problems = [msg for ok, msg in checks if not ok]
        if problems:
            raise ValueError("HealDataModule: " + "; ".join(problems))
        self.save_hyperparameters()
        self.tokenizer: PreTrainedTokenizerBase | None = None
        self.train_set: list[dict[str, list[int]]] = []
        self.val_set: list[dict[str, list[int]]] = []
        self._ready = False
        self._train_sampler: EpochShuffleSampler | None = None
        self._resume: tuple[int, int] | None = None  # (epoch, indices to skip) from a mid-epoch checkpoint

    def set_tokenizer(self, tokenizer: PreTrainedTokenizerBase) -> HealDataModule:
        """Use ``tokenizer`` instead of loading the model's (call before ``setup``)."""
        self.tokenizer, self._ready = tokenizer, False
        return self

    def _read(self, path: str | os.PathLike) -> list[Example]:
        return read_examples(path)[: self.hparams.max_examples]

    def split(self) -> tuple[list[Example], list[Example]]:
        """(train, validation) examples, before tokenization; deterministic in ``seed``."""
        hp = self.hparams
        train = self._read(hp.train_file or DEFAULT_TRAIN_FILE)
        if hp.val_file is not None or (hp.train_file is None and DEFAULT_VAL_FILE.is_file()):
            return train, self._read(hp.val_file or DEFAULT_VAL_FILE)
        n = len(train)
        n_val = 0 if hp.val_fraction == 0 or n < 2 else min(n - 1, max(1, round(hp.val_fraction * n)))
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(hp.seed)).tolist()
        held = set(perm[:n_val])
        return [e for i, e in enumerate(train) if i not in held], [e for i, e in enumerate(train) if i in held]

    def setup(self, stage: str | None = None) -> None:
        if self._ready:
            return
        hp = self.hparams
        if self.tokenizer is None:
            from heal_pl.models.load import load_tokenizer

            self.tokenizer = load_tokenizer(hp.model)
        if self.tokenizer.pad_token_id is None:
            raise ValueError(f"the tokenizer of model={hp.model!r} has no pad token; set one before setup")
        train, val = self.split()
        if not train:
            raise ValueError(f"train_file={hp.train_file or str(DEFAULT_TRAIN_FILE)!r} has no rows")
        self._check_completions(train + val)
        counts: Counter[str] = Counter()
        self.train_set, self.val_set = self._encode(train, "train", counts), self._encode(val, "val", counts)
        if counts["prompt_cut"] or counts["completion_cut"]:
            log.warning(
                "max_length=%d cut %d prompts (from the left) and %d completions (at the end) of %d rows",
                hp.max_length, counts["prompt_cut"], counts["completion_cut"], len(train) + len(val),
            )
        log.info("data: %d train rows, %d validation rows", len(self.train_set), len(self.val_set))
        self._ready = True

    def _check_completions(self, examples: list[Example]) -> None:
        """Refuse (or, with ``allow_empty_completions``, log) the rows whose completion is empty or whitespace."""
        empty = [e for e in examples if not e.completion.strip()]
        if not empty:
            return
        if not self.hparams.allow_empty_completions:
            raise ValueError(
                f"{len(empty)} of {len(examples)} rows have an empty completion (the first: {empty[0].where}); "
                "they would teach nothing but the turn end. Fix or drop them, or keep them with "
                "allow_empty_completions=True (--data.allow_empty_completions true)"
            )
        log.info("data: %d rows with an empty completion are trained on the turn end alone "
                 "(allow_empty_completions)", len(empty))  # fmt: skip

    def _encode(self, examples: list[Example], split: str, counts: Counter[str]) -> list[dict[str, list[int]]]:
        out = []
        for i, example in enumerate(examples):
            features = encode_example(self.tokenizer, example, self.hparams.max_length, self.hparams.system_prompt,
                                      counts)
            if features is None:
                log.warning("dropped %s row %d: no completion token fits in max_length", split, i)
            else:
                out.append(features)
        return out

    def _loader(self, rows: list[dict[str, list[int]]], sampler: Sampler[int] | None = None) -> DataLoader:
        if not self._ready:
            raise RuntimeError("HealDataModule.setup() has not run")
        workers = self.hparams.num_workers
        return DataLoader(
            rows, batch_size=self.hparams.batch_size, sampler=sampler, shuffle=False, num_workers=workers,
            collate_fn=partial(collate, pad_id=self.tokenizer.pad_token_id), persistent_workers=workers > 0,
            generator=torch.Generator().manual_seed(self.hparams.seed),  # iterators draw nothing from the global RNG
        )

    def train_dataloader(self) -> DataLoader:
        self._train_sampler = EpochShuffleSampler(len(self.train_set), self.hparams.seed, self._resume)
        self._resume = None
        return self._loader(self.train_set, self._train_sampler)

    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        return self._loader(self.val_set) if self.val_set else []

    def test_dataloader(self) -> DataLoader | list[DataLoader]:
        return self.val_dataloader()

    # ------------------------------------------------------------------ exact resume (heal_pl.resume)

    def _settings(self) -> dict[str, int]:
        return {"seed": self.hparams.seed, "batch_size": self.hparams.batch_size, "n_train": len(self.train_set)}

    def state_dict(self) -> dict[str, Any]:
        """The data position (epoch, finished batches) and settings, saved in every checkpoint written while fitting."""
        return data_state(self.trainer, self._train_sampler, self._settings())

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """A mid-epoch checkpoint: the next train loader skips the batches its run had finished (see
        :func:`heal_pl.resume.resume_point`, which raises when the data settings changed)."""
        self._resume = resume_point(state, self._settings(), self.trainer.world_size if self.trainer else 1)
