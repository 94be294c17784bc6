"""The head contract (heal_pl.models.lm): LMHead reproduces model(...).logits, the guard, lm_head adapters, dropout."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from peft import LoraConfig, get_peft_model

from heal_pl.adapters.lora import LoRASpec, wrap_lora
from heal_pl.adapters.routed import RoutedSpec, wrap_routed
from heal_pl.adapters.switch import ref_rows
from heal_pl.barrier.fused_head import HeadTransform
from heal_pl.barrier.kl import KLBarrier, counted_positions
from heal_pl.models.lm import LMHead, check_head, head_transform, last_hidden
from heal_pl.models.load import tiny_model
from heal_pl.module import HealModule
from tests.helpers import make_batch

SMALL = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=None)  # fmt: skip


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        (transformers.LlamaConfig(), HeadTransform()),
        (transformers.CohereConfig(logit_scale=0.25), HeadTransform(multiplier=0.25)),
        (transformers.GraniteConfig(logits_scaling=8.0), HeadTransform(divisor=8.0)),
        (transformers.FalconH1Config(lm_head_multiplier=0.5), HeadTransform(multiplier=0.5)),
        (transformers.HyperCLOVAXConfig(logits_scaling=0.5), HeadTransform(multiplier=0.5)),  # multiplies
        (transformers.Gemma2Config(final_logit_softcapping=30.0), HeadTransform(softcap=30.0)),
        (transformers.Gemma3TextConfig(final_logit_softcapping=None), HeadTransform()),
    ],
    ids=["llama", "cohere", "granite", "falcon_h1", "hyperclovax", "gemma2", "gemma3"],
)
def test_head_transform_reads_each_familys_field(config: transformers.PretrainedConfig, expected) -> None:
    assert head_transform(config) == expected


def _own_and_head(lm: torch.nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return lm(input_ids=ids).logits, LMHead(lm)(last_hidden(lm, ids))


@pytest.mark.parametrize(
    "build",
    [
        lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMALL, tie_word_embeddings=True)),
        lambda: transformers.PhiForCausalLM(transformers.PhiConfig(**SMALL)),  # lm_head has a bias
        lambda: transformers.FalconH1ForCausalLM(transformers.FalconH1Config(
            **SMALL, lm_head_multiplier=0.3, mamba_d_ssm=32, mamba_n_heads=4, mamba_d_head=8, mamba_d_state=8,
            mamba_chunk_size=8)),  # fmt: skip
        lambda: tiny_model("cohere"),
        lambda: tiny_model("granite"),
        lambda: tiny_model("gemma2"),
    ],
    ids=["tied", "bias", "falcon_h1", "cohere", "granite", "gemma2"],
)
def test_lm_head_reproduces_the_models_own_logits(build) -> None:
    torch.manual_seed(0)
    lm = build().eval()
    head = lm.get_output_embeddings()
    if head.bias is not None:  # HF initialises biases to 0: make this one count
        with torch.no_grad():
            head.bias.normal_()
    ids = torch.randint(1, 90, (2, 7))
    own, mine = _own_and_head(lm, ids)
    assert mine.dtype == torch.float32
    torch.testing.assert_close(mine, own, rtol=1e-6, atol=1e-6)
    assert check_head(lm) <= 1e-6


class DoubledLlama(transformers.LlamaForCausalLM):
    """A model that transforms its logits in a way heal_pl does not know."""

    def forward(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN201
        out = super().forward(*args, **kwargs)
        out.logits = out.logits * 2.0 + 0.1
        return out


def test_check_head_names_a_model_it_cannot_reproduce() -> None:
    lm = DoubledLlama(transformers.LlamaConfig(**SMALL))
    with pytest.raises(ValueError, match=r"DoubledLlama.*differs from DoubledLlama\(\.\.\.\)\.logits by [0-9.e+-]+"):
        check_head(lm, "HealModule")
    with pytest.raises(ValueError, match="head_transform"):
        check_head(lm)  # a failure is not cached: it raises every time


def test_check_head_runs_once_per_model() -> None:
    lm = tiny_model("llama")
    calls: list[int] = []
    lm.register_forward_hook(lambda *a: calls.append(1))
    check_head(lm)
    check_head(lm)
    assert calls == [1]


def test_lm_head_is_refused_as_an_adapter_target() -> None:
    with pytest.raises(ValueError, match="lm_head.*LM head of LlamaForCausalLM"):
        wrap_lora(tiny_model("llama"), LoRASpec(target_modules=("q_proj", "lm_head")))
    with pytest.raises(ValueError, match="routed.target_modules selects 'lm_head'"):
        wrap_routed(tiny_model("llama"), RoutedSpec(target_modules=("q_proj", "lm_head")))


def test_a_foreign_lora_on_lm_head_stays_out_of_the_ref() -> None:
    """KLBarrierCallback with a user's LoRA on lm_head: the ref reads the base head (KL = the true KL)."""
    from heal_pl.callbacks import KLBarrierCallback
    from tests.callbacks.test_kl_barrier import ForeignModule

    peft = get_peft_model(tiny_model("llama"), LoraConfig(r=4, target_modules=["q_proj", "lm_head"],
                                                          init_lora_weights=False))  # fmt: skip
    foreign = ForeignModule(peft).eval()
    cb = KLBarrierCallback(KLBarrier(agg="mean", tau=0.0))
    cb.setup(None, foreign, "fit")  # type: ignore[arg-type]
    batch = make_batch(vocab=300)
    try:
        out = peft(**batch)
        _, scalars = cb.compute(batch, out.logits)
    finally:
        cb.teardown(None, foreign, "fit")  # type: ignore[arg-type]
    with torch.no_grad(), peft.disable_adapter():
        ref = peft(**batch).logits
    lp, lq = out.logits[:, :-1].double().log_softmax(-1), ref[:, :-1].double().log_softmax(-1)
    kl = (lp.exp() * (lp - lq)).sum(-1)[batch["labels"][:, 1:] != -100]
    assert kl.mean() > 0.01
    torch.testing.assert_close(scalars["kl_mean"].double(), kl.mean().detach(), rtol=1e-5, atol=1e-7)


