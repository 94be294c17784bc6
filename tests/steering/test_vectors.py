"""Tests of heal_pl.steering (docs/maths.md §3): block discovery, hooks, fitted vectors, save/load.

References are independent of the code under test: block outputs come from transformers'
``output_hidden_states`` run one prompt at a time, directions from float64 numpy, edits from
forward-hook captures of the raw block outputs.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import Tensor, nn
from transformers import Gemma2Config, Gemma2ForCausalLM, GPT2Config, GPT2LMHeadModel

from heal_pl.models.load import tiny_model
from heal_pl.steering import (
    SteeringVector,
    find_blocks,
    last_token_states,
    layers_from,
    mean_diff_direction,
    pca_direction,
    steer,
)

POS = ["The cat likes warm soup at home.", "She reads an old book in the park every morning.",
       "What is the capital of France?", "We cook fresh bread."]
NEG = ["The farmer sells a small boat.", "Is the sun cold?", "They need some water at work on Sunday.",
       "My brother paints the blue car near the river today."]


def tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=120, n_embd=32, n_layer=3, n_head=2, n_positions=64, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


def tiny_gemma2() -> Gemma2ForCausalLM:
    torch.manual_seed(0)
    cfg = Gemma2Config(vocab_size=120, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=16, pad_token_id=0,
                       bos_token_id=1, eos_token_id=2)
    return Gemma2ForCausalLM(cfg).eval()


def n_hooks(model: nn.Module) -> int:
    return sum(len(b._forward_hooks) for b in find_blocks(model))


def capture_block(model: nn.Module, i: int, ids: Tensor) -> tuple[Tensor, Tensor]:
    """(output of block ``i``, logits) for one forward; the capture hook runs after any earlier hook."""
    seen: list[Tensor] = []
    handle = find_blocks(model)[i].register_forward_hook(
        lambda m, a, o: seen.append((o if isinstance(o, Tensor) else o[0]).detach().clone())
    )
    try:
        with torch.no_grad():
            logits = model(input_ids=ids).logits
    finally:
        handle.remove()
    return seen[0], logits


def ref_states(model: nn.Module, tokenizer, prompts: list[str], layer: int) -> np.ndarray:
    """Block ``layer``'s output at the last token, one prompt at a time, via output_hidden_states (float64)."""
    rows = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([tokenizer(p, add_special_tokens=False)["input_ids"]])
            hs = model(input_ids=ids, output_hidden_states=True).hidden_states
            rows.append(hs[layer + 1][0, -1].double().numpy())  # hs[0] = embeddings
    return np.stack(rows)


def np_unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


@pytest.fixture
def ids(tokenizer) -> Tensor:
    return torch.tensor([tokenizer("Do you like music? I like jazz.", add_special_tokens=False)["input_ids"]])


@pytest.fixture
def llama3(tiny_llama) -> nn.Module:
    return tiny_model("llama", num_layers=3).eval()


# ----------------------------------------------------------------------------- block discovery


@pytest.mark.parametrize("name", ["tiny_llama", "tiny_qwen2"])
def test_find_blocks_llama_qwen2(name: str, request: pytest.FixtureRequest) -> None:
    model = request.getfixturevalue(name)
    blocks = find_blocks(model)
    assert blocks is model.model.layers and len(blocks) == 2


def test_find_blocks_gpt2_and_gemma2() -> None:
    gpt2, gemma = tiny_gpt2(), tiny_gemma2()
    assert find_blocks(gpt2) is gpt2.transformer.h and len(find_blocks(gpt2)) == 3
    assert find_blocks(gemma) is gemma.model.layers and len(find_blocks(gemma)) == 3


def test_find_blocks_through_peft(tiny_llama) -> None:
    peft_model = get_peft_model(tiny_llama, LoraConfig(r=2, target_modules=["q_proj"]))
    assert find_blocks(peft_model) is tiny_llama.model.layers


def test_find_blocks_error_lists_children() -> None:
    model = nn.Sequential()
    model.add_module("encoder", nn.Linear(4, 4))
    model.add_module("head", nn.ReLU())
    with pytest.raises(ValueError, match=r"blocks of Sequential.*transformer\.h.*\[encoder: Linear, head: ReLU\]"):
        find_blocks(model)


# ----------------------------------------------------------------------------- layers_from


