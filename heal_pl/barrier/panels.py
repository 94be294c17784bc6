r"""Where the student drifted: the TensorBoard panels of a validation epoch (``HealModule``, ``KLBarrierCallback``).

At the end of every validation epoch (sanity checks skipped; nothing with ``reg = nll``) two panels go to each
``TensorBoardLogger`` of the trainer, at the step of the ``val/*`` scalars:

- ``{prefix}val/kl_hist`` (histogram): the float32 per-token KL of *every* validation token, the very values
  whose mean / rmse / p95 / max are ``val/kl_*`` (gathered across DDP ranks, not sampled);
- ``{prefix}val/kl_top`` (text): the ``k`` positions of largest KL, largest first: the KL, the ~``context``
  tokens before the position, the completion token that follows it, and the student's and the base's top-1
  next tokens there. A header line gives the token count, the mean and max KL and the share of the epoch's
  total KL that these ``k`` positions hold.

Exactness of the top-k: the ``k`` largest of the epoch are among the union of each batch's ``k`` largest,
so :meth:`DriftPanels.update` keeps only those (with their context ids), and :meth:`DriftPanels.top` merges
them (across ranks too) and re-runs the student and the base on the ``k`` winning prefixes, one row each:
the model is causal, so the logits at the last position equal those of the validation forward.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor, nn

from heal_pl.adapters.switch import adapter_off
from heal_pl.barrier.distributed import gather_tokens, world_size
from heal_pl.barrier.positions import counted_positions


def logged_step(trainer: L.Trainer) -> int:
    """The step Lightning writes ``val/*`` scalars at (``global_step − 1`` inside fit), so panels line up with them."""
    return int(getattr(trainer.fit_loop.epoch_loop, "_batches_that_stepped", trainer.global_step))


Logits = Callable[[dict[str, Tensor]], Tensor]  # {input_ids, attention_mask[, position_ids]} [1, T] -> [1, T, V]


@dataclass
class Drift:
    """One drifting position ``t``: ``KL_t``, the row's ids and mask (and position ids, for packed rows) through
    ``t``, the token at ``t + 1``."""

    kl: float
    ids: list[int]
    mask: list[int]
    target: int
    student_top1: int | None = None
    base_top1: int | None = None
    positions: list[int] | None = None


class DriftPanels:
    """Collects one validation epoch's per-token KL and top-``k`` positions; writes the two panels.

    Args:
        k: rows of the text panel.
        context: tokens of context shown before each position.
    """

    def __init__(self, k: int = 10, context: int = 10) -> None:
        if k < 1 or context < 0:
            raise ValueError(f"DriftPanels: k={k} must be >= 1 and context={context} >= 0")
        self.k, self.context = k, context
        self.reset()

    def reset(self) -> None:
        self.kl: list[Tensor] = []
        self.candidates: list[Drift] = []

    def update(self, kl: Tensor, batch: Mapping[str, Tensor]) -> None:
        """Add one batch: ``kl`` is this rank's per-token KL at ``counted_positions(labels, mask)``, in order."""
        kl = kl.detach().float().reshape(-1)
        self.kl.append(kl)
        if kl.numel() == 0:
            return
        mask, positions = batch.get("attention_mask"), batch.get("position_ids")
        counted = counted_positions(batch["labels"], mask)
        values, order = kl.topk(min(self.k, kl.numel()))
        for value, i in zip(values.tolist(), order.tolist(), strict=True):
            b, t = int(counted.batch_idx[i]), int(counted.pos_idx[i])
            row_mask = [1] * (t + 1) if mask is None else mask[b, : t + 1].tolist()
            row_positions = None if positions is None else positions[b, : t + 1].tolist()
            self.candidates.append(Drift(value, batch["input_ids"][b, : t + 1].tolist(), row_mask,
                                         int(counted.targets[i]), positions=row_positions))  # fmt: skip
        self.candidates = heapq.nlargest(self.k, self.candidates, key=lambda d: d.kl)

    def all_kl(self, device: torch.device) -> Tensor:
        """Every validation token's KL (all ranks, in rank order), float32."""
        local = torch.cat(self.kl).to(device) if self.kl else torch.zeros(0, device=device)
        return gather_tokens(local)

    @torch.no_grad()
    def top(self, student: Logits, base: Logits, device: torch.device) -> list[Drift]:
        """The epoch's ``k`` largest-KL positions (all ranks), with the student's and the base's top-1 tokens.

        Every rank runs the same ``2 k`` one-row forwards (so sharded models stay in step)."""
        candidates = self.candidates
        if world_size() > 1:
            parts: list[list[Drift] | None] = [None] * world_size()
            dist.all_gather_object(parts, candidates)
            candidates = [d for part in parts for d in part or []]
        top = heapq.nlargest(self.k, candidates, key=lambda d: d.kl)
        for d in top:
            inputs = {"input_ids": torch.tensor([d.ids], device=device),
                      "attention_mask": torch.tensor([d.mask], device=device)}  # fmt: skip
            if d.positions is not None:
                inputs["position_ids"] = torch.tensor([d.positions], device=device)
            d.student_top1 = int(student(inputs)[0, -1].argmax())
            d.base_top1 = int(base(inputs)[0, -1].argmax())
        return top

    def log(self, trainer: L.Trainer, model: nn.Module, ref_model: nn.Module | None = None, prefix: str = "") -> None:
        """Write ``{prefix}val/kl_hist`` and ``{prefix}val/kl_top`` to every TensorBoard logger, then reset.

        ``model`` is the student (peft or routed); the base is ``ref_model`` when given, else ``model`` with its
        adapter off. Tokens are decoded with ``trainer.datamodule.tokenizer`` when there is one (ids otherwise).
        """
        device = next(model.parameters()).device

        def student(inputs: dict[str, Tensor]) -> Tensor:
            return model(**inputs).logits

        def base(inputs: dict[str, Tensor]) -> Tensor:
            if ref_model is not None:
                return ref_model(**inputs).logits
            with adapter_off(model):
                return model(**inputs).logits

        kl, top = self.all_kl(device), self.top(student, base, device)
        self.reset()
        tokenizer = getattr(trainer.datamodule, "tokenizer", None)
        writers = [lg.experiment for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
        if not trainer.is_global_zero or kl.numel() == 0:
            return
        step, text = logged_step(trainer), drift_table(kl, top, tokenizer, self.context)
        for writer in writers:
            writer.add_histogram(f"{prefix}val/kl_hist", kl.cpu(), step)
            writer.add_text(f"{prefix}val/kl_top", text, step)


# --------------------------------------------------------------------------- the text panel

_MD_ESCAPE = str.maketrans({c: "\\" + c for c in "\\`*_{}[]()#+-.!|"} | {"<": "&lt;", ">": "&gt;"})


def _piece(tokenizer: object | None, ids: list[int], one_token: bool = False) -> str:
    """Markdown-safe text of ``ids``: newlines and tabs shown as ``\\n`` / ``\\t``; a lone token's spaces as ``␣``;
    token ids in brackets when there is no tokenizer."""
    if tokenizer is None:
        return " ".join(f"[{i}]" for i in ids)
    text = tokenizer.decode(ids).replace("\n", "\\n").replace("\t", "\\t")
    return (text.replace(" ", "␣") if one_token else text).translate(_MD_ESCAPE)


def drift_table(kl: Tensor, top: list[Drift], tokenizer: object | None, context: int = 10) -> str:
    """The markdown of the ``val/kl_top`` panel: a summary line, then one table row per drifting position.

    The share is ``Σ_{top k} KL_t / Σ_t KL_t`` over every validation token (0 when all KL is 0)."""
    total = float(kl.double().sum())
    share = sum(d.kl for d in top) / total if total > 0 else 0.0
    lines = [
        f"{kl.numel()} validation tokens: mean KL {float(kl.double().mean()):.4g}, max {float(kl.max()):.4g} nats; "
        f"the top {len(top)} positions hold {share:.1%} of the total KL.",
        "",
        "| # | KL (nats) | context | next token | student top-1 | base top-1 |",
        "|---|---|---|---|---|---|",
    ]
    for rank, d in enumerate(top, 1):
        ctx = [i for i, m in zip(d.ids, d.mask, strict=True) if m][-context:] if context else []
        cells = [str(rank), f"{d.kl:.4g}", "…" + _piece(tokenizer, ctx), _piece(tokenizer, [d.target], True),
                 _piece(tokenizer, [d.student_top1], True), _piece(tokenizer, [d.base_top1], True)]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