def test_ref_rows_have_no_dropout_whatever_the_mode() -> None:
    peft = get_peft_model(tiny_model("gpt2"), LoraConfig(r=4, target_modules=["c_attn"]))
    batch = make_batch(vocab=300)
    counted = counted_positions(batch["labels"], batch["attention_mask"])
    peft.train()
    a = ref_rows(peft, batch["input_ids"], batch["attention_mask"], counted)
    b = ref_rows(peft, batch["input_ids"], batch["attention_mask"], counted)
    assert all(m.training for m in peft.modules()), "the caller's mode is restored"
    peft.eval()
    c = ref_rows(peft, batch["input_ids"], batch["attention_mask"], counted)
    assert torch.equal(a, b) and torch.equal(a, c)


def test_heal_module_gpt2_zero_adapter_reads_zero_kl_in_train_mode() -> None:
    """GPT-2 (dropout 0.1): the student keeps only the adapter's dropout, so a zero adapter reads KL 0."""
    module = HealModule(model="tiny-gpt2", lora=LoRASpec(target_modules=("c_attn",), dropout=0.1),
                        barrier=KLBarrier(agg="mean", tau=0.0))  # fmt: skip
    module.train()
    lora_dropout = [m for n, m in module.named_modules() if n.endswith("lora_dropout.default")]
    assert lora_dropout and all(m.training for m in lora_dropout), "the adapter's own dropout stays on"
    _, scalars, kl = module.loss_terms(make_batch(vocab=300))
    assert kl.numel() > 0 and float(kl.abs().max()) == 0.0


def test_set_ref_model_and_copies_keep_the_contract() -> None:
    """A deep copy is a new model: the guard checks it again (cheaply) and passes."""
    lm = tiny_model("cohere")
    check_head(lm)
    assert check_head(copy.deepcopy(lm)) <= 1e-6
