"""Gradient routing inside a training step: which gradient goes to ``delta`` and which to ``delta_hack``
(docs/maths.md §2.4).

Runs once per optimizer step on the accumulated gradient — in Lightning, ``on_before_optimizer_step``:
the precision plugin has already unscaled AMP gradients (``MixedPrecision.optimizer_step`` calls
``scaler.unscale_`` before the hook) and clips them after it (``Precision._after_closure``), so
``gradient_clip_val`` clips ``delta`` and ``delta_hack`` together. Per routed module, with
``g = delta.grad.flatten()`` and ``(g_proj, removed) = heal_pl.routing.project.project(g, V, ...)``:

    arm     delta.grad     delta_hack.grad
    none    g              None            (measure only)
    erase   g_proj         None
    route   g_proj         removed         (delta gets exactly erase's gradient, bit for bit)

``None`` means the optimizer skips ``delta_hack``; the quarantine knob only ever moves under ``route``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from transformers import PreTrainedModel

from heal_pl.adapters.routed import (  # noqa: F401 (hack_decay_groups: also public here)
    RoutedAdapter,
    RoutedLinear,
    hack_decay_groups,
    routed_modules,
)
from heal_pl.checks import check_choice
from heal_pl.routing.project import Arm, Gate, fired, project, projection_metrics


def route_gradients(
    adapter: RoutedAdapter,
    bases: Mapping[str, Tensor],
    arm: Arm = "route",
    gate: Gate = "one_sided",
    overshoot: float = 1.0,
    preserve_magnitude: bool = False,
) -> dict[str, float]:
    """Project every routed module's ``delta.grad`` off its hack basis and hand out the parts by ``arm``.

    Modules whose ``delta`` received no gradient in the step are skipped (not counted; ``delta_hack.grad``
    set to None).

    Returns:
        ``{"cin", "cout", "fired"}``: mean over modules of ``cin`` and ``cout`` (of the gradient ``delta``
        actually keeps: under ``none`` that is ``g`` itself, so ``cout = cin``) and the share of modules
        that fired (``cin > 1e-6``). Empty when no module had a gradient.

    Raises:
        ValueError: unknown ``arm`` or ``gate``; a module of the adapter without a basis.
    """
    check_choice("arm", arm, Arm)
    check_choice("gate", gate, Gate)
    missing = [name for name in adapter.names() if name not in bases]
    if missing:
        raise ValueError(f"no hack basis for routed modules {missing[:4]}{' …' if len(missing) > 4 else ''}")
    cins, couts = [], []
    with torch.no_grad():
        for name, m in adapter:
            g = m.delta.grad
            if g is None:
                m.delta_hack.grad = None  # autograd may have filled it; only the router hands it a gradient
                continue
            flat = g.flatten()
            V = bases[name].to(device=flat.device)
            g_proj, removed = project(flat, V, gate, overshoot, preserve_magnitude, atol=None)
            metrics = projection_metrics(flat, flat if arm == "none" else g_proj, V)
            cins.append(metrics["cin"].item())
            couts.append(metrics["cout"].item())
            if arm != "none":
                g.copy_(g_proj.view_as(g))
            m.delta_hack.grad = removed.view_as(g).clone() if arm == "route" else None
    if not cins:
        return {}
    return {"cin": sum(cins) / len(cins), "cout": sum(couts) / len(couts), "fired": fired(cins)}


def find_routed_adapter(module: nn.Module) -> RoutedAdapter:
    """The routed adapter inside ``module`` (any ``nn.Module``, e.g. a foreign LightningModule).

    An attribute holding a :class:`RoutedAdapter` wins; otherwise the adapter is built over the outermost
    Hugging Face model (``PreTrainedModel``) that holds ``RoutedLinear`` layers.

    Raises:
        ValueError: no routed layer at all, or routed layers outside any Hugging Face model.
    """
    for value in vars(module).values():
        if isinstance(value, RoutedAdapter):
            return value
    layers = [m for _, m in routed_modules(module)]
    if not layers:
        children = ", ".join(f"{n}: {type(c).__name__}" for n, c in module.named_children()) or "none"
        raise ValueError(
            f"{type(module).__name__} holds no routed adapter (wrap its model with "
            f"heal_pl.adapters.routed.wrap_routed); its children are [{children}]"
        )
    for candidate in module.modules():
        if isinstance(candidate, PreTrainedModel) and any(isinstance(m, RoutedLinear) for m in candidate.modules()):
            return RoutedAdapter(candidate, layers[0].spec)
    raise ValueError(f"the routed layers of {type(module).__name__} are not inside a Hugging Face PreTrainedModel")


def force_zero_hack_decay(
    optimizer: torch.optim.Optimizer, hack: Sequence[nn.Parameter], schedulers: Sequence[Any] = ()
) -> int:
    """Move hack knobs that sit in a param group with ``weight_decay != 0`` into a copy of it with decay 0.

    The new group keeps every other setting (lr, betas, ``initial_lr``); schedulers on ``optimizer`` get the
    source group's ``base_lrs`` / ``lr_lambdas`` entry appended so they keep stepping every group. Call it
    before the optimizer has state (Lightning: ``on_fit_start``, before a checkpoint's optimizer state is
    restored). Returns how many parameters moved (a warning says so when > 0).
    """
    hack_ids = {id(p) for p in hack}
    moved = 0
    for gi, group in enumerate(list(optimizer.param_groups)):
        decay = group.get("weight_decay", 0.0)
        take = [p for p in group["params"] if id(p) in hack_ids]
        if not take or not decay:
            continue
        group["params"] = [p for p in group["params"] if id(p) not in hack_ids]
        settings = {k: v for k, v in group.items() if k != "params"}
        optimizer.add_param_group({**settings, "params": take, "weight_decay": 0.0})  # (an emptied group stays)
        for sched in schedulers:
            if getattr(sched, "optimizer", None) is not optimizer:
                continue
            for attr in ("base_lrs", "lr_lambdas", "_last_lr"):
                values = getattr(sched, attr, None)
                if isinstance(values, list) and len(values) > gi:
                    values.append(values[gi])
        moved += len(take)
        rank_zero_warn(
            f"optimizer param group {gi} has weight_decay={decay}; its {len(take)} delta_hack knobs moved to a "
            "new group with weight_decay=0 (the quarantine must not decay)"
        )
    return moved
