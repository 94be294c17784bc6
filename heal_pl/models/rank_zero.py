"""Read the base's weights on global rank 0 only (``HealModule(load_on="rank_zero")``, ``configs/gpu/llama70b_fsdp``).

Under FSDP every process builds the LightningModule before anything is sharded. Loaded on every rank, a 70B base in
bf16 is ~140 GB of host memory per rank, ~1.1 TB on a node of 8. With ``load_on: rank_zero`` only global rank 0
reads the checkpoint; every other rank builds the same architecture with its *parameters* on the meta device (no
memory, no initialisation) and its buffers real (rotary tables and the like are computed, not stored in checkpoints,
and some models keep plain-tensor copies of them that FSDP would never materialise). When FSDP wraps the module with
``sync_module_states=True`` it materialises each unit's meta parameters on the rank's device and broadcasts rank 0's
values into them, one unit at a time, before sharding: every rank ends with rank 0's exact weights (and rank 0's
adapter initialisation). :func:`prepare_strategy` asks Lightning's FSDPStrategy for that broadcast and refuses
any other strategy, on every rank, before the first collective.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any, Literal

import torch
from torch import nn

LoadOn = Literal["every_rank", "rank_zero"]
_RANK_VARIABLES = ("RANK", "SLURM_PROCID")  # torchrun / SLURM; Lightning's own launcher sets LOCAL_RANK, NODE_RANK


def is_launch_rank_zero() -> bool:
    """Whether this process is global rank 0, read from the launcher's environment (the process group does not exist
    yet when a LightningModule is built). A process started by hand, with none of the variables, is rank 0."""
    for name in _RANK_VARIABLES:
        if name in os.environ:
            return int(os.environ[name]) == 0
    return all(int(os.environ.get(name, 0)) == 0 for name in ("LOCAL_RANK", "NODE_RANK", "GROUP_RANK"))


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Inside, every parameter a module registers is moved to the meta device as it is registered (before any
    initialiser runs on it, so building costs neither memory nor time); buffers are built as usual."""
    register = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = register_on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


def has_meta_parameters(module: nn.Module) -> bool:
    """Whether any parameter of ``module`` is still on the meta device (this rank awaits rank 0's weights)."""
    return any(p.is_meta for p in module.parameters())


def prepare_strategy(load_on: LoadOn, strategy: Any, world_size: int) -> None:
    """Make the strategy fill the empty ranks: an ``FSDPStrategy`` gets ``sync_module_states=True`` and
    ``param_init_fn=materialize_empty`` (Lightning passes its extra keywords to FSDP when it wraps the module, after
    ``LightningModule.setup``); any other strategy on several processes is refused. Called on every rank at
    start-up (all raise together, none waits in a collective); a no-op for ``every_rank`` or one process."""
    if load_on != "rank_zero" or world_size <= 1:
        return
    from lightning.pytorch.strategies import FSDPStrategy

    why = None
    if not isinstance(strategy, FSDPStrategy):
        why = f"the strategy is {type(strategy).__name__}, which has no way to broadcast them"
    elif strategy.kwargs.get("sync_module_states", True) is not True:
        why = "the FSDPStrategy was given sync_module_states=False"
    if why is not None:
        raise ValueError(
            f"load_on='rank_zero' on {world_size} processes needs FSDPStrategy, which broadcasts rank 0's weights "
            f"to the ranks that built the model empty; {why}. Use trainer.strategy: FSDPStrategy (as in "
            "configs/gpu/llama70b_fsdp.yaml), or load_on: every_rank"
        )
    strategy.kwargs.update(sync_module_states=True, param_init_fn=materialize_empty)


def materialize_empty(module: nn.Module) -> None:
    """FSDP ``param_init_fn`` for an empty model: give ``module``'s own meta parameters storage on this rank's device,
    uninitialised (``sync_module_states`` overwrites them with rank 0's next, so no initialiser needs to run).
    Set by :func:`prepare_strategy`."""
    if not any(t.is_meta for t in (*module.parameters(recurse=False), *module.buffers(recurse=False))):
        return  # FSDP calls it on every module of the unit
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    module.to_empty(device=device, recurse=False)
