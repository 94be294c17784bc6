"""The routed adapter: a kept knob ``delta`` and a quarantine knob ``delta_hack`` per linear layer (docs/maths.md §2.1).

Each adapted linear layer (``nn.Linear``, or GPT-2's transformers ``Conv1D``; the same ``target_modules``
rule as ``LoRASpec``, by default every linear layer of the decoder blocks, see ``heal_pl.adapters.targets``) is
replaced by a :class:`RoutedLinear` that keeps the frozen base layer inside and adds

    y = W x + Δ(delta) x + Δ(delta_hack) x

with one of two parametrisations, both linear in the knob and both zero at init (the model is then
bit-identical to its base):

    lora (default)   A  [r, d_in]  frozen random orthonormal rows (a buffer, seeded per module)
                     delta = B, delta_hack = B_hack       [d_out, r]
                     Δ x = (B + B_hack) (A x)
    svd              W = U Σ Vh, top r:  U [d_out, r], Vh [r, d_in]  (buffers)
                     delta = δS, delta_hack = δS_hack     [r]
                     Δ x = U ((δS + δS_hack) ⊙ (Vh x))

``W`` is ``[d_out, d_in]`` in both cases: a ``Conv1D`` stores its weight transposed (``[d_in, d_out]``,
``y = x W_stored + b``), and the routed frame is built from ``W = W_stored^T``, so ``delta_weight()`` is always
``[d_out, d_in]`` (add its transpose to a Conv1D's stored weight to bake it).

The knob space of a module (where a hack basis lives) is ``delta.flatten()``. ``ablate_hack(model)``
switches ``delta_hack`` off (deployment), ``adapter_off(model)`` both (the base). Knobs and frames are
float32 whatever the base dtype; ``Δ x`` is cast to the base output's dtype.
"""

from __future__ import annotations

import contextlib
import json
import os
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Literal

import torch
from lightning.pytorch.utilities import rank_zero_warn
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from heal_pl.adapters.targets import (
    DEFAULT_TARGETS,
    LINEAR_TYPES,
    as_targets,
    check_targets,
    depth_range,
    resolve_targets,
)
from heal_pl.checks import check_choice

Parametrization = Literal["lora", "svd"]
FORMAT = "heal_pl.routed/1"


@dataclass(frozen=True)
class RoutedSpec:
    """Which linear layers get a routed adapter, and its parametrisation.

    Args:
        r: rank of the knob (columns of ``B`` for ``lora``, singular directions for ``svd``).
        parametrization: ``lora`` (fixed random orthonormal ``A``, knob ``B [d_out, r]``; default) or
            ``svd`` (knob ``δS [r]`` on the top-``r`` singular directions of the base weight).
        target_modules: ``("all-linear",)`` (default: every linear / Conv1D layer inside the decoder blocks,
            never the LM head or the embeddings) or names (suffixes) of the linear layers to adapt.
        layers: optional depth range ``[lo, hi]`` as fractions of the decoder depth: blocks
            ``floor(lo · L) ≤ i < ceil(hi · L)`` are adapted; ``None`` adapts every block.
        seed: seeds the frozen ``A`` of each module (with the module's name), so a re-wrap is identical.
    """

    r: int = 8
    parametrization: Parametrization = "lora"
    target_modules: tuple[str, ...] = DEFAULT_TARGETS
    layers: tuple[float, float] | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "target_modules", as_targets(self.target_modules))
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(float(x) for x in self.layers))
        if self.r < 1:
            raise ValueError(f"routed.r={self.r} must be >= 1")
        check_choice("routed.parametrization", self.parametrization, Parametrization)
        check_targets("routed.target_modules", self.target_modules)
        if self.layers is not None and (len(self.layers) != 2 or not 0.0 <= self.layers[0] < self.layers[1] <= 1.0):
            raise ValueError(
                f"routed.layers={list(self.layers)} must be [lo, hi] with 0 <= lo < hi <= 1 (depth fractions)"
            )

    def layer_indices(self, num_layers: int) -> list[int] | None:
        """Adapted block indices (``None`` = all), the same rule as ``LoRASpec.layer_indices``."""
        return depth_range(self.layers, num_layers)


