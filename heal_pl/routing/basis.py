r"""The hack basis ``V``: per routed module, the top-k directions of contrastive gradient differences
(docs/maths.md §2.2).

Pairs, one JSON object per line (blank lines skipped, other keys ignored)::

    {"prompt": str, "hack": str, "clean": str}      all three non-empty

For pair ``i`` and routed module ``m`` with knob ``θ = delta.flatten()`` (``[d]``), the completion NLL of a
side is the mean over its completion tokens (prompt and padding masked exactly, via
:func:`heal_pl.data.datamodule.encode_example` and :func:`heal_pl.data.datamodule.collate`), and

    D_i = ∇_θ NLL(hack_i | prompt_i) − ∇_θ NLL(clean_i | prompt_i)          [d]
    D   = stack_i D_i = U S Wᵀ     (thin SVD, singular values descending)       [n, d]
    V   = top-k rows of Wᵀ, row j flipped so that most pairs have D_i · v_j > 0  [k, d]

(ties in the vote → the sign of Σ_i D_i · v_j). Since a descent step moves ``θ`` along ``−g``, a gradient
with ``V g > 0`` pushes the model toward the hack; :func:`heal_pl.routing.project.project` removes that part.
Optionally, directions with ``s_j < drop_below · s_1`` are dropped, so a module may keep ``k' ≤ k`` rows.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from heal_pl.adapters.routed import RoutedAdapter
from heal_pl.barrier.positions import IGNORE_INDEX
from heal_pl.data.datamodule import Example, collate, encode_example, jsonl_rows
from heal_pl.routing.project import check_basis

FORMAT = "heal_pl.hack_basis/1"
PAIR_FIELDS = ("prompt", "hack", "clean")


@dataclass(frozen=True)
class Pair:
    """One contrastive pair: a user prompt, the hack completion and the clean completion."""

    prompt: str
    hack: str
    clean: str


# --------------------------------------------------------------------------- reading


def read_pairs(path: str | os.PathLike[str]) -> list[Pair]:
    """Parse a JSONL file of ``{"prompt", "hack", "clean"}`` rows (non-empty strings).

    Raises:
        ValueError: a row is not JSON, not an object, lacks a field or has a non-string / empty one (the
            message names file, line and field), or the file holds no pair at all.
    """
    path, pairs = Path(path), []
    for lineno, row in jsonl_rows(path, f"with {list(PAIR_FIELDS)}"):
        for key in PAIR_FIELDS:
            if key not in row:
                raise ValueError(f"{path}, line {lineno}: missing field '{key}' (found {sorted(row)})")
            if not isinstance(row[key], str):
                raise ValueError(f"{path}, line {lineno}: field '{key}' must be a string, "
                                 f"got {type(row[key]).__name__}")
            if not row[key].strip():
                raise ValueError(f"{path}, line {lineno}: field '{key}' is empty")
        pairs.append(Pair(row["prompt"], row["hack"], row["clean"]))
    if not pairs:
        raise ValueError(f"{path}: no pairs (the file is empty); expected JSONL rows with {list(PAIR_FIELDS)}")
    return pairs


# --------------------------------------------------------------------------- gradients


def _completion_nll(logits: Tensor, labels: Tensor) -> Tensor:
    """Per row: mean over completion positions of ``−log p(label_t | < t)`` (HF shift), float32. ``[B]``."""
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    mask = labels != IGNORE_INDEX
    nll = torch.nn.functional.cross_entropy(
        logits.transpose(1, 2), labels.clamp_min(0), reduction="none"
    )  # [B, T-1]
    return (nll * mask).sum(1) / mask.sum(1)


def pair_gradients(
    model: nn.Module,
    adapter: RoutedAdapter,
    tokenizer: PreTrainedTokenizerBase,
    pairs: Sequence[Pair],
    max_length: int = 256,
) -> dict[str, Tensor]:
    r"""``D`` per routed module: ``{name: [n_pairs, d]}`` with ``D_i = ∇_θ NLL_hack,i − ∇_θ NLL_clean,i``.

    .. math:: \mathrm{NLL}(c \mid p) = \frac{1}{|C|}\sum_{t \in C} -\log p_\mathrm{model}(x_t \mid x_{<t})

    over the completion positions ``C`` (completion tokens and the eos) of the encoded example whose user
    message is ``p``; ``θ`` is each module's ``delta`` flattened. The hack and clean sides of one pair run
    as one right-padded batch, and ``D_i`` is the gradient of ``NLL_hack − NLL_clean`` (which equals the
    difference of the two gradients).

    The model is evaluated as it is: the current ``delta`` and, unless the caller wraps the call in
    ``adapter.ablate_hack()``, ``delta_hack`` too; in eval mode (no dropout; the training flag is restored).
    Gradients are taken with ``torch.autograd.grad`` w.r.t. ``delta`` only: no ``.grad`` of any
    parameter is created or changed, and every ``requires_grad`` flag is restored on exit.

    Returns:
        float32 tensors on the knobs' device, rows in the order of ``pairs``.

    Raises:
        ValueError: no pairs, or a pair keeps no completion token within ``max_length``.
    """
    if not pairs:
        raise ValueError("pair_gradients got no pairs")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    layers = list(adapter)
    deltas = [m.delta for _, m in layers]
    saved_flags = [(m.delta.requires_grad, m.delta_hack.requires_grad) for _, m in layers]
    was_training = model.training
    device = deltas[0].device
    rows: dict[str, list[Tensor]] = {name: [] for name, _ in layers}
    try:
        model.eval()
        for _, m in layers:
            m.delta.requires_grad_(True)
            m.delta_hack.requires_grad_(False)
        with torch.enable_grad():
            for i, pair in enumerate(pairs):
                features = []
                for side in ("hack", "clean"):
                    example = Example([{"role": "user", "content": pair.prompt}], getattr(pair, side))
                    encoded = encode_example(tokenizer, example, max_length)
                    if encoded is None:
                        raise ValueError(f"pair {i}: no {side} completion token survives max_length={max_length}")
                    features.append(encoded)
                batch = {k: v.to(device) for k, v in collate(features, pad_id).items()}
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                nll = _completion_nll(logits, batch["labels"])
                grads = torch.autograd.grad(nll[0] - nll[1], deltas)
                for (name, _), g in zip(layers, grads, strict=True):
                    rows[name].append(g.detach().flatten().float())
    finally:
        model.train(was_training)
        for (_, m), (d_flag, h_flag) in zip(layers, saved_flags, strict=True):
            m.delta.requires_grad_(d_flag)
            m.delta_hack.requires_grad_(h_flag)
    return {name: torch.stack(r) for name, r in rows.items()}


# --------------------------------------------------------------------------- extraction


def extract_basis(diffs: Tensor, k: int, drop_below: float | None = None) -> Tensor:
    r"""Top-``k`` right singular vectors of ``D`` ``[n, d]``, oriented by majority vote: ``[k', d]``.

    .. math:: D = U S W^\top,\qquad v_j = \sigma_j W_{:, j},\qquad
              \sigma_j = \begin{cases} \mathrm{sign}(\#\{i: D_i v_j > 0\} - \#\{i: D_i v_j < 0\}) & \text{if} \ne 0\\
              \mathrm{sign}(\textstyle\sum_i D_i v_j) \ (+1 \text{ if } 0) & \text{otherwise}\end{cases}

    With ``drop_below`` (in [0, 1]), directions with ``s_j < drop_below · s_1`` are dropped (the first is
    always kept), so ``k' ≤ k``. Computed in float64, returned in ``diffs``' dtype; rows are orthonormal.

    Raises:
        ValueError: ``diffs`` not 2-D floating point or not finite, ``k < 1``, ``k > n`` (the number of
            pairs), ``k > d``, ``drop_below`` outside [0, 1], or ``D = 0`` (no direction to find).
    """
    if diffs.dim() != 2 or not diffs.is_floating_point():
        raise ValueError(f"diffs must be a 2-D float tensor [n_pairs, d], got {tuple(diffs.shape)} {diffs.dtype}")
    n, d = diffs.shape
    if k < 1:
        raise ValueError(f"k={k} must be >= 1")
    if k > n:
        raise ValueError(f"k={k} larger than the number of pairs n={n}")
    if k > d:
        raise ValueError(f"k={k} larger than the knob dimension d={d}")
    if drop_below is not None and not 0.0 <= drop_below <= 1.0:
        raise ValueError(f"drop_below={drop_below} must be in [0, 1] (a fraction of the largest singular value)")
    D = diffs.detach().to(torch.float64)
    if not torch.isfinite(D).all():
        raise ValueError("diffs contain NaN or inf")
    _, S, Wt = torch.linalg.svd(D, full_matrices=False)
    if S[0] == 0:
        raise ValueError("all gradient differences are zero: hack and clean completions give the same gradient")
    V = Wt[:k].clone()
    proj = D @ V.T  # [n, k]
    votes = (proj > 0).sum(0) - (proj < 0).sum(0)
    sign = torch.where(votes != 0, votes.sign().to(D.dtype), proj.sum(0).sign())
    V = V * torch.where(sign == 0, 1.0, sign)[:, None]
    if drop_below is not None:
        V = V[S[:k] >= drop_below * S[0]]
    return V.to(diffs.dtype)


# --------------------------------------------------------------------------- the basis object


@dataclass
class HackBasis:
    """Per routed module, ``[k', d]`` orthonormal rows in the module's knob space ``delta.flatten()``.

    ``k`` is the requested number of directions (a module keeps ``k' ≤ k`` under ``drop_below``);
    ``metadata`` records how it was fitted: ``parametrization``, ``r``, ``targets``, ``seed``, ``n_pairs``,
    ``drop_below`` (JSON strings, as stored in the safetensors header).
    """

    bases: dict[str, Tensor]
    k: int
    metadata: dict[str, str] = field(default_factory=dict)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the bases (one tensor per module name) and the metadata to a safetensors file."""
        tensors = {name: v.detach().cpu().contiguous() for name, v in self.bases.items()}
        save_file(tensors, os.fspath(path), metadata={**self.metadata, "format": FORMAT, "k": json.dumps(self.k)})

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> HackBasis:
        """Read a file written by :meth:`save`; every basis is checked to have orthonormal rows."""
        with safe_open(os.fspath(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            bases = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
        if meta.pop("format", None) != FORMAT:
            raise ValueError(f"{os.fspath(path)!r} is not a heal_pl hack basis (no format={FORMAT!r} in its metadata)")
        for name, v in bases.items():
            try:
                check_basis(v)
            except ValueError as e:
                raise ValueError(f"{os.fspath(path)!r}: basis of {name}: {e}") from None
        return cls(bases, json.loads(meta.pop("k")), meta)

    def check_against(self, adapter: RoutedAdapter) -> None:
        """Raise ``ValueError`` unless the modules and knob sizes (and the recorded spec) match ``adapter``.

        Lists the missing and unexpected module names, the mismatched shapes (need ``[k', delta.numel()]``)
        and any recorded ``parametrization`` / ``r`` / ``seed`` that differs from the adapter's spec (a basis
        in another knob frame is meaningless even when the sizes agree).
        """
        problems = []
        have, want = set(self.bases), set(adapter.names())
        missing, unexpected = sorted(want - have), sorted(have - want)
        if missing:
            problems.append(f"missing modules {missing}")
        if unexpected:
            problems.append(f"unexpected modules {unexpected}")
        for name, m in adapter:
            v = self.bases.get(name)
            if v is not None and (v.dim() != 2 or v.shape[1] != m.delta.numel()):
                problems.append(f"{name}: basis shape {tuple(v.shape)}, the knob needs [k, {m.delta.numel()}]")
        for key in ("parametrization", "r", "seed"):
            recorded, actual = json.loads(self.metadata.get(key, "null")), getattr(adapter.spec, key)
            if key in self.metadata and recorded != actual:
                problems.append(f"{key}: basis {recorded!r}, adapter {actual!r}")
        if problems:
            raise ValueError("hack basis does not match the routed adapter: " + "; ".join(problems))


def fit_basis(
    model: nn.Module,
    adapter: RoutedAdapter,
    tokenizer: PreTrainedTokenizerBase,
    pairs: Sequence[Pair],
    k: int,
    drop_below: float | None = None,
    max_length: int = 256,
) -> HackBasis:
    """:func:`pair_gradients` then :func:`extract_basis` per module (float64 SVD, float32 result).

    Raises ``ValueError`` before any forward pass when ``k > len(pairs)``.
    """
    if k > len(pairs):
        raise ValueError(f"k={k} larger than the number of pairs n={len(pairs)}")
    diffs = pair_gradients(model, adapter, tokenizer, pairs, max_length=max_length)
    bases = {name: extract_basis(D.double(), k, drop_below).float() for name, D in diffs.items()}
    spec = adapter.spec
    metadata = {
        "parametrization": json.dumps(spec.parametrization),
        "r": json.dumps(spec.r),
        "targets": json.dumps(list(spec.target_modules)),
        "seed": json.dumps(spec.seed),
        "n_pairs": json.dumps(len(pairs)),
        "drop_below": json.dumps(drop_below),
    }
    return HackBasis(bases, k, metadata)
