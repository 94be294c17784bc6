"""Where the barrier's ref rows come from (docs/maths.md §1): the student with its adapter switched off, or a
separate frozen model (:meth:`RefSource.set_ref_model`, the steer → heal rounds' ``ref = base``); through the
shared prefix (blocks below the first adapted one run once for both) and the optional ref-row cache.

:class:`RefSource` is mixed into :class:`heal_pl.module.HealModule`; it reads ``self.student``, ``self.head``,
``self.ref_cache`` and ``self.shared_prefix``.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor

from heal_pl.adapters.switch import ref_rows
from heal_pl.barrier.positions import gather_rows
from heal_pl.barrier.ref_cache import example_keys, ref_fingerprint
from heal_pl.barrier.shared_prefix import SharedPrefix, first_adapted_block, prefix_dropout
from heal_pl.models.lm import base_lm, last_hidden

log = logging.getLogger("heal_pl")


class RefSource:
    """The ref side of :class:`heal_pl.module.HealModule`'s barrier."""

    def set_ref_model(self, ref_model: torch.nn.Module | None) -> None:
        """Leash the barrier to ``ref_model`` (frozen, kept out of the submodules and checkpoints) instead of the
        adapter-off student; ``None`` restores the default. Steer → heal rounds use it for ``ref = prev``: a view of
        the student's own adapter stack with only the earlier rounds on (:class:`heal_pl.rounds.stack.AdaptersView`).
        Its hidden rows go through the student's LM head, so the adapter must not touch the head."""
        if ref_model is not None:
            head = base_lm(ref_model).get_output_embeddings()
            mine = self.head.proj.weight  # compared where the ref's head is (the ref may sit on the GPU already)
            if head is None or not torch.equal(head.weight, mine.to(head.weight.device, head.weight.dtype)):
                raise ValueError("set_ref_model: ref_model's LM head must equal the student's (its rows go through it)")
            ref_model.requires_grad_(False).eval()
        self.__dict__["_ref_model"] = ref_model  # plain attribute: not registered, not trained, not saved
        if self.ref_cache is not None:
            self.ref_cache.clear("set_ref_model changed the ref")
            self.ref_cache.fingerprint = None

    def _ref_rows(self, batch: dict[str, Tensor], counted: Any) -> tuple[Tensor, list[bytes] | None]:
        """The ref's hidden rows at the counted positions, and the batch's ref-cache keys (``None`` without a cache:
        the module then reads and keeps the ref logits' LSE under them, :mod:`heal_pl.barrier.lazy_head`)."""
        input_ids, mask = batch["input_ids"], batch.get("attention_mask")
        ref_model = self.__dict__.get("_ref_model")

        def compute() -> Tensor:
            if ref_model is None:
                with self.shared_prefix.replay():
                    return ref_rows(self.student, input_ids, mask, counted)
            with torch.no_grad():
                return gather_rows(last_hidden(ref_model, input_ids, mask), counted)

        if self.ref_cache is None:
            return compute(), None
        keys = example_keys(input_ids, mask, batch["labels"])
        return self.ref_cache.rows(keys, counted, compute), keys

    def _shared_prefix(self) -> SharedPrefix:
        """The blocks below the first adapted one, run once for student and ref
        (:mod:`heal_pl.barrier.shared_prefix`)."""
        trainable = self.trainable_names()
        lo = first_adapted_block(self.student, {id(p) for n, p in self.named_parameters() if n in trainable})
        why = prefix_dropout(base_lm(self.student), lo) if lo > 0 else None
        if why is not None:
            log.info("heal_pl: blocks 0..%d are not shared between student and ref (%s can drop out)", lo - 1, why)
            lo = 0
        elif lo > 0:
            log.info("heal_pl: blocks 0..%d carry no adapter: the ref's forward starts at block %d", lo - 1, lo)
        return SharedPrefix(self.student, lo)

    def _check_ref_cache(self) -> None:
        """Empty the ref cache if the ref's weights (the base, or the ``set_ref_model`` model) changed."""
        if self.ref_cache is None:
            return
        ref_model = self.__dict__.get("_ref_model")
        if ref_model is not None:
            self.ref_cache.check(ref_fingerprint(("ref_model", id(ref_model)), ref_model.parameters()))
            return
        trainable = self.trainable_names()
        adapter = {id(p) for n, p in self.named_parameters() if n in trainable}
        base = [p for p in self.student.parameters() if id(p) not in adapter]
        self.ref_cache.check(ref_fingerprint(("adapter_off", id(self.student)), base))
