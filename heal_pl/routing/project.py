"""Gradient routing: the projection of a knob's gradient off a hack basis (docs/maths.md §2.3).

Pure torch on 1-D tensors; the Lightning glue (which gradient goes where, logging) lives elsewhere.
Per adapted module, ``g`` is the accumulated (and, under AMP, unscaled) gradient of the kept knob
``delta`` flattened to ``[n]``, and ``V`` is ``[k, n]`` with orthonormal rows (the hack directions):

    c       = V g                                      [k]
    c_use   = relu(c)  (one_sided, default) | c  (no_gate) | 2c  (reverse)
    removed = overshoot · c_useᵀ V                     [n]
    g_proj  = g − removed                              [n]
    preserve_magnitude:  g_proj ← g_proj · ‖g‖ / ‖g_proj‖

    cin   = ‖relu(V g)‖ / ‖g‖            (0 when ‖g‖ = 0)
    cout  = ‖relu(V g_proj)‖ / ‖g_proj‖  (0 when ‖g_proj‖ = 0)
    fired = share of modules with cin > 1e-6

Arms: ``none`` measures only; ``erase`` sets ``delta.grad = g_proj``; ``route`` also sets
``delta_hack.grad = removed``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from heal_pl.checks import check_choice

Arm = Literal["none", "erase", "route"]
Gate = Literal["one_sided", "no_gate", "reverse"]

FIRED_THRESHOLD = 1e-6


def _compute_dtype(*xs: Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (bf16/fp16 gradients are projected in float32)."""
    return torch.float64 if any(x.dtype == torch.float64 for x in xs) else torch.float32


def check_basis(basis: Tensor, n: int | None = None, atol: float = 1e-4) -> None:
    """Raise ``ValueError`` unless ``basis`` is ``[k, n]`` with orthonormal rows: ``max |V Vᵀ − I| ≤ atol``.

    ``k = 0`` (an empty basis) is allowed and makes the projection the identity.
    """
    if basis.dim() != 2:
        raise ValueError(f"basis must be 2-D [k, n], got shape {tuple(basis.shape)}")
    if n is not None and basis.shape[1] != n:
        raise ValueError(f"basis shape {tuple(basis.shape)} does not match gradient shape ({n},): need [k, {n}]")
    if not basis.is_floating_point():
        raise ValueError(f"basis must be a floating-point tensor, got dtype {basis.dtype}")
    k = basis.shape[0]
    if k == 0:
        return
    V = basis.to(_compute_dtype(basis))
    err = (V @ V.T - torch.eye(k, dtype=V.dtype, device=V.device)).abs().max().item()
    if not err <= atol:  # also catches NaN
        raise ValueError(f"basis rows are not orthonormal: max |V Vᵀ − I| = {err:.3g} > atol={atol:g}")


def project(
    g: Tensor,
    basis: Tensor,
    gate: Gate = "one_sided",
    overshoot: float = 1.0,
    preserve_magnitude: bool = False,
    *,
    atol: float | None = 1e-4,
    zero_rtol: float | None = None,
) -> tuple[Tensor, Tensor]:
    r"""Remove the hack component of a gradient: returns ``(g_proj, removed)``.

    .. math::
        c = V g,\quad c_{use} = \begin{cases}\mathrm{relu}(c) & \text{one\_sided}\\ c & \text{no\_gate}\\
        2c & \text{reverse}\end{cases},\quad \mathrm{removed} = \mathrm{overshoot}\cdot c_{use}^\top V,\quad
        g_{proj} = g - \mathrm{removed}

    ``one_sided`` removes only the directions along which a descent step (``−g``) would move *toward* the
    hack (``c > 0``); ``no_gate`` removes the whole component in span(V); ``reverse`` reflects it, so the
    step moves away from the hack. ``overshoot`` scales what is removed (0 = nothing, 1 = exactly the
    component, > 1 past it).

    With ``preserve_magnitude`` the result is rescaled to ``‖g‖``: ``g_proj ← g_proj · ‖g‖ / ‖g_proj‖``.
    Edge case: when ``‖g_proj‖ ≤ zero_rtol · ‖g‖`` (the projection removed everything, up to rounding,
    e.g. ``g`` inside span(V) with ``one_sided`` or ``no_gate`` at overshoot 1; and always when ``g = 0``)
    ``g_proj`` is returned *unscaled* — zero up to rounding, never NaN, never rounding noise blown up to
    ``‖g‖``. ``removed`` is never rescaled, so ``g_proj + removed = g`` holds only without
    ``preserve_magnitude``.

    Args:
        g: the gradient, 1-D ``[n]``, any float dtype.
        basis: ``V``, ``[k, n]`` with orthonormal rows (``k = 0`` allowed: nothing is removed).
        gate: ``one_sided`` (default) | ``no_gate`` | ``reverse``.
        overshoot: ≥ 0.
        preserve_magnitude: rescale ``g_proj`` to the norm of ``g``.
        atol: tolerance of the orthonormality check ``max |V Vᵀ − I| ≤ atol``; ``None`` skips it (for a
            basis already checked with :func:`check_basis`).
        zero_rtol: the relative norm under which ``g_proj`` counts as zero for ``preserve_magnitude``;
            default ``64 · eps`` of the compute dtype (float32, or float64 when an input is float64).

    Returns:
        ``(g_proj, removed)``, both ``[n]`` in ``g``'s dtype. The maths runs in float32 (float64 if an
        input is float64).

    Example:
        >>> g = torch.tensor([3.0, -4.0, 1.0])
        >>> V = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
        >>> g_proj, removed = project(g, V)             # only the +3 along e0 is removed
        >>> g_proj.tolist(), removed.tolist()
        ([0.0, -4.0, 1.0], [3.0, 0.0, 0.0])
        >>> project(g, V, gate="reverse")[0].tolist()  # both components reflected
        [-3.0, 4.0, 1.0]
    """
    check_choice("gate", gate, Gate)
    if not overshoot >= 0:  # also rejects NaN
        raise ValueError(f"overshoot={overshoot} must be >= 0")
    if g.dim() != 1:
        raise ValueError(f"g must be a 1-D gradient [n], got shape {tuple(g.shape)} (flatten it first)")
    if basis.dim() != 2 or basis.shape[1] != g.shape[0]:
        raise ValueError(
            f"basis shape {tuple(basis.shape)} does not match gradient shape {tuple(g.shape)}: need [k, {g.shape[0]}]"
        )
    if atol is not None:
        check_basis(basis, atol=atol)
    dtype = _compute_dtype(g, basis)
    x, V = g.to(dtype), basis.to(dtype=dtype, device=g.device)
    c = V @ x  # [k]
    if gate == "one_sided":
        c_use = c.clamp_min(0)
    elif gate == "no_gate":
        c_use = c
    else:
        c_use = 2 * c
    removed = (overshoot * c_use) @ V  # [n]
    g_proj = x - removed
    if preserve_magnitude:
        rtol = 64 * torch.finfo(dtype).eps if zero_rtol is None else zero_rtol
        norm_g, norm_p = torch.linalg.vector_norm(x), torch.linalg.vector_norm(g_proj)
        scale = torch.where(norm_p > rtol * norm_g, norm_g / norm_p.clamp_min(torch.finfo(dtype).tiny), 1.0)
        g_proj = g_proj * scale
    return g_proj.to(g.dtype), removed.to(g.dtype)