def _module_seed(seed: int, name: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


def orthonormal_rows(r: int, n: int, seed: int) -> Tensor:
    """``[r, n]`` float32 with orthonormal rows: the Q of a seeded Gaussian ``[n, r]`` matrix, transposed."""
    if r > n:
        raise ValueError(f"cannot draw r={r} orthonormal rows in dimension {n}")
    gen = torch.Generator(device="cpu").manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, r, generator=gen, dtype=torch.float64))
    return q.T.contiguous().float()


class RoutedLinear(nn.Module):
    """A frozen ``nn.Linear`` (or ``Conv1D``) plus the two knobs ``delta`` (kept) and ``delta_hack`` (quarantine).

    Args:
        base: the linear layer to adapt; it is kept as ``self.base`` and frozen.
        spec: the routed spec (rank, parametrisation, seed).
        name: the layer's qualified name in the model (seeds ``A``).
    """

    def __init__(self, base: nn.Module, spec: RoutedSpec, name: str) -> None:
        super().__init__()
        if not isinstance(base, LINEAR_TYPES):
            raise ValueError(f"routed adapter: {name} is a {type(base).__name__}, not an nn.Linear or Conv1D")
        weight = base.weight if isinstance(base, nn.Linear) else base.weight.T  # [d_out, d_in]
        d_out, d_in = weight.shape
        limit = d_in if spec.parametrization == "lora" else min(d_in, d_out)
        if spec.r > limit:
            raise ValueError(
                f"routed.r={spec.r} is too large for {name} (weight {d_out}×{d_in}): "
                f"{spec.parametrization} needs r <= {limit}"
            )
        self.base = base.requires_grad_(False)
        self.spec = spec
        self.name = name
        self.hack_on = True
        self.adapter_on = True
        device = base.weight.device
        if spec.parametrization == "lora":
            self.register_buffer("A", orthonormal_rows(spec.r, d_in, _module_seed(spec.seed, name)).to(device))
            shape: tuple[int, ...] = (d_out, spec.r)
        else:
            U, _, Vh = torch.linalg.svd(weight.detach().float(), full_matrices=False)
            self.register_buffer("U", U[:, : spec.r].contiguous())
            self.register_buffer("Vh", Vh[: spec.r].contiguous())
            shape = (spec.r,)
        self.delta = nn.Parameter(torch.zeros(shape, device=device))
        self.delta_hack = nn.Parameter(torch.zeros(shape, device=device))

    def frame(self) -> dict[str, Tensor]:
        """The frozen buffers of the parametrisation: ``{"A"}`` (lora) or ``{"U", "Vh"}`` (svd)."""
        if self.spec.parametrization == "lora":
            return {"A": self.A}
        return {"U": self.U, "Vh": self.Vh}

    def knob(self) -> Tensor:
        """The knob in use: ``delta + delta_hack``, or ``delta`` alone while the hack is ablated."""
        return self.delta + self.delta_hack if self.hack_on else self.delta

    def delta_x(self, x: Tensor, knob: Tensor) -> Tensor:
        """``Δ(knob) x`` for ``x [..., d_in]``, computed in the knob's dtype (float32)."""
        h = x.to(knob.dtype)
        if self.spec.parametrization == "lora":
            return (h @ self.A.T) @ knob.T
        return ((h @ self.Vh.T) * knob) @ self.U.T

    def delta_weight(self, include_hack: bool = True) -> Tensor:
        """The dense update ``ΔW [d_out, d_in]``: ``B A`` or ``U diag(δS) Vh`` (with or without the hack knob)."""
        knob = self.delta + self.delta_hack if include_hack else self.delta
        if self.spec.parametrization == "lora":
            return knob @ self.A
        return (self.U * knob) @ self.Vh

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x)
        if not self.adapter_on:
            return y
        return y + self.delta_x(x, self.knob()).to(y.dtype)

    def extra_repr(self) -> str:
        return f"parametrization={self.spec.parametrization}, r={self.spec.r}, knob={tuple(self.delta.shape)}"


