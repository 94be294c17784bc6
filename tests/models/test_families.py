"""The family matrix: every tiny family of ``heal_pl.models.families`` through each capability, checked against the
model's OWN logits (``model(...).logits``) in float64 — never against heal_pl's own head path.

Rows: llama, mistral, qwen2, qwen3, qwen3_5 (hybrid linear/full attention), gemma2 (soft-cap), gemma3 (sliding
window), olmo2, phi3 (fused projections), cohere (logit_scale), granite (logits_scaling), gpt2 (Conv1D, dropout).
Columns: HealModule's barrier KL / NLL (values and adapter gradients), KLBarrierCallback on a foreign module
(non-zero and zero adapter), the routed adapter at init, a steering vector's trajectory KL, and baking.
Forks are the hardware issue's work (sliding-window and linear-attention caches) and are not in this matrix.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model

from heal_pl.adapters.lora import LoRASpec
from heal_pl.adapters.routed import RoutedSpec, wrap_routed
from heal_pl.barrier.kl import KLBarrier
from heal_pl.callbacks import KLBarrierCallback
from heal_pl.models.families import FAMILIES
from heal_pl.models.load import tiny_model, tiny_tokenizer
from heal_pl.module import HealModule
from heal_pl.rounds.bake import bake_adapter
from heal_pl.steering.trajectory import measure_kl
from heal_pl.steering.vectors import SteeringVector
from tests.callbacks.test_kl_barrier import ForeignModule
from tests.helpers import make_batch

# explicit LoRA targets where the Llama-named defaults do not exist (the defaults are issue 12 part B's work)
TARGETS: dict[str, tuple[str, ...]] = {
    "phi3": ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"),
    "gpt2": ("c_attn", "c_proj", "c_fc"),
}
LLAMA_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ROUTED = [f for f in FAMILIES if f != "gpt2"]  # GPT-2 has Conv1D layers only: routed support is part B's work
VOCAB = 300  # make_batch's token range; every tiny family has a larger vocabulary


def targets(family: str) -> tuple[str, ...]:
    return TARGETS.get(family, LLAMA_NAMES)


def perturb(model: torch.nn.Module, seed: int, scale: float = 1.0) -> None:
    """A non-zero adapter: every lora_B drawn from N(0, scale²), seeded."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def own_stats(student_logits: torch.Tensor, ref_logits: torch.Tensor, labels: torch.Tensor):
    """float64 per-token KL(student ‖ ref) and NLL at the counted positions, from full logits."""
    lp = torch.log_softmax(student_logits[:, :-1].double(), -1)
    lq = torch.log_softmax(ref_logits[:, :-1].double(), -1)
    nxt = labels[:, 1:]
    keep = nxt != -100
    kl = (lp.exp() * (lp - lq)).sum(-1)[keep]
    nll = -lp.gather(-1, nxt.clamp_min(0).unsqueeze(-1)).squeeze(-1)[keep]
    return kl, nll


def assert_grads_close(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], rel: float = 1e-4) -> None:
    """Each adapter gradient within ``rel`` of its largest entry (float32 backprop through the model)."""
    assert got.keys() == expected.keys() and got
    for name in got:
        err, size = float((got[name] - expected[name]).abs().max()), float(expected[name].abs().max())
        assert size > 0 and err <= rel * size, f"{name}: max |Δgrad| {err:.3g} vs max |grad| {size:.3g}"


def adapter_grads(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.requires_grad and p.grad is not None}