def _relu_share(V: Tensor, x: Tensor) -> Tensor:
    """``‖relu(V x)‖ / ‖x‖``, 0 when ``‖x‖ = 0``; float32 (float64 for float64 inputs)."""
    norm = torch.linalg.vector_norm(x)
    num = torch.linalg.vector_norm((V @ x).clamp_min(0))
    return torch.where(norm > 0, num / norm.clamp_min(torch.finfo(x.dtype).tiny), 0.0)


def projection_metrics(g: Tensor, g_proj: Tensor, basis: Tensor) -> dict[str, Tensor]:
    r"""How much of the gradient pointed toward the hack, before and after the projection.

    .. math:: \mathrm{cin} = \frac{\lVert \mathrm{relu}(V g)\rVert}{\lVert g\rVert},\qquad
              \mathrm{cout} = \frac{\lVert \mathrm{relu}(V g_{proj})\rVert}{\lVert g_{proj}\rVert}

    each 0 when its denominator is 0. Both lie in [0, 1] (V has orthonormal rows).

    Args:
        g: the gradient before projection, ``[n]``.
        g_proj: after projection, ``[n]``.
        basis: ``V``, ``[k, n]``.

    Returns:
        ``{"cin": ..., "cout": ...}``, detached 0-d tensors (float32, or float64 for float64 inputs).

    Example:
        >>> V = torch.tensor([[1.0, 0.0]])
        >>> {k: round(v.item(), 6) for k, v in projection_metrics(torch.tensor([3.0, 4.0]),
        ...                                                        torch.tensor([0.0, 4.0]), V).items()}
        {'cin': 0.6, 'cout': 0.0}
    """
    if g.dim() != 1 or g_proj.shape != g.shape:
        raise ValueError(f"g and g_proj must be 1-D of the same shape, got {tuple(g.shape)} and {tuple(g_proj.shape)}")
    if basis.dim() != 2 or basis.shape[1] != g.shape[0]:
        raise ValueError(
            f"basis shape {tuple(basis.shape)} does not match gradient shape {tuple(g.shape)}: need [k, {g.shape[0]}]"
        )
    dtype = _compute_dtype(g, g_proj, basis)
    with torch.no_grad():
        V = basis.to(dtype=dtype, device=g.device)
        return {"cin": _relu_share(V, g.to(dtype)), "cout": _relu_share(V, g_proj.to(dtype))}


def fired(cins: Sequence[Tensor | float], threshold: float = FIRED_THRESHOLD) -> float:
    """Share of modules whose ``cin`` exceeds ``threshold`` (default 1e-6): the projection did something.

    Example:
        >>> fired([0.0, 0.3, 1e-9, 0.5])
        0.5
    """
    if len(cins) == 0:
        raise ValueError("fired: no module's cin given (the routed adapter has no module with a basis?)")
    values = [float(c) for c in cins]
    return sum(v > threshold for v in values) / len(values)
