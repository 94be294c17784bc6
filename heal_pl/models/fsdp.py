"""What heal_pl needs from a model sharded by FSDP (``configs/gpu/fsdp.yaml``): its blocks as the FSDP units, names
without FSDP's wrapper segments, the root unit's weights outside the root forward, and the adapter's full tensors.

Under ``FSDPStrategy`` Lightning wraps the LightningModule in a root FSDP unit (embeddings, final norm, LM head)
and each decoder block in its own unit (:func:`decoder_blocks`). A unit's weights are whole only while its forward
runs, so anything heal_pl runs outside the training / validation step (the drift panels' forwards, an iso-KL
calibration) needs the root unit gathered (:func:`gathered_root`; the blocks gather themselves when called), and
every rank must run the same forwards. Parameter names carry ``_fsdp_wrapped_module.`` (and activation
checkpointing's ``_checkpoint_wrapped_module.``) segments that state dicts do not: :func:`clean_name` drops them.
:func:`adapter_tensors` gathers one unit at a time, so no rank ever holds more than one block's weights in full.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Collection, Iterator

from torch import Tensor, nn
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from transformers.modeling_layers import GradientCheckpointingLayer

_WRAPPERS = re.compile(r"(?:_fsdp_wrapped_module|_checkpoint_wrapped_module|_orig_mod)\.")


def clean_name(name: str) -> str:
    """``name`` without wrapper segments (``_fsdp_wrapped_module.a._fsdp_wrapped_module.w`` -> ``a.w``)."""
    return _WRAPPERS.sub("", name)


def decoder_blocks(module: nn.Module, recurse: bool, nonwrapped_numel: int) -> bool:
    """FSDP auto-wrap policy: every decoder block is a unit, in any family (transformers builds each as a
    ``GradientCheckpointingLayer``). YAML: ``auto_wrap_policy: heal_pl.models.fsdp.decoder_blocks``."""
    return recurse or isinstance(module, GradientCheckpointingLayer)


def is_sharded(model: nn.Module | None) -> bool:
    """Whether ``model`` (e.g. ``trainer.strategy.model``) is, or holds, an FSDP unit."""
    return model is not None and any(isinstance(m, FSDP) for m in model.modules())


@contextlib.contextmanager
def gathered_root(model: nn.Module | None) -> Iterator[None]:
    """Inside, the root FSDP unit's own weights are whole (the blocks gather theirs when they run); a no-op when
    ``model`` is not FSDP. Collective: every rank enters it, and then runs the same forwards."""
    if not isinstance(model, FSDP):
        yield
        return
    with FSDP.summon_full_params(model, recurse=False, writeback=False):
        yield


def adapter_tensors(model: nn.Module, names: Collection[str]) -> dict[str, Tensor]:
    """Full CPU copies of the parameters of ``model`` whose :func:`clean_name` is in ``names``, by clean name.

    Under FSDP each unit is gathered alone (``summon_full_params(recurse=False)``), its own parameters copied, and
    released: collective, every rank must call it, and every rank gets the tensors. Otherwise a plain copy.
    """
    units = [(prefix, unit) for prefix, unit in model.named_modules() if isinstance(unit, FSDP)]
    if not units:
        return {clean_name(n): p.detach().cpu().clone() for n, p in model.named_parameters() if clean_name(n) in names}
    out: dict[str, Tensor] = {}
    for prefix, unit in units:
        nested = {id(p) for m in unit.modules() if m is not unit and isinstance(m, FSDP) for p in m.parameters()}
        with FSDP.summon_full_params(unit, recurse=False, writeback=False):
            for n, p in unit.named_parameters():
                name = clean_name(f"{prefix}.{n}" if prefix else n)
                if id(p) not in nested and name in names:
                    out[name] = p.detach().cpu().clone()
    return out


def check_block_units(model: nn.Module, policy: object) -> None:
    """Refuse :func:`decoder_blocks` as the wrap policy of a model in which it finds no block: FSDP would then shard
    nothing but the root unit, i.e. gather the whole model on every rank. Names the block classes found instead."""
    if policy is not decoder_blocks or any(isinstance(m, GradientCheckpointingLayer) for m in model.modules()):
        return
    from heal_pl.models.lm import find_blocks

    try:
        found = sorted({type(b).__name__ for b in find_blocks(model)})
    except ValueError as error:
        found = [str(error)]
    raise ValueError(
        f"auto_wrap_policy=heal_pl.models.fsdp.decoder_blocks finds no decoder block in {type(model).__name__}: its "
        f"blocks ({', '.join(found)}) are not transformers GradientCheckpointingLayers, so FSDP would shard nothing. "
        "Give the FSDPStrategy the block class itself: auto_wrap_policy: {BlockClass} (a set of classes)"
    )
