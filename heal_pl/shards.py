"""Prompts sharded across the processes of a ``torchrun`` job (``heal calibrate | survival | compare`` on N GPUs).

    torchrun --nproc_per_node 4 $(which heal) survival --config survival

Under ``torchrun`` (``WORLD_SIZE > 1`` in the environment) :func:`init` joins the job's process group (NCCL on
GPUs, gloo on CPUs) and pins each process to the GPU of its ``LOCAL_RANK``, so ``device: auto`` is that GPU and
every process holds one copy of the model. Inside :func:`sharded`, :func:`heal_pl.steering.trajectory.measure_kl`
(and the survival sweep's fork probes) give each process a contiguous block of the prompts (:func:`block`) and
gather the per-prompt results of all of them in prompt order (:func:`gather`): every statistic (the p95 above
all) is the pooled one of all prompts, equal on every process, so the calibration's bisection takes the same
steps everywhere. Only rank 0 writes files (:func:`is_writer`; the journal, the tables, the figures); every process
reads the journal at start, so a rerun after a kill skips the same finished steps on all of them and repeats only
the step (an iteration, an α) that was under way, whole.

Outside :func:`sharded`, or in a single process, nothing changes: a LightningModule's forwards under DDP or FSDP
(which must run in lockstep on every rank) are never sharded by it.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from contextvars import ContextVar
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")
_SHARDED: ContextVar[bool] = ContextVar("heal_pl_sharded", default=False)


def init() -> None:
    """Join the ``torchrun`` job this process belongs to, if any (``WORLD_SIZE > 1``), pinned to its
    ``LOCAL_RANK``'s GPU when there are GPUs (heal_pl logs warnings only on the other ranks); a no-op in a single
    process or when a group exists already."""
    if int(os.environ.get("WORLD_SIZE", 1)) <= 1 or dist.is_initialized():
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if not is_writer():  # one voice: rank 0 logs the progress, the others only their warnings
        logging.getLogger("heal_pl").setLevel(logging.WARNING)


def rank() -> int:
    """This process's rank in the job (0 without one)."""
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    """The number of processes of the job (1 without one)."""
    return dist.get_world_size() if dist.is_initialized() else 1


def is_writer() -> bool:
    """Whether this process writes the outputs: rank 0."""
    return rank() == 0


@contextlib.contextmanager
def sharded() -> Iterator[None]:
    """Inside, the prompt loops of the steering commands are split across the job's processes (module docstring)."""
    token = _SHARDED.set(True)
    try:
        yield
    finally:
        _SHARDED.reset(token)


def active() -> bool:
    """Whether the prompts are split here: inside :func:`sharded`, in a job of several processes."""
    return _SHARDED.get() and world_size() > 1


def block(n: int, what: str = "prompts") -> range:
    """The indices of this process's share of ``n`` items: contiguous blocks, sizes differing by at most one (all of
    them outside a sharded job).

    Raises:
        ValueError: fewer items than processes (some would have nothing to do); names both counts.
    """
    if not active():
        return range(n)
    size, me = world_size(), rank()
    if n < size:
        raise ValueError(f"{n} {what} cannot be shared by {size} processes (torchrun --nproc_per_node); give at "
                         f"least {size} {what}, or run fewer processes")  # fmt: skip
    return range(me * n // size, (me + 1) * n // size)


def gather(local: Sequence[T]) -> list[T]:
    """Every process's ``local`` items (from :func:`block`'s share), concatenated in rank order: the whole list in its
    original order, on every process. Items are pickled (tensors on the CPU). Outside a sharded job, ``local``."""
    if not active():
        return list(local)
    parts: list[Any] = [None] * world_size()
    dist.all_gather_object(parts, list(local))
    return [item for part in parts for item in part]


def on_writer(make: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``make(*args, **kwargs)`` on rank 0 (a TensorBoard ``SummaryWriter``, …); on the other processes an object
    whose every method does nothing, so the callers need no rank test."""
    return make(*args, **kwargs) if is_writer() else _Silent()  # type: ignore[return-value]


class _Silent:
    """Any method, any arguments: nothing."""

    def __getattr__(self, name: str) -> Callable[..., None]:
        return lambda *args, **kwargs: None
