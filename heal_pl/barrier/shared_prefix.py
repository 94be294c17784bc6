"""Run the blocks below the adapter once per step: the student's forward computes them, the ref's reuses them.

When the adapter covers only decoder blocks ``[lo, hi)`` (``lora.layers``, the seeds adapt ``[0.2, 0.8)``),
the embeddings and blocks ``0 … lo−1`` compute the same numbers with the adapter on and off:

    h_lo(student) = B_{lo−1} ∘ … ∘ B_0 ∘ E (x) = h_lo(ref)

so the ref's forward can start at block ``lo`` from the student's ``h_lo``. :class:`SharedPrefix` captures the
output of block ``lo − 1`` during the student's forward and, during the ref's, replaces blocks ``0 … lo−1`` by
that output (each ignores its input and returns it), so the ref pays for blocks ``lo … L−1`` only. Whatever
a family's blocks take and return (masks, rotary tables, tuples) is passed through untouched.

It is exact only where the prefix is deterministic and adapter-free: :func:`first_adapted_block` gives
``lo = 0`` (nothing shared) when an adapter parameter sits outside the blocks, and the caller shares nothing
when :func:`prefix_dropout` finds a dropout that the student's forward could apply below ``lo``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import Tensor, nn

from heal_pl.models.lm import find_blocks


def first_adapted_block(model: nn.Module, adapter_params: set[int]) -> int:
    """Index of the first decoder block holding an adapter parameter (by ``id``); 0 (nothing to share) when an
    adapter parameter sits outside the blocks (embeddings, head) or there is none."""
    blocks = find_blocks(model)
    owner = {id(p): i for i, block in enumerate(blocks) for p in block.parameters()}
    found = [owner.get(pid) for pid in adapter_params]
    if not found or None in found:
        return 0
    return min(i for i in found if i is not None)


def prefix_dropout(model: nn.Module, lo: int) -> str | None:
    """What in the embeddings or blocks ``0 … lo−1`` can drop out (a module or a config rate), or ``None``."""
    config = getattr(model, "config", None)
    rates = {k: v for k, v in vars(config).items() if isinstance(v, float) and v > 0
             and (k.endswith("dropout") or k.endswith("pdrop"))} if config is not None else {}  # fmt: skip
    if rates:
        return ", ".join(f"config.{k}={v}" for k, v in sorted(rates.items()))
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    for part in (*list(find_blocks(model))[:lo], *([embed] if embed is not None else [])):
        for m in part.modules():
            if isinstance(m, nn.Dropout) and m.p > 0:
                return f"{type(m).__name__}(p={m.p})"
    return None


def _detached(out: object) -> object:
    """A block's output (a tensor, or a tuple of them and other things) with every tensor detached."""
    if isinstance(out, Tensor):
        return out.detach()
    if isinstance(out, tuple):
        return tuple(_detached(o) for o in out)
    return out


class SharedPrefix:
    """Capture block ``lo − 1``'s output in one forward (:meth:`capture`), replay it in the next (:meth:`replay`).

    Args:
        model: the (peft-wrapped) causal LM.
        lo: the first adapted block; ``lo = 0`` makes both contexts no-ops.
    """

    def __init__(self, model: nn.Module, lo: int) -> None:
        self.blocks, self.lo = find_blocks(model), lo
        self.prefix = nn.ModuleList(list(self.blocks)[:lo])
        self._out: object | None = None

    @property
    def active(self) -> bool:
        return self.lo > 0

    @contextlib.contextmanager
    def capture(self) -> Iterator[None]:
        """Keep block ``lo − 1``'s output of the forward run inside this context."""
        if not self.active:
            yield
            return

        def keep(_module: nn.Module, _args: object, out: object) -> None:
            self._out = _detached(out)

        handle = self.prefix[-1].register_forward_hook(keep)
        try:
            yield
        finally:
            handle.remove()

    @contextlib.contextmanager
    def replay(self) -> Iterator[None]:
        """Inside, blocks ``0 … lo−1`` return the captured output instead of computing (then it is dropped)."""
        if not self.active:
            yield
            return
        if self._out is None:
            raise RuntimeError("shared prefix: replay() without a captured forward (call capture() first)")
        out = self._out

        def replayed(*_args: object, **_kwargs: object) -> object:
            return out

        for block in self.prefix:
            block.forward = replayed  # instance attribute: nn.Module.__call__ finds it first
        try:
            yield
        finally:
            for block in self.prefix:
                del block.forward
            self.drop()

    def drop(self) -> None:
        """Forget the captured output (the ref did not need it: cached rows, or no barrier)."""
        self._out = None
