"""Wrapped models: gemma-3-4b-it loads as ``Gemma3ForConditionalGeneration`` (a SigLIP vision tower, a projector and
the decoder at ``model.language_model``), not as a ``*ForCausalLM``. ``tiny-gemma3_vl`` is that class around the tiny
gemma3 decoder (sliding window 8, 4 layers; :mod:`heal_pl.models.families`). It goes through what the text-only
families go through, each check against the model's OWN logits (the fork recompute reads them too):

* loading: ``AutoModelForCausalLM`` (``load_model``) gives the wrapper back; the alias round-trips through the cache;
* the family matrix of ``tests/models/test_families.py``: barrier KL / NLL and grads, the callback, the routed
  adapter, steering trajectory KL, baking;
* default adapter targets: the decoder's linear layers, never the vision tower's or the projector's;
* ``heal calibrate``: the KL statistics it reports equal a float64 reference (transformers' ``generate`` + logits);
* survival: the fork plan (packed, window 8; the decoder's attention kernel decides), fast forks == recompute
  (``tests/survival/test_forks_families.py``), ``heal survival`` end to end (``tests/survival/test_run_families.py``);
* ``heal rounds``: two rounds and the baked history, in ``tests/rounds/test_run.py`` (parametrized over this alias).
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from peft.tuners.lora import LoraLayer
from transformers import AutoModelForCausalLM, Gemma3ForConditionalGeneration

import heal_pl.survival.fork_cache as fork_cache
import tests.models.test_families as matrix
import tests.models.test_load as load_checks
import tests.survival.test_forks_families as forks_families
import tests.survival.test_run_families as survival_cli
from heal_pl.adapters.lora import LoRASpec, wrap_lora
from heal_pl.cli import main
from heal_pl.configs import FOLDER
from heal_pl.data.prompts import chat_prompt
from heal_pl.models.families import WRAPPED_FAMILIES
from heal_pl.models.lm import find_blocks
from heal_pl.models.load import load_model, load_tokenizer, resolve_model, tiny_model
from heal_pl.steering import SteeringVector, steer
from heal_pl.survival.fork_cache import fork_plan
from tests.adapters.test_targets import logits, peft_all_linear
from tests.steering.test_trajectory import T, reference

FAMILY = "gemma3_vl"
ALIAS = f"tiny-{FAMILY}"
VISION = ("model.vision_tower.", "model.multi_modal_projector.")


def borrowed(check: Callable[..., Any], request: pytest.FixtureRequest, *leading: Any) -> None:
    """Run another module's test ``check`` with ``leading`` for its first parameters, fixtures for the rest."""
    rest = list(inspect.signature(check).parameters)[len(leading) :]
    check(*leading, *(request.getfixturevalue(name) for name in rest))


def test_the_alias_is_the_wrapper_auto_model_for_causal_lm_gives_back(tmp_path: Path, request) -> None:
    assert FAMILY in WRAPPED_FAMILIES
    config = json.loads((Path(resolve_model(ALIAS)) / "config.json").read_text())
    assert config["architectures"] == ["Gemma3ForConditionalGeneration"] and "vision_config" in config
    model = load_model(ALIAS)  # AutoModelForCausalLM.from_pretrained, as for a gemma-3-4b-it folder
    assert type(model) is type(AutoModelForCausalLM.from_pretrained(resolve_model(ALIAS)))
    assert type(model) is Gemma3ForConditionalGeneration
    decoder = model.model.language_model
    assert model.get_decoder() is decoder and find_blocks(model) is decoder.layers and len(decoder.layers) == 4
    assert model.lm_head.weight is decoder.embed_tokens.weight  # tied, as gemma-3-4b-it's head is
    assert sum(p.numel() for n, p in model.named_parameters() if n.startswith(VISION)) > 0
    borrowed(load_checks.test_resolve_tiny_alias_caches, request, ALIAS)
    borrowed(load_checks.test_load_tokenizer_matches_tiny_tokenizer, request, ALIAS)


@pytest.mark.parametrize("check", [
    "test_barrier_kl_and_nll_equal_the_models_own_logits",
    "test_callback_on_a_foreign_module_equals_the_models_own_logits",
    "test_callback_with_a_zero_adapter_reads_zero",
    "test_routed_adapter_is_bit_identical_to_the_base_at_init",
    "test_steering_trajectory_kl_equals_the_models_own_logits",
    "test_baking_equals_the_adapted_models_logits",
])  # fmt: skip
def test_the_family_matrix(check: str, request) -> None:
    borrowed(getattr(matrix, check), request, FAMILY)