def routed_modules(model: nn.Module) -> list[tuple[str, RoutedLinear]]:
    """Every ``RoutedLinear`` in ``model`` with its qualified name, in module order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, RoutedLinear)]


def _require_routed(model: nn.Module) -> list[RoutedLinear]:
    found = [m for _, m in routed_modules(model)]
    if not found:
        raise ValueError(f"{type(model).__name__} holds no routed adapter layer (wrap it with wrap_routed first)")
    return found


@contextlib.contextmanager
def _switched_off(model: nn.Module, flag: str) -> Iterator[None]:
    layers = _require_routed(model)
    saved = [getattr(m, flag) for m in layers]
    try:
        for m in layers:
            setattr(m, flag, False)
        yield
    finally:
        for m, on in zip(layers, saved, strict=True):
            setattr(m, flag, on)


def ablate_hack(model: nn.Module) -> contextlib.AbstractContextManager[None]:
    """``delta_hack`` contributes nothing inside the block (the deployed model); restored on exit."""
    return _switched_off(model, "hack_on")


def adapter_off(model: nn.Module) -> contextlib.AbstractContextManager[None]:
    """Both knobs off inside the block: the model computes exactly its base; restored on exit."""
    return _switched_off(model, "adapter_on")


class RoutedAdapter:
    """A view over the routed layers of one model: iteration, parameter groups, ablation, save / load.

    Iterating yields ``(name, RoutedLinear)`` pairs in module order; the model itself is ``self.model``.

    Example:
        >>> from heal_pl.models import tiny_model
        >>> adapter = wrap_routed(tiny_model("llama"), RoutedSpec(r=4))
        >>> len(adapter)  # the 7 linear layers of each of the 2 blocks
        14
        >>> opt = torch.optim.AdamW([{"params": adapter.delta_params()},
        ...                          {"params": adapter.hack_params(), "weight_decay": 0.0}])
        >>> with torch.no_grad():  # as if training had moved the quarantine knobs (delta stays 0)
        ...     _ = [p.normal_() for p in adapter.hack_params()]
        >>> ids = torch.tensor([[1, 2, 3]])
        >>> with adapter.ablate_hack():  # the deployed model
        ...     deployed = adapter.model(ids).logits
        >>> with adapter.adapter_off():
        ...     base = adapter.model(ids).logits
        >>> torch.equal(deployed, base), torch.equal(adapter.model(ids).logits, base)
        (True, False)
    """

    def __init__(self, model: nn.Module, spec: RoutedSpec) -> None:
        self.model = model
        self.spec = spec
        self.layers = dict(routed_modules(model))
        if not self.layers:
            raise ValueError(f"{type(model).__name__} holds no routed adapter layer")
        other = {m.spec for m in self.layers.values()} - {spec}
        if other:
            raise ValueError(f"routed layers were built with {sorted(map(str, other))}, not {spec}")

    def __iter__(self) -> Iterator[tuple[str, RoutedLinear]]:
        return iter(self.layers.items())

    def __len__(self) -> int:
        return len(self.layers)

    def names(self) -> list[str]:
        return list(self.layers)

    def delta_params(self) -> list[nn.Parameter]:
        """The kept knobs (deployed)."""
        return [m.delta for m in self.layers.values()]

    def hack_params(self) -> list[nn.Parameter]:
        """The quarantine knobs (ablated at deployment; give them weight decay 0)."""
        return [m.delta_hack for m in self.layers.values()]

    def ablate_hack(self) -> contextlib.AbstractContextManager[None]:
        return ablate_hack(self.model)

    def adapter_off(self) -> contextlib.AbstractContextManager[None]:
        return adapter_off(self.model)

    def metadata(self) -> dict[str, str]:
        """What a saved file records: format, parametrisation, r, targets, layers, seed (as strings)."""
        spec = asdict(self.spec)
        return {"format": FORMAT, **{k: json.dumps(v) for k, v in spec.items()}}

    def state(self) -> dict[str, Tensor]:
        """``{name}.delta``, ``{name}.delta_hack`` and the frame buffers (``A`` or ``U``, ``Vh``) of every layer."""
        out: dict[str, Tensor] = {}
        for name, m in self.layers.items():
            out[f"{name}.delta"] = m.delta.detach()
            out[f"{name}.delta_hack"] = m.delta_hack.detach()
            out.update({f"{name}.{k}": v for k, v in m.frame().items()})
        return {k: v.cpu().contiguous() for k, v in out.items()}

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write knobs and frames to a safetensors file whose metadata records the spec."""
        save_file(self.state(), os.fspath(path), metadata=self.metadata())

    def load(self, path: str | os.PathLike[str]) -> RoutedAdapter:
        """Load a file written by :meth:`save` into this (freshly wrapped) adapter; returns self.

        The file's spec must equal this adapter's (parametrisation, r, targets, layers, seed) and its
        layers must be exactly this model's routed layers, else ``ValueError`` naming what differs.
        The frames are loaded too, so the file alone defines the update.
        """
        saved_spec = read_spec(path)
        differ = [f.name for f in fields(RoutedSpec) if getattr(saved_spec, f.name) != getattr(self.spec, f.name)]
        if differ:
            diffs = "; ".join(f"{k}: file {getattr(saved_spec, k)!r}, model {getattr(self.spec, k)!r}" for k in differ)
            raise ValueError(f"routed adapter {os.fspath(path)!r} does not match this adapter ({diffs})")
        with safe_open(os.fspath(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
        expected = self.state()
        missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
        if missing or unexpected:
            raise ValueError(
                f"routed adapter {os.fspath(path)!r} has different layers: missing {missing[:6]}"
                f"{' …' if len(missing) > 6 else ''}, unexpected {unexpected[:6]}{' …' if len(unexpected) > 6 else ''}"
            )
        for key, want in expected.items():
            if tensors[key].shape != want.shape:
                raise ValueError(
                    f"routed adapter {os.fspath(path)!r}: {key} has shape {tuple(tensors[key].shape)}, "
                    f"the model needs {tuple(want.shape)}"
                )
        with torch.no_grad():
            for name, m in self.layers.items():
                targets = {"delta": m.delta, "delta_hack": m.delta_hack, **m.frame()}
                for k, t in targets.items():
                    t.copy_(tensors[f"{name}.{k}"])
        return self


def read_spec(path: str | os.PathLike[str]) -> RoutedSpec:
    """The ``RoutedSpec`` recorded in a routed adapter file (to wrap a model before ``load``)."""
    with safe_open(os.fspath(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != FORMAT:
        raise ValueError(f"{os.fspath(path)!r} is not a heal_pl routed adapter (format {meta.get('format')!r})")
    values = {f.name: json.loads(meta[f.name]) for f in fields(RoutedSpec) if f.name in meta}
    return RoutedSpec(**values)


def wrap_routed(model: nn.Module, spec: RoutedSpec) -> RoutedAdapter:
    """Replace every target linear layer of ``model`` (in place) by a :class:`RoutedLinear`.

    All of the model's own parameters are frozen; only the knobs train. Raises ``ValueError`` when a
    target name matches no linear layer (listing the linear layers there are), when the depth range
    selects nothing, when ``r`` does not fit a layer, or when the model is already routed.
    """
    if routed_modules(model):
        raise ValueError(f"{type(model).__name__} already holds a routed adapter; wrap a fresh model")
    chosen = resolve_targets(model, spec.target_modules, spec.layers, "routed")
    model.requires_grad_(False)
    for name in chosen:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, RoutedLinear(model.get_submodule(name), spec, name))
    return RoutedAdapter(model, spec)


def hack_decay_groups(params: Sequence[nn.Parameter], hack: Sequence[nn.Parameter], weight_decay: float) -> list[dict]:
    """AdamW parameter groups: ``params`` (minus the hack knobs) with ``weight_decay``, the hack knobs with 0."""
    hack_ids = {id(p) for p in hack}
    if weight_decay > 0:
        rank_zero_warn(f"weight_decay={weight_decay} applies to delta only; delta_hack's weight decay is forced to 0")
    return [
        {"params": [p for p in params if id(p) not in hack_ids], "weight_decay": weight_decay},
        {"params": list(hack), "weight_decay": 0.0},
    ]
