"""The rounds' student as one base model and a stack of frozen adapters: the same numbers as the baked student,
the original model exactly with every adapter off, one copy of the base weights, only the fresh adapter trains."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from heal_pl.adapters.lora import FRESH, LoRASpec, wrap_lora
from heal_pl.adapters.switch import adapter_off
from heal_pl.models.lm import base_lm
from heal_pl.models.load import tiny_model, tiny_tokenizer
from heal_pl.rounds.bake import bake_history
from heal_pl.rounds.dilemmas import load_dilemmas, next_token_logits, probe_model
from heal_pl.rounds.loop import generate_texts
from heal_pl.rounds.stack import AdaptersView, history, load_stack, only_adapters, original, push_adapter
from heal_pl.steering.vectors import SteeringVector

FAMILIES = ["llama", "qwen2"]


def _saved_adapters(tmp_path: Path, family: str, n: int = 2) -> list[Path]:
    """``n`` random (non-zero) adapters on every block linear of the tiny ``family`` model, saved in peft format."""
    folders = []
    for i in range(n):
        config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(10 + i)
            get_peft_model(tiny_model(family), config).save_pretrained(tmp_path / f"round_{i:02d}")
        folders.append(tmp_path / f"round_{i:02d}")
    return folders


def _logits(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.randint(3, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(input_ids=ids).logits


def _trainable_adapters(model: torch.nn.Module) -> set[str]:
    return {n.split(".")[-2] for n, p in model.named_parameters() if p.requires_grad}


def _base_storages(model: torch.nn.Module) -> set[int]:
    """Where the base weights live (``data_ptr``), adapter tensors left out."""
    return {p.data_ptr() for n, p in base_lm(model).named_parameters() if "lora_" not in n}


@pytest.mark.parametrize("family", FAMILIES)
def test_stacked_student_equals_the_baked_student(family: str, tmp_path: Path) -> None:
    folders = _saved_adapters(tmp_path, family)
    stack = load_stack(tiny_model(family), folders).eval()
    baked = bake_history(tiny_model(family), folders).eval()
    assert isinstance(stack, PeftModel) and history(stack) == ["round_00", "round_01"]
    assert list(stack.active_adapters) == ["round_00", "round_01"]
    torch.testing.assert_close(_logits(stack), _logits(baked), atol=1e-5, rtol=1e-5)
    assert (_logits(stack) - _logits(tiny_model(family))).abs().max() > 1e-3, "the adapters change the model"


@pytest.mark.parametrize("family", FAMILIES)
def test_every_adapter_off_is_the_original_model_exactly(family: str, tmp_path: Path) -> None:
    stack = load_stack(tiny_model(family), _saved_adapters(tmp_path, family))
    module = wrap_lora(stack, LoRASpec(r=4))  # the fresh adapter of the next round, on
    with torch.no_grad():
        for p in (p for n, p in module.named_parameters() if f"lora_B.{FRESH}" in n):
            p.normal_(std=0.1, generator=torch.Generator().manual_seed(1))
    with original(module):
        off = _logits(module)
    assert torch.equal(off, _logits(tiny_model(family)))
    with original(tiny_model(family)):  # round 0: the plain model is the original
        assert torch.equal(_logits(tiny_model(family)), _logits(tiny_model(family)))


@pytest.mark.parametrize("family", FAMILIES)
def test_history_view_is_the_student_before_the_fresh_adapter(family: str, tmp_path: Path) -> None:
    folders = _saved_adapters(tmp_path, family)
    want = _logits(load_stack(tiny_model(family), folders).eval())  # S_2
    stack = wrap_lora(load_stack(tiny_model(family), folders), LoRASpec(r=4))
    with torch.no_grad():
        for p in (p for n, p in stack.named_parameters() if f"lora_B.{FRESH}" in n):
            p.normal_(std=0.1, generator=torch.Generator().manual_seed(1))
    view = AdaptersView(stack, history(stack))
    view.requires_grad_(False).eval()  # what HealModule.set_ref_model does: it must not freeze the student
    assert list(view.parameters()) == [] and _trainable_adapters(stack) == {FRESH}
    torch.testing.assert_close(_logits(view), want, atol=0, rtol=0)
    assert (_logits(stack.eval()) - want).abs().max() > 1e-3, "the fresh adapter is on in the student"
    ids = torch.randint(3, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    hidden = view.get_decoder()(input_ids=ids, attention_mask=None, use_cache=False).last_hidden_state
    assert torch.equal(base_lm(stack).lm_head(hidden), want)  # the ref's rows: last_hidden reads get_decoder


def test_only_the_fresh_adapter_trains_whatever_is_switched(tmp_path: Path) -> None:
    # peft's set_adapter and the end of disable_adapter mark every active adapter trainable; the stack's are frozen
    stack = wrap_lora(load_stack(tiny_model(), _saved_adapters(tmp_path, "llama")), LoRASpec(r=4))
    assert _trainable_adapters(stack) == {FRESH}
    assert list(stack.active_adapters) == ["round_00", "round_01", FRESH]
    with adapter_off(stack):
        pass
    with only_adapters(stack, ["round_00"]):
        assert list(stack.active_adapters) == ["round_00"]
    with original(stack):
        pass
    assert _trainable_adapters(stack) == {FRESH} and list(stack.active_adapters) == ["round_00", "round_01", FRESH]
    with pytest.raises(ValueError, match="already has an adapter named"):
        wrap_lora(stack, LoRASpec(r=4))


def test_push_adapter_replaces_the_fresh_adapter_by_its_saved_copy(tmp_path: Path) -> None:
    folders = _saved_adapters(tmp_path, "llama", n=1)
    stack = wrap_lora(load_stack(tiny_model(), folders), LoRASpec(r=4, dropout=0.1))
    stack.save_pretrained(tmp_path / "fresh", selected_adapters=[FRESH])
    pushed = push_adapter(stack, tmp_path / "fresh", 1)  # peft saves "default" at the top
    assert pushed is stack and history(pushed) == ["round_00", "round_01"] and FRESH not in pushed.peft_config
    assert not any(p.requires_grad for p in pushed.parameters())
    dropouts = [m.lora_dropout["round_01"] for m in pushed.modules() if hasattr(m, "lora_dropout")]
    assert dropouts and all(isinstance(d, torch.nn.Identity) for d in dropouts), "a fixed delta never drops out"
    with pytest.raises(ValueError, match="already in the stack"):
        push_adapter(pushed, folders[0], 0)
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        push_adapter(pushed, tmp_path, 2)


def test_one_copy_of_the_base_weights(tmp_path: Path) -> None:
    model = tiny_model()
    weights = _base_storages(model)
    stack = wrap_lora(load_stack(model, _saved_adapters(tmp_path, "llama")), LoRASpec(r=4))
    assert _base_storages(stack) == weights, "the stack adapts the model in place: no copy of a base weight"
    embedding = base_lm(AdaptersView(stack, history(stack)).stack).get_input_embeddings().weight
    assert embedding.data_ptr() == model.get_input_embeddings().weight.data_ptr()


@pytest.mark.parametrize("family", FAMILIES)
def test_probes_steering_and_sampling_match_the_baked_student(family: str, tmp_path: Path) -> None:
    folders = _saved_adapters(tmp_path, family)
    stack, baked = load_stack(tiny_model(family), folders), bake_history(tiny_model(family), folders)
    tok, dilemmas = tiny_tokenizer(), load_dilemmas()
    texts = dilemmas.prompts(tok)[:4]
    torch.testing.assert_close(next_token_logits(stack, tok, texts), next_token_logits(baked, tok, texts),
                               atol=1e-5, rtol=1e-5)  # fmt: skip
    for key, value in probe_model(stack, tok, dilemmas).items():
        assert value == pytest.approx(probe_model(baked, tok, dilemmas)[key], rel=1e-5, abs=1e-6), key
    pos, neg = ["I love it.", "Great!"], ["I hate it.", "Awful!"]
    vs, vb = (SteeringVector.fit(m, tok, pos, neg, "mean_diff") for m in (stack, baked))
    assert vs.layers == vb.layers
    for i in vs.layers:
        torch.testing.assert_close(vs.directions[i], vb.directions[i], atol=1e-5, rtol=1e-5)
    prompts = ["Hello there", "What is a cat?"]
    with vs.steering(stack, 4.0), vs.steering(baked, 4.0):
        assert generate_texts(stack, tok, prompts, 6) == generate_texts(baked, tok, prompts, 6)