def test_default_targets_are_the_decoders_linear_layers_only() -> None:
    model = tiny_model(FAMILY).eval()
    want = logits(model)
    base = wrap_lora(model, LoRASpec()).get_base_model()
    adapted = {n for n, m in base.named_modules() if isinstance(m, LoraLayer)}
    every = peft_all_linear(FAMILY)  # peft's all-linear takes the vision tower and the projector as well
    assert any(n.startswith(VISION) for n in every)
    assert adapted == {n for n in every if n.startswith("model.language_model.layers.")}
    assert {int(n.split(".")[3]) for n in adapted} == set(range(4))
    assert torch.equal(logits(base), want)


def test_the_fork_plan_reads_the_decoders_own_attention_kernel(monkeypatch, caplog) -> None:
    model = tiny_model(FAMILY)
    plan = fork_plan(model)
    assert plan is not None and (plan.mode, plan.window, plan.mapping) == ("packed", 8, True)
    assert plan.kinds == ("sliding_attention",) * 3 + ("full_attention",)
    # the top-level config keeps "sdpa" when only the decoder's kernel changes: the decoder's decides
    model.set_attn_implementation({"text_config": "flex_attention"})
    assert model.config._attn_implementation == "sdpa"
    monkeypatch.setattr(fork_cache, "_LOGGED", set())
    with caplog.at_level(logging.INFO, logger="heal_pl"):
        assert fork_plan(model) is None
    assert "Gemma3ForConditionalGeneration" in caplog.text and "'flex_attention'" in caplog.text


def test_fast_forks_equal_the_recompute(request) -> None:
    borrowed(forks_families.test_fast_forks_equal_the_recompute, request, FAMILY)


@pytest.mark.parametrize("count", ["int", "tensor"])
def test_the_fork_at_the_last_token_reads_the_whole_cache(count: str, request) -> None:
    borrowed(forks_families.test_the_fork_at_the_last_token_reads_the_whole_cache, request, FAMILY, count)


def test_survival_cli(request) -> None:
    # the threshold: the tiny wrapper puts ≈ 0.0088 of its mass on the answers at fork 0 (the probe check needs half
    # its prompts at or above it)
    borrowed(survival_cli.test_survival_cli_on_sliding_window_and_hybrid_models, request, FAMILY, "packed", 0.008)


def test_calibrate_reports_the_kl_of_the_models_own_logits(tmp_path: Path) -> None:
    """Each prompt's steered greedy trajectory and float64 KL from transformers' ``generate`` and ``model(...).logits``
    (:func:`tests.steering.test_trajectory.reference`), pooled, through numpy: the stats ``calib.json`` reports."""
    main(["calibrate", "--config", str(FOLDER / "calibrate.yaml"), "--model", ALIAS, "--out_dir", str(tmp_path),
          "--n_fit", "3", "--n_calib", "2", "--n_audit", "2", "--max_new_tokens", str(T), "--max_iters", "4",
          "--target", "0.01", "--tol", "0.001", "--signs", "[1]"])  # fmt: skip
    saved = json.loads((tmp_path / "calib.json").read_text())
    result, questions = saved["results"]["+"], saved["questions"]
    assert result["converged"] and result["evaluations"] == len(result["history"]) >= 2
    model, tok = load_model(ALIAS).eval(), load_tokenizer(ALIAS)
    vec = SteeringVector.load(tmp_path / "vector.safetensors")
    for part, stats in (("calib", result["stats_star"]), ("audit", result["audit"])):
        kl = []
        for question in questions[part]:
            prompt = chat_prompt(tok, question, None)
            _, values, _ = reference(model, tok, prompt, lambda: steer(model, vec, result["coeff"]),
                                     contextlib.nullcontext, [tok.eos_token_id])  # fmt: skip
            kl.append(values.numpy())
        pooled = np.concatenate(kl)
        assert pooled.max() > 1e-3  # the steering moves the model
        for name, value in (("mean", pooled.mean()), ("p95", np.percentile(pooled, 95)), ("max", pooled.max())):
            assert stats[name] == pytest.approx(value, rel=1e-4, abs=1e-6), (part, name)
