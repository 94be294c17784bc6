"""An exact cache of the ref's final hidden rows at the counted positions of each example.

With ``ref = base`` the ref is frozen and the data are fixed, so the rows the barrier reads from the ref,

    R(x) = h_ref(x)[t]  for every counted position t of example x        ([n_x, d], the ref's dtype)

are the same numbers every epoch. The first time an example is seen its rows are stored; later epochs read
them instead of running the ref's forward, which turns every epoch after the first into SFT + a head pass.
Storing hidden rows (not top-k logits, as offline distillation does) keeps the KL exact: the rows still go
through the full LM head.

Keys are content hashes of the example as the model sees it (its real token ids and which positions count),
so re-tokenized or re-truncated data can never read another example's rows. What the key cannot see — the
ref's weights — is covered by a fingerprint (:func:`ref_fingerprint`: the ref's identity and a float64 sum of
each of its parameters), checked at every epoch start; a change empties the cache with a log line. Rows are
kept on the CPU, in memory up to ``max_memory_bytes`` and in a memory-mapped file under ``spill_dir`` beyond.

The rows were computed in another batch (other padding, other neighbours) than the one reading them; with
right padding and causal attention a real position's hidden state does not depend on them, up to float
rounding of differently shaped matrix products (about 1e-7 relative in float32).
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from collections.abc import Callable, Hashable, Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from heal_pl.barrier.positions import IGNORE_INDEX, Counted

log = logging.getLogger("heal_pl")


def example_keys(
    input_ids: Tensor, attention_mask: Tensor | None, labels: Tensor, extra: Sequence[Tensor] = ()
) -> list[bytes]:
    """One content key per row: a hash of its real token ids, of which of them are labelled, and of the row's
    slice of every ``extra`` tensor (other per-row inputs of the ref's forward, e.g. ``position_ids``)."""
    ids, lab = input_ids.detach().cpu(), labels.detach().cpu()
    real = torch.ones_like(ids, dtype=torch.bool) if attention_mask is None else attention_mask.detach().cpu().bool()
    keys = []
    for b in range(ids.shape[0]):
        h = hashlib.blake2b(digest_size=16)
        h.update(ids[b][real[b]].numpy().tobytes())
        h.update((lab[b][real[b]] != IGNORE_INDEX).numpy().tobytes())
        for x in extra:
            h.update(x[b].detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        keys.append(h.digest())
    return keys


FINGERPRINT_CHUNK = 2**22  # elements summed at once: a float64 copy of 32 MiB at most, never of a whole weight


def ref_fingerprint(identity: Hashable, params: Iterable[Tensor], chunk: int = FINGERPRINT_CHUNK) -> tuple:
    """``identity`` and a float64 sum of each of the ref's ``params`` (one pass over the weights), summed ``chunk``
    elements at a time: a 128k-262k vocabulary embedding would otherwise be copied whole into float64 (4-5 GB)."""
    with torch.no_grad():
        sums = tuple(sum(float(c.sum(dtype=torch.float64)) for c in p.detach().reshape(-1).split(chunk))
                     for p in params)  # fmt: skip
    return (identity, sums)


class RefRowCache:
    """Ref hidden rows keyed by :func:`example_keys` (module docstring: what makes it exact).

    Args:
        max_memory_bytes: rows kept in memory; beyond, rows go to ``<spill_dir>/ref_rows.bin`` (memory-mapped).
        spill_dir: folder of the spill file (default: a temporary folder, made when first needed).
    """

    def __init__(self, max_memory_bytes: int = 2 * 2**30, spill_dir: str | os.PathLike | None = None) -> None:
        if max_memory_bytes < 0:
            raise ValueError(f"max_memory_bytes={max_memory_bytes} must be >= 0")
        self.max_memory_bytes, self.spill_dir = max_memory_bytes, spill_dir
        self.fingerprint: tuple | None = None
        self.hits = self.misses = 0
        self._reset()

    def _reset(self) -> None:
        self._lse: dict[bytes, Tensor] = {}  # key -> [n] float32 LSE of the ref's logits at its rows (in memory)
        self._memory: dict[bytes, Tensor] = {}
        self._spilled: dict[bytes, tuple[int, int, int, torch.dtype]] = {}  # key -> (offset, rows, cols, dtype)
        self._memory_bytes = self._file_bytes = 0
        self._file: Path | None = None
        self._map: np.memmap | None = None

    def __len__(self) -> int:
        return len(self._memory) + len(self._spilled)

    def clear(self, why: str) -> None:
        if len(self):
            log.info("ref_cache: emptied (%d examples): %s", len(self), why)
        if self._file is not None and self._file.exists():
            self._file.unlink()
        self._reset()

    def check(self, fingerprint: tuple) -> None:
        """Empty the cache when the ref it was filled from has changed."""
        if self.fingerprint is not None and fingerprint != self.fingerprint:
            self.clear("the ref's weights or identity changed")
        self.fingerprint = fingerprint

    # ------------------------------------------------------------------ storage

    def _put(self, key: bytes, rows: Tensor) -> None:
        rows = rows.detach().to("cpu", copy=True).contiguous()
        size = rows.numel() * rows.element_size()
        if self._memory_bytes + size <= self.max_memory_bytes:
            self._memory[key], self._memory_bytes = rows, self._memory_bytes + size
            return
        if self._file is None:
            folder = Path(self.spill_dir) if self.spill_dir is not None else Path(tempfile.mkdtemp(prefix="ref_cache-"))
            folder.mkdir(parents=True, exist_ok=True)
            self._file = folder / "ref_rows.bin"
            self._file.write_bytes(b"")
            log.info("ref_cache: over %d MB in memory, further rows go to %s", self.max_memory_bytes >> 20, self._file)
        raw = rows.view(torch.uint8).numpy() if size else np.zeros(0, np.uint8)
        with open(self._file, "ab") as f:
            f.write(raw.tobytes())
        self._spilled[key] = (self._file_bytes, rows.shape[0], rows.shape[1], rows.dtype)
        self._file_bytes += size
        self._map = None  # the file grew: map it again on the next read

    def _get(self, key: bytes) -> Tensor:
        if key in self._memory:
            return self._memory[key]
        offset, n, d, dtype = self._spilled[key]
        if self._map is None:
            self._map = np.memmap(self._file, dtype=np.uint8, mode="r", shape=(self._file_bytes,))
        size = n * d * torch.empty(0, dtype=dtype).element_size()
        raw = torch.from_numpy(np.array(self._map[offset : offset + size]))
        return raw.view(dtype).view(n, d)

    # ------------------------------------------------------------------ the one entry point

    def rows(self, keys: list[bytes], counted: Counted, compute: Callable[[], Tensor]) -> Tensor:
        """The ref rows ``[N, d]`` of a batch in ``counted`` order: read when every example is cached, else
        ``compute()`` (the ref's forward for the whole batch) and store each example's part."""
        per_row = torch.bincount(counted.batch_idx.cpu(), minlength=len(keys)).tolist()
        if all(k in self._memory or k in self._spilled for k in keys):
            self.hits += 1
            parts = [self._get(k) for k in keys]
            for k, part, n in zip(keys, parts, per_row, strict=True):
                if part.shape[0] != n:  # a content key that maps to another row count cannot happen; never guess
                    raise RuntimeError(f"ref_cache: example {k.hex()} has {part.shape[0]} cached rows, the batch {n}")
            device = counted.batch_idx.device
            return torch.cat(parts).to(device, non_blocking=True)
        self.misses += 1
        rows = compute()
        for k, part in zip(keys, rows.split(per_row), strict=True):
            if k not in self._memory and k not in self._spilled:
                self._put(k, part)
        return rows

    # ------------------------------------------------------------------ the ref logits' LSE (heal_pl.barrier.lazy_head)

    def lse(self, keys: list[bytes], device: torch.device) -> Tensor | None:
        """The ``[N]`` ``LSE(z_q)`` of a batch's ref rows in counted order, when every example has it, else None."""
        if not keys or any(k not in self._lse for k in keys):
            return None
        return torch.cat([self._lse[k] for k in keys]).to(device, non_blocking=True)

    def put_lse(self, keys: list[bytes], counted: Counted, lse: Tensor) -> None:
        """Keep each example's part of ``lse`` (``[N]``, counted order) beside its rows: 4 bytes a row."""
        per_row = torch.bincount(counted.batch_idx.cpu(), minlength=len(keys)).tolist()
        for k, part in zip(keys, lse.detach().float().cpu().split(per_row), strict=True):
            if k in self._memory or k in self._spilled:
                self._lse.setdefault(k, part.clone())