@pytest.mark.parametrize(
    ("spec", "n", "expected"),
    [(0, 4, [0]), (3, 4, [3]), (0.0, 30, [0]), (0.5, 30, [15]), (1.0, 30, [29]), (0.99, 2, [1]),
     ([1, 0.5, 1], 4, [1, 2]), ((0.25, 0.75), 8, [2, 6]), ([np.int64(2), np.float32(0.5)], 8, [2, 4])],
)
def test_layers_from(spec, n: int, expected: list[int]) -> None:
    assert layers_from(spec, n) == expected


@pytest.mark.parametrize(
    ("spec", "n", "match"),
    [(4, 4, r"layer index 4 is out of range: valid indices are 0\.\.3"),
     (-1, 4, r"layer index -1 is out of range: valid indices are 0\.\.3"),
     ([0, 7], 2, r"layer index 7 .* 0\.\.1"), (1.5, 4, r"fraction 1\.5 is outside \[0, 1\]"),
     (-0.1, 4, "fraction"), (True, 4, "bool"), ("1", 4, "str"), ([], 4, "empty"), (0, 0, "n_layers")],
)
def test_layers_from_bad(spec, n: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        layers_from(spec, n)


# ----------------------------------------------------------------------------- hooks


def test_hooks_removed_after_context_and_after_exception(tiny_llama, ids: Tensor) -> None:
    v = torch.randn(64)
    _, base_logits = capture_block(tiny_llama, 0, ids)
    with steer(tiny_llama, v, 3.0, layers=[0, 1]):
        assert n_hooks(tiny_llama) == 2
    assert n_hooks(tiny_llama) == 0
    with pytest.raises(RuntimeError, match="boom"), steer(tiny_llama, v, 3.0, layers=[0, 1]):
        assert n_hooks(tiny_llama) == 2
        raise RuntimeError("boom")
    assert n_hooks(tiny_llama) == 0
    assert torch.equal(capture_block(tiny_llama, 0, ids)[1], base_logits)


@pytest.mark.parametrize("name", ["tiny_llama", "tiny_qwen2"])
def test_alpha_zero_mean_diff_is_bit_identical(name: str, request, tokenizer, ids: Tensor) -> None:
    model = request.getfixturevalue(name).eval()
    vec = SteeringVector.fit(model, tokenizer, POS, NEG, "mean_diff", layers=[0, 1])
    _, base = capture_block(model, 0, ids)
    with steer(model, vec, 0.0):
        _, steered = capture_block(model, 0, ids)
    assert torch.equal(steered, base)


@pytest.mark.parametrize("alpha", [2.5, -4.0])
def test_additive_change_at_hooked_block_is_alpha_v(tiny_llama, tokenizer, ids: Tensor, alpha: float) -> None:
    model = tiny_llama.eval()
    vec = SteeringVector.fit(model, tokenizer, POS, NEG, "mean_diff", layers=[0, 1])
    h0, base_logits = capture_block(model, 0, ids)
    with steer(model, vec, alpha):  # capture registered after the steering hook sees the edited output
        h1, logits = capture_block(model, 0, ids)
    expected = (alpha * vec.directions[0]).expand_as(h0[0])
    torch.testing.assert_close(h1 - h0, expected[None], rtol=0, atol=1e-5)
    assert (logits - base_logits).abs().max() > 1e-3


def test_raw_vector_is_added_unnormalised(tiny_qwen2, ids: Tensor) -> None:
    v = torch.randn(64, generator=torch.Generator().manual_seed(1)) * 3
    h0, _ = capture_block(tiny_qwen2, 1, ids)
    with steer(tiny_qwen2, v, 0.5, layers=1.0):  # depth fraction 1 → last block, the only one hooked
        h1, _ = capture_block(tiny_qwen2, 1, ids)
    torch.testing.assert_close(h1 - h0, (0.5 * v).expand_as(h0), rtol=0, atol=1e-5)


@pytest.mark.parametrize("alpha", [0.0, 2.0])
def test_directional_ablation(tiny_llama, tokenizer, ids: Tensor, alpha: float) -> None:
    model = tiny_llama.eval()
    vec = SteeringVector.fit(model, tokenizer, POS, NEG, "directional_ablation", layers=[0])
    md = SteeringVector.fit(model, tokenizer, POS, NEG, "mean_diff", layers=[0])
    torch.testing.assert_close(vec.directions[0], md.directions[0], rtol=0, atol=0)
    h0, base_logits = capture_block(model, 0, ids)
    with steer(model, vec, alpha):
        h1, logits = capture_block(model, 0, ids)
    v = vec.directions[0].double().numpy()
    y = h0[0].double().numpy()
    expected = y - np.outer(y @ v, v) + alpha * v
    np.testing.assert_allclose(h1[0].double().numpy(), expected, rtol=0, atol=1e-5)
    np.testing.assert_allclose(h1[0].double().numpy() @ v, alpha, atol=1e-5)  # projection = α everywhere
    assert (logits - base_logits).abs().max() > 1e-4  # the ablation is on even at α = 0


@pytest.mark.parametrize("build", [tiny_gpt2, tiny_gemma2], ids=["gpt2", "gemma2"])
def test_steer_gpt2_and_gemma2_blocks(build) -> None:
    model, ids = build(), torch.tensor([[5, 9, 17, 3, 44]])
    v = torch.randn(32, generator=torch.Generator().manual_seed(2))
    h0, base_logits = capture_block(model, 1, ids)
    with steer(model, v, -1.5, layers=[1]):
        h1, logits = capture_block(model, 1, ids)
    torch.testing.assert_close(h1 - h0, (-1.5 * v).expand_as(h0), rtol=0, atol=1e-5)
    assert (logits - base_logits).abs().max() > 1e-4
    assert torch.equal(capture_block(model, 1, ids)[1], base_logits)


def test_fit_and_steer_through_peft(tiny_llama, tokenizer, ids: Tensor) -> None:
    plain = SteeringVector.fit(tiny_llama.eval(), tokenizer, POS, NEG, layers=[1])
    peft_model = get_peft_model(tiny_llama, LoraConfig(r=2, target_modules=["q_proj"]))  # B = 0: same outputs
    vec = SteeringVector.fit(peft_model, tokenizer, POS, NEG, layers=[1])
    torch.testing.assert_close(vec.directions[1], plain.directions[1], rtol=0, atol=1e-6)
    h0, _ = capture_block(peft_model, 1, ids)
    with steer(peft_model, vec, 2.0):
        h1, _ = capture_block(peft_model, 1, ids)
    torch.testing.assert_close(h1 - h0, (2.0 * vec.directions[1]).expand_as(h0), rtol=0, atol=1e-5)


class TupleBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x: Tensor) -> tuple[Tensor, str]:
        return self.lin(x), "extra"


