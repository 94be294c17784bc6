"""Shared test helpers: hand-built batches, "lively" tiny models, and the one-line error of a ``heal`` command."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

from heal_pl.models.load import tiny_model, tiny_tokenizer


def make_batch(seed: int = 0, B: int = 3, T: int = 14, vocab: int = 300) -> dict[str, torch.Tensor]:
    """Prompt tokens (-100), completion tokens, and right padding (-100, attention 0)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (B, T), generator=g)
    labels, mask = ids.clone(), torch.ones_like(ids)
    labels[:, :4] = -100
    labels[1, 10:] = -100
    mask[1, 10:] = 0
    ids[1, 10:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def lively(style: str = "llama", vocab_size: int | None = None) -> nn.Module:
    """A tiny model with weights ×10: random-init logits are nearly flat and greedy text repeats one token;
    sharper logits give varied trajectories, so EOS and truncation can be tested on real generations.
    ``gpt2`` has absolute position embeddings: left padding must not shift a prompt's positions."""
    if style == "gpt2":
        vocab = vocab_size or len(tiny_tokenizer())
        config = GPT2Config(vocab_size=vocab, n_embd=64, n_layer=2, n_head=4, n_positions=256, bos_token_id=None,
                            eos_token_id=2, pad_token_id=0)  # fmt: skip
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = GPT2LMHeadModel(config)
    else:
        model = tiny_model(style, vocab_size=vocab_size)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(10)
    return model.eval()


def lively_peft(seed: int = 3) -> PeftModel:
    """``lively()`` with a random (non-zero) LoRA adapter on q, v and down projections, in eval mode."""
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return get_peft_model(lively(), config).eval()


def one_line_error(err: str, command: str) -> str:
    """The error line of ``heal <command>`` in its stderr ``err``: the last line, ``heal <command>: error: ...``, with
    no traceback before it (what comes before are the libraries' own lines, e.g. a model's loading bar)."""
    last = err.rstrip("\n").splitlines()[-1] if err.strip() else ""
    assert last.startswith(f"heal {command}: error: ") and "Traceback" not in err, err[-2000:]
    return last


def heal_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """``heal <argv>`` in-process must refuse a bad input the command-line way: exit status 2 and one line on stderr
    (:func:`one_line_error`), which is returned."""
    from heal_pl.cli import main

    capsys.readouterr()  # what the test printed before
    with pytest.raises(SystemExit) as done:
        main(argv)
    assert done.value.code == 2, f"exit status {done.value.code}"
    return one_line_error(capsys.readouterr().err, argv[0])


@contextlib.contextmanager
def largest_vocab_rows(vocab: int) -> Iterator[dict[str, int]]:
    """Inside the block, the most rows (all dimensions but the last) of any ``[..., vocab]`` log-softmax
    (``torch.log_softmax``) and head product (``F.linear`` / ``torch.mm``); both functions are restored on exit."""
    seen = {"log_softmax": 0, "head": 0}

    def record(kind: str, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] == vocab:
            seen[kind] = max(seen[kind], x.numel() // vocab)
        return x

    log_softmax, linear, mm = torch.log_softmax, torch.nn.functional.linear, torch.mm
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch, "log_softmax", lambda *a, **k: record("log_softmax", log_softmax(*a, **k)))
        patch.setattr(torch.nn.functional, "linear", lambda *a, **k: record("head", linear(*a, **k)))
        patch.setattr(torch, "mm", lambda *a, **k: record("head", mm(*a, **k)))
        yield seen
