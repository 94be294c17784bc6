"""Default adapter targets on every family (heal_pl.adapters.targets): every linear layer of the decoder blocks.

References: peft's own ``target_modules="all-linear"`` expansion (an independent implementation of the same idea),
the per-family layer names each architecture defines, and the base model's own logits.
"""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from torch import nn
from transformers.pytorch_utils import Conv1D

from heal_pl.adapters.lora import LoRASpec, wrap_lora
from heal_pl.adapters.routed import RoutedLinear, RoutedSpec, wrap_routed
from heal_pl.adapters.targets import resolve_targets
from heal_pl.models.families import FAMILIES
from heal_pl.models.load import tiny_model

_LLAMA = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
# the linear layers each family's decoder block defines (per block kind)
EXPECTED: dict[str, set[str]] = dict.fromkeys(FAMILIES, _LLAMA) | {
    "phi3": {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"},
    "gpt2": {"c_attn", "c_proj", "c_fc"},
    "qwen3_5": _LLAMA | {"in_proj_qkv", "in_proj_z", "in_proj_a", "in_proj_b", "out_proj"},
}
LINEAR_ATTENTION = {"in_proj_qkv", "in_proj_z", "in_proj_a", "in_proj_b", "out_proj"}


def ids(T: int = 9) -> torch.Tensor:
    return torch.randint(4, 200, (2, T), generator=torch.Generator().manual_seed(0))


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids()).logits


def peft_all_linear(family: str) -> set[str]:
    """The layers peft itself adapts with ``target_modules="all-linear"``."""
    peft_model = get_peft_model(tiny_model(family), LoraConfig(r=2, target_modules="all-linear"))
    base = peft_model.get_base_model()
    return {n for n, m in base.named_modules() if isinstance(m, LoraLayer)}


@pytest.mark.parametrize("family", FAMILIES)
def test_default_lora_adapts_every_block_linear_never_the_head(family: str) -> None:
    model = tiny_model(family).eval()
    want = logits(model)
    peft_model = wrap_lora(model, LoRASpec())
    base = peft_model.get_base_model()
    adapted = {n for n, m in base.named_modules() if isinstance(m, LoraLayer)}
    assert adapted == peft_all_linear(family)  # the same set as peft's all-linear
    assert {n.rsplit(".", 1)[-1] for n in adapted} == EXPECTED[family]
    head = base.get_output_embeddings()
    assert not isinstance(head, LoraLayer) and not any(isinstance(m, LoraLayer) for m in head.modules())
    assert not any(isinstance(m, LoraLayer) for m in base.get_input_embeddings().modules())
    n_blocks = base.config.num_hidden_layers
    assert {int(n.split(".")[2]) for n in adapted} == set(range(n_blocks))  # every block
    assert torch.equal(logits(peft_model), want)  # B = 0: the student starts as the base
    if family == "qwen3_5":  # the linear-attention blocks (0, 2) get their projections
        kinds = base.config.layer_types
        lin = {n.rsplit(".", 1)[-1] for n in adapted if kinds[int(n.split(".")[2])] == "linear_attention"}
        assert lin == LINEAR_ATTENTION | {"gate_proj", "up_proj", "down_proj"}


@pytest.mark.parametrize("param", ["lora", "svd"])
@pytest.mark.parametrize("family", FAMILIES)
def test_default_routed_adapts_every_block_linear_bit_identical(family: str, param: str) -> None:
    model = tiny_model(family).eval()
    want = logits(model)
    adapter = wrap_routed(model, RoutedSpec(r=4, parametrization=param))
    assert set(adapter.names()) == peft_all_linear(family)
    assert {n.rsplit(".", 1)[-1] for n in adapter.names()} == EXPECTED[family]
    assert not isinstance(model.get_output_embeddings(), RoutedLinear)
    assert torch.equal(logits(model), want)  # both knobs zero: bit-identical to the base
    with adapter.ablate_hack():
        assert torch.equal(logits(model), want)
    with torch.no_grad():  # the knobs do reach the output
        next(iter(adapter))[1].delta.fill_(0.1)
    assert not torch.allclose(logits(model), want)