class TupleLM(nn.Module):
    """A model whose blocks return (hidden, extra), at model.layers."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([TupleBlock(), TupleBlock()])
        self.extras: list[str] = []

    def forward(self, x: Tensor) -> Tensor:
        for block in self.layers:
            x, extra = block(x)
            self.extras.append(extra)
        return x


def test_tuple_outputs_are_steered_and_passed_through() -> None:
    torch.manual_seed(0)
    model, x, v = TupleLM(), torch.randn(2, 3, 8), torch.randn(8)
    base = model(x)
    with steer(model, v, 1.5, layers=[1]):
        out = model(x)
    torch.testing.assert_close(out - base, (1.5 * v).expand_as(base))
    assert model.extras == ["extra"] * 4


# ----------------------------------------------------------------------------- fitting


def test_last_token_states_match_unbatched_reference(llama3, tokenizer) -> None:
    prompts = POS + NEG  # different lengths: right padding inside each batch of 3
    hooks_before = n_hooks(llama3)  # transformers adds output-recording hooks of its own in ref_states
    states = last_token_states(llama3, tokenizer, prompts, [0, 1], batch_size=3)
    assert n_hooks(llama3) == hooks_before and not llama3.training
    for layer in (0, 1):
        assert states[layer].shape == (len(prompts), 64) and states[layer].dtype == torch.float32
        np.testing.assert_allclose(states[layer].numpy(), ref_states(llama3, tokenizer, prompts, layer),
                                   rtol=1e-4, atol=1e-5)


def test_fit_restores_train_mode(tiny_llama, tokenizer) -> None:
    tiny_llama.train()
    SteeringVector.fit(tiny_llama, tokenizer, POS[:1], NEG[:1], layers=0)
    assert tiny_llama.training


@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_fit_mean_diff_equals_numpy(llama3, tokenizer, batch_size: int) -> None:
    pos, neg = POS, NEG[:3]  # unequal counts are fine for mean_diff
    vec = SteeringVector.fit(llama3, tokenizer, pos, neg, "mean_diff", layers=[0, 0.5], batch_size=batch_size)
    assert vec.layers == [0, 1] and vec.method == "mean_diff"
    for layer in vec.layers:
        mean_pos, mean_neg = (ref_states(llama3, tokenizer, p, layer).mean(0) for p in (pos, neg))
        ref = np_unit(mean_pos - mean_neg)
        np.testing.assert_allclose(vec.directions[layer].numpy(), ref, rtol=0, atol=1e-5)


def test_mean_diff_direction_synthetic() -> None:
    rng = np.random.default_rng(0)
    pos, neg = rng.normal(size=(5, 16)) + 1.0, rng.normal(size=(7, 16))
    got = mean_diff_direction(torch.tensor(pos, dtype=torch.float32), torch.tensor(neg, dtype=torch.float32))
    assert got.dtype == torch.float32 and got.shape == (16,)
    np.testing.assert_allclose(got.numpy(), np_unit(pos.mean(0) - neg.mean(0)), rtol=0, atol=1e-6)


def repeng_pca_diff(pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    """repeng's ``pca_diff``, rewritten from its definition in numpy (float64), independent of torch's SVD.

    Differences ``d = pos − neg``, centred (sklearn's ``PCA`` subtracts the mean), top eigenvector of their
    scatter matrix; signed as repeng does: flipped when most pairs project the positive lower.
    """
    d = pos - neg
    c = d - d.mean(0)
    _, vecs = np.linalg.eigh(c.T @ c)
    v = vecs[:, -1]
    return v if ((pos @ v) > (neg @ v)).mean() > 0.5 else -v


def test_pca_direction_synthetic_and_sign() -> None:
    rng = np.random.default_rng(1)
    u = np_unit(rng.normal(size=16))
    base = rng.normal(size=(12, 16)) * 3  # shared content, cancels in the pairs
    scale = rng.uniform(0.5, 4.0, size=(12, 1))  # varies: the centred differences still lie along u
    pos = base + scale * u + 0.05 * rng.normal(size=(12, 16))
    neg = base - 0.05 * rng.normal(size=(12, 16))
    d = pos - neg
    ref = np.linalg.svd(d - d.mean(0), full_matrices=False)[2][0]  # centred (docs/maths.md §3.2)
    ref = ref if (d @ ref).mean() > 0 else -ref
    t = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    got = pca_direction(t(pos), t(neg)).numpy()
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5)
    assert got @ u > 0.99  # recovers the planted direction, positives project higher
    assert ((pos - neg) @ got).mean() > 0
    np.testing.assert_allclose(pca_direction(t(neg), t(pos)).numpy(), -got, atol=1e-6)  # swapping flips it


def test_pca_centres_the_differences_like_repeng() -> None:
    """The pairs share a large mean shift ``m`` but vary along ``u`` (cos(u, m) = 0.3): the centred top component is
    ``u``, the uncentred one (and mean_diff) ``≈ m``."""
    rng = np.random.default_rng(3)
    m = np_unit(rng.normal(size=16))
    w = rng.normal(size=16)
    w = np_unit(w - (w @ m) * m)  # ⊥ m
    u = 0.3 * m + np.sqrt(1 - 0.3**2) * w
    n = 20
    spread = np.linspace(-3.0, 3.0, n)[:, None]  # symmetric: the centred mean along u is 0
    base = rng.normal(size=(n, 16)) * 2
    neg = base + 0.01 * rng.normal(size=(n, 16))
    pos = base + 5.0 * m + spread * u + 0.01 * rng.normal(size=(n, 16))
    t = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    got = pca_direction(t(pos), t(neg)).double().numpy()
    mean_diff = mean_diff_direction(t(pos), t(neg)).double().numpy()
    ref = repeng_pca_diff(pos, neg)
    assert got @ ref == pytest.approx(1.0, abs=1e-6)  # the same direction and sign as repeng's pca_diff
    assert got @ mean_diff < 0.5 and abs(got @ u) > 0.9999  # clearly not mean_diff: the planted spread axis
    uncentred = np.linalg.svd(pos - neg, full_matrices=False)[2][0]
    assert abs(uncentred @ mean_diff) > 0.95  # what pca computed before it centred (issue 12)
    assert ((pos - neg) @ got).mean() > 0  # positives project higher


def test_pca_needs_varying_pairs() -> None:
    with pytest.raises(ValueError, match="at least 2 pairs, got 1"):
        pca_direction(torch.ones(1, 4), torch.zeros(1, 4))
    with pytest.raises(ValueError, match="paired differences are all equal"):
        pca_direction(torch.tensor([1.0, 2.0, 3.0, 4.0]).repeat(3, 1), torch.zeros(3, 4))


def test_fit_pca_positives_project_higher(llama3, tokenizer) -> None:
    vec = SteeringVector.fit(llama3, tokenizer, POS, NEG, "pca", layers=[1], batch_size=4)
    pos, neg = ref_states(llama3, tokenizer, POS, 1), ref_states(llama3, tokenizer, NEG, 1)
    v = vec.directions[1].double().numpy()
    assert ((pos - neg) @ v).mean() > 0
    ref = repeng_pca_diff(pos, neg)
    assert abs(abs(ref @ v) - 1) < 1e-4


# ----------------------------------------------------------------------------- save / load


@pytest.mark.parametrize("method", ["mean_diff", "pca", "directional_ablation"])
def test_save_load_round_trip(tiny_llama, tokenizer, tmp_path, method: str) -> None:
    vec = SteeringVector.fit(tiny_llama, tokenizer, POS, NEG, method, layers=[0, 1], model_name="tiny-llama")
    vec.save(tmp_path / "v.safetensors")
    back = SteeringVector.load(tmp_path / "v.safetensors")
    assert (back.method, back.layers, back.model_name) == (method, [0, 1], "tiny-llama")
    assert all(torch.equal(back.directions[i], vec.directions[i]) for i in (0, 1))


def test_load_rejects_foreign_file(tmp_path) -> None:
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(3)}, tmp_path / "x.safetensors")
    with pytest.raises(ValueError, match="not a heal_pl steering vector"):
        SteeringVector.load(tmp_path / "x.safetensors")


# ----------------------------------------------------------------------------- bad input


def test_bad_fit_inputs(tiny_llama, tokenizer) -> None:
    with pytest.raises(ValueError, match="no contrastive pairs: got 0 positive and 2 negative"):
        SteeringVector.fit(tiny_llama, tokenizer, [], NEG[:2])
    with pytest.raises(ValueError, match="no contrastive pairs"):
        SteeringVector.fit(tiny_llama, tokenizer, POS, [])
    with pytest.raises(ValueError, match="pos/neg counts must match, got 4 and 3"):
        SteeringVector.fit(tiny_llama, tokenizer, POS, NEG[:3], "pca")
    with pytest.raises(ValueError, match="method='lda' is not allowed; choose one of mean_diff, pca"):
        SteeringVector.fit(tiny_llama, tokenizer, POS, NEG, "lda")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"layer index 2 is out of range: valid indices are 0\.\.1"):
        SteeringVector.fit(tiny_llama, tokenizer, POS, NEG, layers=[2])
    with pytest.raises(ValueError, match="norm 0"):
        SteeringVector.fit(tiny_llama, tokenizer, POS[:2], POS[:2], layers=0)
    with pytest.raises(ValueError, match="counts must match"):
        pca_direction(torch.ones(2, 4), torch.ones(3, 4))


def test_bad_steer_inputs(tiny_llama, tokenizer) -> None:
    vec = SteeringVector.fit(tiny_llama, tokenizer, POS, NEG, layers=[0])
    with pytest.raises(ValueError, match="needs layers="):
        steer(tiny_llama, torch.randn(64), 1.0)
    with pytest.raises(ValueError, match=r"layer index 5 is out of range: valid indices are 0\.\.1"):
        steer(tiny_llama, torch.randn(64), 1.0, layers=5)
    with pytest.raises(ValueError, match=r"shape \(32,\); expected \(64,\)"):
        steer(tiny_llama, torch.randn(32), 1.0, [0])
    with pytest.raises(ValueError, match=r"layers \[1\] have no direction; this vector was fitted at layers \[0\]"):
        steer(tiny_llama, vec, 1.0, layers=[1])
    with pytest.raises(TypeError, match="expected a direction tensor"):
        steer(tiny_llama, [0.0] * 64, 1.0, layers=[0])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="coeff"):
        steer(tiny_llama, vec, float("nan"))
    with pytest.raises(ValueError, match="at least one layer"):
        SteeringVector("mean_diff", {})
    with pytest.raises(ValueError, match="method='x'"):
        SteeringVector("x", {0: torch.ones(64)})  # type: ignore[arg-type]
    assert n_hooks(tiny_llama) == 0