@pytest.mark.parametrize("family", FAMILIES)
def test_barrier_kl_and_nll_equal_the_models_own_logits(family: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """HealModule.loss_terms (hidden rows → fused LM head) == float64 KL/NLL of model(...).logits, with grads, on the
    eager path and on the lazy one (heal_pl.barrier.lazy_head: the hinge is open, so its backward recomputes)."""
    from heal_pl.barrier import kl as kl_module
    from heal_pl.barrier.lazy_head import KLGradPlan

    paths: list[str] = []
    for name in ("FusedHeadStats", "LazyHeadStats"):
        original = getattr(kl_module, name).apply
        monkeypatch.setattr(getattr(kl_module, name), "apply",
                            lambda *a, _n=name, _o=original: paths.append(_n) or _o(*a))  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # the adapter's A: the same float32 rounding on every run
        module = HealModule(model=f"tiny-{family}", lora=LoRASpec(target_modules=targets(family)),
                            barrier=KLBarrier(agg="mean", tau=0.0))  # fmt: skip
    perturb(module.student, seed=1, scale=4.0)
    batch = make_batch(vocab=VOCAB)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    module.zero_grad()
    student_logits = module.student(**inputs).logits
    with torch.no_grad(), module.student.disable_adapter():
        ref_logits = module.student(**inputs).logits
    kl64, nll64 = own_stats(student_logits, ref_logits, batch["labels"])
    (nll64.mean() + kl64.mean()).backward()
    expected = adapter_grads(module)
    assert kl64.mean() > 5e-5, "the adapter must move the model (KL not trivially 0)"

    for lazy, path in ((False, "FusedHeadStats"), (True, "LazyHeadStats")):
        module.kl_grad_plan = KLGradPlan(lazy)
        module.zero_grad()
        paths.clear()
        loss, scalars, kl = module.loss_terms(batch)
        loss.backward()
        assert paths and set(paths) == {path}, f"the frozen head (its logit transform included) takes {path}"
        torch.testing.assert_close(kl.double(), kl64.detach(), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(scalars["sft"].double(), nll64.mean().detach(), rtol=1e-6, atol=1e-6)
        assert_grads_close(adapter_grads(module), expected)


def _foreign(family: str, seed: int | None) -> tuple[ForeignModule, KLBarrierCallback]:
    peft = get_peft_model(tiny_model(family), LoraConfig(r=4, lora_alpha=8, target_modules=list(targets(family))))
    if seed is not None:
        perturb(peft, seed, scale=4.0)
    foreign = ForeignModule(peft).train()
    cb = KLBarrierCallback(KLBarrier(agg="mean", tau=0.0, lam=1.0))
    cb.setup(None, foreign, "fit")  # type: ignore[arg-type]
    return foreign, cb


@pytest.mark.parametrize("family", FAMILIES)
def test_callback_on_a_foreign_module_equals_the_models_own_logits(family: str) -> None:
    """The wrapped training_step adds mean KL(captured student logits ‖ model's own base logits, eval mode)."""
    foreign, cb = _foreign(family, seed=2)
    batch = make_batch(seed=3, vocab=VOCAB)
    captured: list[torch.Tensor] = []
    handle = foreign.model.get_base_model().register_forward_hook(lambda m, a, out: captured.append(out.logits))
    try:
        torch.manual_seed(0)
        total = foreign.training_step(batch, 0)
    finally:
        handle.remove()
        cb.teardown(None, foreign, "fit")  # type: ignore[arg-type]
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad(), foreign.model.disable_adapter():
        ref_logits = copy.deepcopy(foreign.model).eval()(**inputs).logits  # the base, no dropout
    student_logits = captured[0]
    kl64, _ = own_stats(student_logits, ref_logits, batch["labels"])
    hf_loss = torch.nn.functional.cross_entropy(
        student_logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten(), ignore_index=-100)
    assert kl64.mean() > 5e-5
    torch.testing.assert_close((total - hf_loss).double(), kl64.mean(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_callback_with_a_zero_adapter_reads_zero(family: str) -> None:
    """A zero adapter in eval mode: the callback's KL is 0 (student = base, the ref through the same head)."""
    foreign, cb = _foreign(family, seed=None)
    foreign.eval()
    batch = make_batch(seed=4, vocab=VOCAB)
    try:
        out = foreign.model(**batch)
        value, scalars = cb.compute(batch, out.logits)
    finally:
        cb.teardown(None, foreign, "fit")  # type: ignore[arg-type]
    assert float(scalars["kl_max"]) <= 1e-6, f"zero adapter reads max KL {float(scalars['kl_max'])}"


@pytest.mark.parametrize("family", ROUTED)
def test_routed_adapter_is_bit_identical_to_the_base_at_init(family: str) -> None:
    base = tiny_model(family)
    routed = copy.deepcopy(base)
    wrap_routed(routed, RoutedSpec(r=4, target_modules=targets(family)))
    ids = make_batch(vocab=VOCAB)["input_ids"]
    with torch.no_grad():
        assert torch.equal(routed(input_ids=ids).logits, base(input_ids=ids).logits)


@pytest.mark.parametrize("family", FAMILIES)
def test_steering_trajectory_kl_equals_the_models_own_logits(family: str) -> None:
    """measure_kl's per-token KL == float64 KL of the steered vs unsteered model(...).logits on its tokens."""
    model, tok = tiny_model(family).eval(), tiny_tokenizer()
    vec = SteeringVector.fit(model, tok, ["I like green tea.", "We read a book."],
                             ["The cat sells bread.", "They clean the car."], "mean_diff", layers=0.5)  # fmt: skip
    prompt = "What is the capital of France?"
    result = measure_kl(model, tok, [prompt], vec, coeff=8.0, max_new_tokens=4, eos_token_id=[])
    prompt_ids = tok(prompt, add_special_tokens=False, return_tensors="pt").input_ids
    ids = torch.cat([prompt_ids, result.tokens[0].unsqueeze(0)], 1)
    n = result.tokens[0].numel()
    with torch.no_grad():
        with vec.steering(model, 8.0):
            steered = model(input_ids=ids).logits[:, -n - 1 : -1]
        base = model(input_ids=ids).logits[:, -n - 1 : -1]
    lp, lq = torch.log_softmax(steered.double(), -1), torch.log_softmax(base.double(), -1)
    kl64 = (lp.exp() * (lp - lq)).sum(-1)[0]
    assert n == 4 and kl64.max() > 1e-4
    torch.testing.assert_close(result.kl[0].double(), kl64, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_baking_equals_the_adapted_models_logits(family: str, tmp_path: Path) -> None:
    peft = get_peft_model(tiny_model(family), LoraConfig(r=4, lora_alpha=8, target_modules=list(targets(family))))
    perturb(peft, seed=5, scale=0.5)
    peft.eval().save_pretrained(tmp_path)
    baked = bake_adapter(tiny_model(family), tmp_path).eval()
    ids = make_batch(vocab=VOCAB)["input_ids"]
    with torch.no_grad():
        adapted, plain = peft(input_ids=ids).logits, baked(input_ids=ids).logits
        base = tiny_model(family).eval()(input_ids=ids).logits
    assert (adapted - base).abs().max() > 1e-3, "the adapter must change the logits"
    torch.testing.assert_close(plain, adapted, rtol=1e-4, atol=1e-5)