@pytest.mark.parametrize("param", ["lora", "svd"])
def test_routed_conv1d_is_exact(param: str) -> None:
    """GPT-2's Conv1D (``y = x W_stored + b``, ``W_stored [d_in, d_out]``): ``y = x (W_stored + ΔW^T) + b``."""
    model = tiny_model("gpt2")
    adapter = wrap_routed(model, RoutedSpec(r=5, parametrization=param, target_modules=("c_fc",), seed=3))
    m = adapter.layers["transformer.h.1.mlp.c_fc"]
    assert isinstance(m.base, Conv1D) and m.base.weight.shape == (64, 256)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        m.delta.copy_(torch.randn(m.delta.shape, generator=gen))
        m.delta_hack.copy_(torch.randn(m.delta.shape, generator=gen))
    W, b = m.base.weight.double(), m.base.bias.double()
    if param == "lora":
        A = m.A.double()
        assert torch.allclose(A @ A.T, torch.eye(5, dtype=torch.float64), atol=1e-6)
        delta = (m.delta + m.delta_hack).double() @ A  # [d_out, d_in]
    else:  # frame from the SVD of W = W_stored^T, [d_out, d_in]
        U, S, Vh = torch.linalg.svd(W.T, full_matrices=False)
        assert torch.allclose(S[:5].float(), (m.U.T @ W.T.float() @ m.Vh.T).diagonal(), rtol=1e-4)
        delta = m.U.double() @ torch.diag((m.delta + m.delta_hack).double()) @ m.Vh.double()
    x = torch.randn(3, 7, 64, generator=gen)
    with torch.no_grad():
        got = m(x).double()
        torch.testing.assert_close(m.delta_weight().double(), delta)
    torch.testing.assert_close(got, x.double() @ (W + delta.T) + b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["qwen3_5", "gpt2", "phi3"])
def test_depth_range_with_the_default(family: str) -> None:
    """``layers=[0.5, 1]`` of 4 blocks keeps blocks 2 and 3, each with every one of its linear layers."""
    full = resolve_targets(tiny_model(family, num_layers=4), ("all-linear",), None, "lora")
    keep = [n for n in full if int(n.split(".")[2]) in (2, 3)]
    lora = wrap_lora(tiny_model(family, num_layers=4), LoRASpec(layers=(0.5, 1.0))).get_base_model()
    assert sorted(n for n, m in lora.named_modules() if isinstance(m, LoraLayer)) == sorted(keep)
    routed = wrap_routed(tiny_model(family, num_layers=4), RoutedSpec(r=2, layers=(0.5, 1.0)))
    assert routed.names() == keep and len(keep) * 2 == len(full)
    if family == "qwen3_5":  # block 2 is linear attention, block 3 full attention: both kinds stay covered
        assert {n.rsplit(".", 1)[-1] for n in keep} == EXPECTED[family]


def test_targets_as_a_string_and_bad_targets() -> None:
    assert LoRASpec(target_modules="all-linear").target_modules == ("all-linear",)  # type: ignore[arg-type]
    assert RoutedSpec(target_modules="q_proj").target_modules == ("q_proj",)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="'all-linear' stands alone"):
        LoRASpec(target_modules=("all-linear", "q_proj"))
    with pytest.raises(ValueError, match="routed.target_modules is empty"):
        RoutedSpec(target_modules=())
    with pytest.raises(ValueError, match=r"lora.target_modules \['q_proj'\] not found in GPT2LMHeadModel; "
                                         r"linear layers: \['c_attn', 'c_fc', 'c_proj', 'lm_head'\]"):
        wrap_lora(tiny_model("gpt2"), LoRASpec(target_modules=("q_proj",)))
    with pytest.raises(ValueError, match=r"routed.target_modules \['q_proj', 'gate_proj'\] not found in "
                                         r"Phi3ForCausalLM; linear layers: \['down_proj', 'gate_up_proj'"):
        wrap_routed(tiny_model("phi3"), RoutedSpec(target_modules=("q_proj", "gate_proj")))


def test_all_linear_without_blocks_is_an_error() -> None:
    with pytest.raises(ValueError, match="no linear layer inside numbered decoder blocks.*linear layers: \\['0'"):
        resolve_targets(nn.Sequential(nn.Linear(4, 4)), ("all-linear",), None, "routed")


@pytest.mark.parametrize("family", ["gpt2", "phi3", "qwen3_5"])
def test_heal_module_defaults_construct(family: str) -> None:
    """The families whose layer names are not Llama's build a HealModule with the default LoRA and routed specs."""
    from heal_pl.module import HealModule

    lora = HealModule(model=f"tiny-{family}").student.get_base_model()
    names = {n.rsplit(".", 1)[-1] for n, m in lora.named_modules() if isinstance(m, LoraLayer)}
    assert names == EXPECTED[family]
    routed = HealModule(model=f"tiny-{family}", adapter="routed").routed_adapter
    assert {n.rsplit(".", 1)[-1] for n in routed.names()} == EXPECTED[family]
