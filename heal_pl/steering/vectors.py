"""Steering vectors from contrastive prompt pairs (docs/maths.md §3.2).

For each chosen block ``ℓ``, ``h_ℓ(p)`` is the block's output (``[H]``) at the last token of prompt ``p``.
With positives ``P`` and negatives ``N`` (float32 throughout):

    mean_diff              v = unit(mean_{p∈P} h(p) − mean_{n∈N} h(n))             applied y + α·v
    pca                    d_i = h(p_i) − h(n_i), centred: c_i = d_i − mean_j d_j; v = top
                           principal direction of the c_i (repeng's pca_diff), signed so
                           that mean_i d_i · v > 0 (positives project higher)          applied y + α·v
    directional_ablation   v̂ = the mean_diff direction                               applied y − (y·v̂)v̂ + α·v̂

Prompts are text already rendered the way the model will see them (chat template applied by the
caller); they are tokenized with ``add_special_tokens=False``, as in ``heal_pl.data.datamodule``.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Literal

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from heal_pl.checks import check_choice
from heal_pl.data.prompts import encode_prompts
from heal_pl.models.lm import base_lm
from heal_pl.steering.hooks import LayerSpec, _hidden_size, add_to_blocks, find_blocks, layers_from

Method = Literal["mean_diff", "pca", "directional_ablation"]
FORMAT = "heal_pl.steering_vector/1"


def _check_method(method: str) -> None:
    check_choice("method", method, Method)


def _unit(v: Tensor, what: str) -> Tensor:
    norm = v.norm()
    if not torch.isfinite(norm) or norm == 0:
        raise ValueError(f"{what} has norm {norm.item()}: no direction to steer along")
    return v / norm


def _check_states(pos: Tensor, neg: Tensor) -> None:
    if pos.dim() != 2 or neg.dim() != 2 or pos.shape[1] != neg.shape[1]:
        raise ValueError(f"expected pos [N, H] and neg [M, H], got {tuple(pos.shape)=} and {tuple(neg.shape)=}")
    if pos.shape[0] == 0 or neg.shape[0] == 0:
        raise ValueError(f"need at least one positive and one negative, got {pos.shape[0]} and {neg.shape[0]}")


def mean_diff_direction(pos: Tensor, neg: Tensor) -> Tensor:
    """``unit(mean(pos) − mean(neg))`` in float32; ``pos`` ``[N, H]``, ``neg`` ``[M, H]`` → ``[H]``."""
    _check_states(pos, neg)
    return _unit(pos.float().mean(0) - neg.float().mean(0), "mean(pos) - mean(neg)")


def pca_direction(pos: Tensor, neg: Tensor) -> Tensor:
    """Top principal direction of the centred paired differences, float32 ``[H]`` (docs/maths.md §3.2,
    repeng's ``pca_diff``).

    ``d_i = pos_i − neg_i``, ``c_i = d_i − mean_j d_j``; ``v`` maximises ``Σ_i (c_i · v)²`` (the first right
    singular vector of ``C = [c_i]``, computed in float64). Uncentred, ``v`` would be the ``mean_diff``
    direction again whenever the mean difference dominates; centred, it is the axis along which the pairs
    differ most *from each other*. ``v`` is signed so that ``mean_i d_i · v > 0`` (positives project higher;
    on an exact tie, so that most pairs project positively).

    Raises:
        ValueError: ``pos`` and ``neg`` have different counts (pairs are matched by position), fewer than two
            pairs, or differences that do not vary (all ``c_i = 0``: no principal direction).
    """
    _check_states(pos, neg)
    if pos.shape[0] != neg.shape[0]:
        raise ValueError(
            f"pca pairs positives with negatives: pos/neg counts must match, got {pos.shape[0]} and {neg.shape[0]}"
        )
    if pos.shape[0] < 2:
        raise ValueError(f"pca centres the paired differences: it needs at least 2 pairs, got {pos.shape[0]}")
    d = pos.double() - neg.double()
    c = d - d.mean(0)
    _, s, vh = torch.linalg.svd(c, full_matrices=False)
    if not torch.isfinite(s[0]) or s[0] <= 1e-12 * max(d.abs().max().item(), 1.0):
        raise ValueError("pca: the paired differences are all equal (nothing varies after centring); use mean_diff")
    v = vh[0]
    proj = d @ v
    if proj.mean() < 0 or (proj.mean() == 0 and (proj > 0).sum() < (proj < 0).sum()):
        v = -v
    return _unit(v, "pca direction").float()


class _Stop(Exception):
    """Raised by the capture hook of the deepest needed block to skip the rest of the forward pass."""


@torch.no_grad()
def last_token_states(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    layers: Sequence[int],
    batch_size: int = 8,
) -> dict[int, Tensor]:
    """Block outputs at each prompt's last token: ``{layer: [len(prompts), H]}`` float32 on CPU.

    Prompts are right-padded into batches of ``batch_size``; under the causal mask a real token never
    sees the padding after it, and the last real token of row ``b`` is ``attention_mask[b].sum() − 1``.
    The model runs in eval mode (restored afterwards) and stops after the deepest requested block.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    if len(prompts) == 0 or len(layers) == 0:
        raise ValueError(f"last_token_states needs prompts and layers, got {len(prompts)} and {len(layers)}")
    blocks = find_blocks(model)
    layers = sorted(set(layers))
    for i in layers:
        layers_from(i, len(blocks))
    encoded = encode_prompts(tokenizer, prompts)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = next(model.parameters()).device
    captured: dict[int, list[Tensor]] = {i: [] for i in layers}
    last_idx = torch.zeros(0, dtype=torch.long)

    def capture(i: int):  # noqa: ANN202 — a forward hook
        def hook(module: nn.Module, args: object, output: object) -> None:
            h = output if isinstance(output, Tensor) else output[0]  # type: ignore[index]
            captured[i].append(h[torch.arange(h.shape[0]), last_idx.to(h.device)].float().cpu())
            if i == layers[-1]:
                raise _Stop

        return hook

    was_training = model.training
    handles = [blocks[i].register_forward_hook(capture(i)) for i in layers]
    try:
        model.eval()
        for start in range(0, len(encoded), batch_size):
            chunk = encoded[start : start + batch_size]
            width = max(len(t) for t in chunk)
            ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for b, tokens in enumerate(chunk):
                ids[b, : len(tokens)] = torch.tensor(tokens)
                mask[b, : len(tokens)] = 1
            last_idx = mask.sum(1) - 1
            with contextlib.suppress(_Stop):
                model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return {i: torch.cat(captured[i]) for i in layers}


@dataclass
class SteeringVector:
    """A fitted steering direction per decoder block, usable with :func:`heal_pl.steering.steer`.

    Attributes:
        method: ``mean_diff``, ``pca`` or ``directional_ablation`` (how it is fitted and applied).
        directions: block index → unit direction ``[H]`` (stored float32 on CPU, normalised on creation).
        model_name: the model it was fitted on (informational).

    Example:
        >>> from heal_pl.models import tiny_model, tiny_tokenizer
        >>> from heal_pl.steering import steer
        >>> model, tok = tiny_model("llama"), tiny_tokenizer()  # 2 decoder blocks
        >>> vec = SteeringVector.fit(model, tok, ["I love it.", "Great!"], ["I hate it.", "Awful!"], "mean_diff")
        >>> vec.layers, round(vec.directions[1].norm().item(), 4)  # layers=0.5: the middle block, a unit direction
        ([1], 1.0)
        >>> ids = tok("Is ice cold?", return_tensors="pt").input_ids
        >>> with steer(model, vec, 4.0):
        ...     steered = model(ids).logits
        >>> torch.equal(steered, model(ids).logits)  # outside the block, the model is unsteered again
        False
    """

    method: Method
    directions: dict[int, Tensor]
    model_name: str = ""

    def __post_init__(self) -> None:
        _check_method(self.method)
        if not self.directions:
            raise ValueError("SteeringVector needs at least one layer in directions")
        sizes = {tuple(v.shape) for v in self.directions.values()}
        if len(sizes) != 1 or len(next(iter(sizes))) != 1:
            raise ValueError(f"directions must all be 1-D of one size, got shapes {sorted(sizes)}")
        self.directions = {
            int(i): _unit(v.detach().float().cpu(), f"direction for layer {i}").contiguous()
            for i, v in sorted(self.directions.items())
        }

    @property
    def layers(self) -> list[int]:
        """The block indices, ascending."""
        return list(self.directions)

    @classmethod
    def fit(
        cls,
        model: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        pos_prompts: Sequence[str],
        neg_prompts: Sequence[str],
        method: Method = "mean_diff",
        layers: LayerSpec = 0.5,
        batch_size: int = 8,
        model_name: str | None = None,
    ) -> SteeringVector:
        """Fit one direction per block of ``layers`` (indices or depth fractions) from contrastive prompts.

        Raises:
            ValueError: no positive or no negative prompt, pos/neg counts that differ for ``pca``, an
                unknown ``method``, a bad layer, or identical positive and negative means.
        """
        _check_method(method)
        if len(pos_prompts) == 0 or len(neg_prompts) == 0:
            raise ValueError(
                f"no contrastive pairs: got {len(pos_prompts)} positive and {len(neg_prompts)} negative prompts"
            )
        if method == "pca" and len(pos_prompts) != len(neg_prompts):
            raise ValueError(
                f"method='pca' pairs prompts: pos/neg counts must match, got {len(pos_prompts)} and {len(neg_prompts)}"
            )
        chosen = layers_from(layers, len(find_blocks(model)))
        pos = last_token_states(model, tokenizer, pos_prompts, chosen, batch_size)
        neg = last_token_states(model, tokenizer, neg_prompts, chosen, batch_size)
        direction = pca_direction if method == "pca" else mean_diff_direction
        if model_name is None:
            model_name = str(getattr(getattr(base_lm(model), "config", None), "name_or_path", "") or "")
        return cls(method, {i: direction(pos[i], neg[i]) for i in chosen}, model_name)

    def steering(self, model: nn.Module, coeff: float, layers: LayerSpec | None = None) -> AbstractContextManager[None]:
        """Context manager applying this vector by ``coeff`` at ``layers`` (a subset; default: all)."""
        chosen = self.layers if layers is None else layers_from(layers, len(find_blocks(model)))
        missing = [i for i in chosen if i not in self.directions]
        if missing:
            raise ValueError(f"layers {missing} have no direction; this vector was fitted at layers {self.layers}")
        directions = {i: self.directions[i] for i in chosen}
        return add_to_blocks(model, directions, coeff, ablate=self.method == "directional_ablation")

    def save(self, path: str | os.PathLike) -> None:
        """Write a safetensors file: tensors ``layer.<i>``; metadata ``method``, ``layers`` (JSON), ``model_name``."""
        tensors = {f"layer.{i}": v for i, v in self.directions.items()}
        metadata = {"format": FORMAT, "method": self.method, "layers": json.dumps(self.layers),
                    "model_name": self.model_name}
        save_file(tensors, os.fspath(path), metadata=metadata)

    @classmethod
    def load(cls, path: str | os.PathLike, model: nn.Module | None = None) -> SteeringVector:
        """Read a file written by :meth:`save`; with ``model``, check that it fits that model (hidden size, blocks).

        Raises:
            ValueError: the file is missing, lacks the metadata, its tensors do not match its ``layers``, or (with
                ``model``) its directions have another hidden size or a block the model lacks; the message names
                the file.
        """
        if not os.path.isfile(path):
            raise ValueError(f"steering vector {os.fspath(path)!r} does not exist")
        with safe_open(os.fspath(path), framework="pt") as f:
            meta = f.metadata() or {}
            missing = [k for k in ("method", "layers", "model_name") if k not in meta]
            if missing:
                raise ValueError(f"{path} is not a heal_pl steering vector: metadata lacks {', '.join(missing)}")
            layers = json.loads(meta["layers"])
            keys = set(f.keys())
            expected = {f"layer.{i}" for i in layers}
            if keys != expected:
                raise ValueError(f"{path}: tensors {sorted(keys)} do not match metadata layers {layers}")
            directions = {int(i): f.get_tensor(f"layer.{i}") for i in layers}
        vector = cls(meta["method"], directions, meta["model_name"])  # type: ignore[arg-type]
        if model is not None:
            hidden, n_blocks = _hidden_size(model), len(find_blocks(model))
            size = next(iter(vector.directions.values())).shape[0]
            if hidden is not None and size != hidden:
                raise ValueError(f"steering vector {os.fspath(path)!r} has hidden size {size} (fitted on "
                                 f"{vector.model_name!r}); this model's is {hidden}")  # fmt: skip
            if vector.layers[-1] >= n_blocks:
                raise ValueError(f"steering vector {os.fspath(path)!r} steers blocks {vector.layers}; this model has "
                                 f"{n_blocks} (0..{n_blocks - 1})")  # fmt: skip
        return vector

