"""The ref-row cache: exact rows, content keys, spill to disk, invalidation, and a cached run = an uncached run."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import lightning as L
import pytest
import torch

import heal_pl.barrier.ref_source as ref_source_py
import heal_pl.callbacks.kl_barrier as kl_barrier_py
from heal_pl.adapters.switch import ref_rows
from heal_pl.barrier.kl import KLBarrier, counted_positions
from heal_pl.barrier.ref_cache import RefRowCache, example_keys, ref_fingerprint
from heal_pl.callbacks.student_forward import head_input
from heal_pl.data.datamodule import HealDataModule
from heal_pl.models.load import tiny_model
from heal_pl.module import HealModule
from tests.helpers import make_batch


def _rows(batch: dict[str, torch.Tensor], dim: int = 5, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Rows that depend on the example only (its ids at its counted positions), like a ref's hidden rows."""
    c = counted_positions(batch["labels"], batch["attention_mask"])
    ids = batch["input_ids"][c.batch_idx, c.pos_idx].to(torch.float64)
    return (ids[:, None] * torch.arange(1, dim + 1, dtype=torch.float64) / 7).sin().to(dtype)


def _never() -> torch.Tensor:
    raise AssertionError("the cache should have answered without computing")


@pytest.mark.parametrize("memory", [2**30, 0], ids=["in memory", "spilled to disk"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_come_back_bit_identical_in_batch_order(memory: int, dtype: torch.dtype, tmp_path: Path) -> None:
    cache = RefRowCache(max_memory_bytes=memory, spill_dir=tmp_path)
    batch = make_batch(seed=0)
    c = counted_positions(batch["labels"], batch["attention_mask"])
    keys = example_keys(batch["input_ids"], batch["attention_mask"], batch["labels"])
    first = cache.rows(keys, c, lambda: _rows(batch, dtype=dtype))
    assert (cache.hits, cache.misses, len(cache)) == (0, 1, 3)
    assert (tmp_path / "ref_rows.bin").exists() == (memory == 0)
    # the same examples in another order and with other padding: read, not computed, in the new batch's order
    order = [2, 0, 1]
    width = int(batch["attention_mask"].sum(1).max()) + 3
    shuffled = {k: torch.nn.functional.pad(v[order], (0, width - v.shape[1]), value=-100 if k == "labels" else 0)
                for k, v in batch.items()}  # fmt: skip
    c2 = counted_positions(shuffled["labels"], shuffled["attention_mask"])
    keys2 = example_keys(shuffled["input_ids"], shuffled["attention_mask"], shuffled["labels"])
    again = cache.rows(keys2, c2, _never)
    assert cache.hits == 1 and again.dtype == dtype
    assert torch.equal(again, _rows(shuffled, dtype=dtype))
    assert torch.equal(first, _rows(batch, dtype=dtype))


def test_the_ref_lse_comes_back_per_example_in_batch_order() -> None:
    """The LSE kept beside the rows (heal_pl.barrier.lazy_head): only for cached examples, read back in another
    batch's order, None while any example lacks it, gone with the rows."""
    cache = RefRowCache()
    batch = make_batch(seed=0)
    c = counted_positions(batch["labels"], batch["attention_mask"])
    keys = example_keys(batch["input_ids"], batch["attention_mask"], batch["labels"])
    lse = _rows(batch, dim=1).squeeze(-1) + 10.0  # one number per counted row, a function of the example
    cache.put_lse(keys, c, lse)
    assert cache.lse(keys, torch.device("cpu")) is None, "no rows cached yet: nothing kept"
    cache.rows(keys, c, lambda: _rows(batch))
    cache.put_lse(keys, c, lse)
    assert torch.equal(cache.lse(keys, torch.device("cpu")), lse)
    order = [2, 0, 1]
    shuffled = {k: v[order] for k, v in batch.items()}
    keys2 = example_keys(shuffled["input_ids"], shuffled["attention_mask"], shuffled["labels"])
    c2 = counted_positions(shuffled["labels"], shuffled["attention_mask"])
    assert torch.equal(cache.lse(keys2, torch.device("cpu")), _rows(shuffled, dim=1).squeeze(-1) + 10.0)
    other = make_batch(seed=5)
    assert cache.lse([*keys[:2], *example_keys(other["input_ids"], other["attention_mask"], other["labels"])[:1]],
                     torch.device("cpu")) is None  # fmt: skip
    assert c2.targets.numel() == c.targets.numel()
    cache.clear("test")
    assert cache.lse(keys, torch.device("cpu")) is None


def test_keys_see_tokens_and_labels_not_padding() -> None:
    batch = make_batch(seed=1)
    keys = example_keys(batch["input_ids"], batch["attention_mask"], batch["labels"])
    assert len(set(keys)) == 3
    padded = {k: torch.nn.functional.pad(v, (0, 4), value=0) for k, v in batch.items()}
    assert example_keys(padded["input_ids"], padded["attention_mask"], padded["labels"]) == keys
    relabelled = batch["labels"].clone()
    relabelled[0, 4] = -100  # one completion token turned into prompt: another example
    other = example_keys(batch["input_ids"], batch["attention_mask"], relabelled)
    assert other[0] != keys[0] and other[1:] == keys[1:]
    retokenized = batch["input_ids"].clone()
    retokenized[2, 5] += 1
    assert example_keys(retokenized, batch["attention_mask"], batch["labels"])[2] != keys[2]


def test_a_changed_ref_empties_the_cache(caplog: pytest.LogCaptureFixture) -> None:
    cache = RefRowCache()
    batch = make_batch(seed=2)
    c = counted_positions(batch["labels"], batch["attention_mask"])
    keys = example_keys(batch["input_ids"], batch["attention_mask"], batch["labels"])
    weight = torch.randn(4, 4)
    cache.check(ref_fingerprint("base", [weight]))
    cache.rows(keys, c, lambda: _rows(batch))
    cache.check(ref_fingerprint("base", [weight]))
    assert len(cache) == 3
    weight[0, 0] += 1e-3
    with caplog.at_level(logging.INFO, logger="heal_pl"):
        cache.check(ref_fingerprint("base", [weight]))
    assert len(cache) == 0 and "emptied (3 examples): the ref's weights or identity changed" in caplog.text
    with pytest.raises(ValueError, match="max_memory_bytes=-1 must be >= 0"):
        RefRowCache(max_memory_bytes=-1)


def _fit(tmp_path: Path, ref_cache: bool, monkeypatch: pytest.MonkeyPatch) -> tuple[HealModule, list[int]]:
    """3 epochs over 6 rows in batches of 2, reshuffled every epoch (so cached rows meet new batch-mates)."""
    forwards: list[int] = []

    def counting_ref_rows(*args, **kwargs):
        forwards.append(module.current_epoch)
        return ref_rows(*args, **kwargs)

    monkeypatch.setattr(ref_source_py, "ref_rows", counting_ref_rows)
    rows = [{"prompt": f"Question {i}: what is {i} plus {i}?", "completion": "The answer is " + "big " * i}
            for i in range(1, 7)]  # fmt: skip
    data_file = tmp_path / "train.jsonl"
    tmp_path.mkdir(parents=True)
    data_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = HealDataModule(model="tiny-llama", train_file=str(data_file), val_fraction=0, batch_size=2, seed=3)
    torch.manual_seed(0)
    module = HealModule(model="tiny-llama", barrier=KLBarrier(agg="rmse", tau=0.0, lam=2.0), lr=1e-2,
                        warmup_steps=0, ref_cache=ref_cache)  # fmt: skip
    trainer = L.Trainer(max_epochs=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)  # fmt: skip
    trainer.fit(module, data)
    return module, forwards


def test_cached_run_reaches_the_uncached_adapter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    plain, plain_forwards = _fit(tmp_path / "plain", False, monkeypatch)
    cached, cached_forwards = _fit(tmp_path / "cached", True, monkeypatch)
    assert plain_forwards == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert cached_forwards == [0, 0, 0]  # epochs 2 and 3 read every ref row from the cache
    assert cached.ref_cache.hits == 6 and cached.ref_cache.misses == 3
    moved = 0.0
    for (name, p), (_, q) in zip(plain.named_parameters(), cached.named_parameters(), strict=True):
        if p.requires_grad:
            # the cached rows were computed beside other batch-mates (other padding): float rounding only
            torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6, msg=name)
            if "lora_B" in name:
                moved = max(moved, float(p.detach().abs().max()))
    assert moved > 1e-3  # the adapter did move: the comparison is not of two zero tensors


def test_set_ref_model_and_a_changed_base_empty_the_module_cache(tmp_path: Path) -> None:
    module = HealModule(model="tiny-llama", barrier=KLBarrier(agg="mean", tau=0.0), ref_cache=True)
    batch = make_batch(seed=0)
    module._check_ref_cache()
    module.loss_terms(batch)
    assert len(module.ref_cache) == 3
    module._check_ref_cache()
    assert len(module.ref_cache) == 3  # nothing changed; the adapter's own parameters are not the ref
    with torch.no_grad():
        module.student.get_base_model().model.layers[0].mlp.up_proj.weight[0, 0] += 0.5
    module._check_ref_cache()
    assert len(module.ref_cache) == 0
    module.loss_terms(batch)
    assert len(module.ref_cache) == 3
    module.set_ref_model(tiny_model("llama"))
    assert len(module.ref_cache) == 0


def _fit_foreign(tmp_path: Path, ref_cache: bool, monkeypatch: pytest.MonkeyPatch) -> tuple[L.LightningModule, list]:
    from heal_pl.callbacks import KLBarrierCallback
    from tests.callbacks.test_kl_barrier import ForeignModule

    replays: list[int] = []

    def counting_head_input(*args, **kwargs):
        replays.append(module.current_epoch)
        return head_input(*args, **kwargs)

    monkeypatch.setattr(kl_barrier_py, "head_input", counting_head_input)
    torch.manual_seed(0)
    peft_model = HealModule(model="tiny-llama", barrier=KLBarrier(reg="nll")).student  # a plain peft LoRA model
    module = ForeignModule(peft_model, lr=0.5)
    batches = [make_batch(seed=s, vocab=300) for s in range(3)]
    callback = KLBarrierCallback(KLBarrier(agg="rmse", tau=0.0, lam=2.0), ref_cache=ref_cache)
    trainer = L.Trainer(max_epochs=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        callbacks=[callback])  # fmt: skip
    loader = torch.utils.data.DataLoader(batches, batch_size=None, shuffle=True,
                                         generator=torch.Generator().manual_seed(0))  # fmt: skip
    trainer.fit(module, loader)
    return module, replays


def test_callback_cache_skips_the_base_forward_and_reaches_the_same_adapter(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    plain, plain_replays = _fit_foreign(tmp_path / "plain", False, monkeypatch)
    cached, cached_replays = _fit_foreign(tmp_path / "cached", True, monkeypatch)
    assert plain_replays == [0, 0, 0, 1, 1, 1, 2, 2, 2] and cached_replays == [0, 0, 0]
    for (name, p), (_, q) in zip(plain.named_parameters(), cached.named_parameters(), strict=True):
        if p.requires_grad:
            torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6, msg=name)


def test_callback_keys_see_every_replayed_argument() -> None:
    batch = make_batch(seed=0)
    plain = example_keys(batch["input_ids"], batch["attention_mask"], batch["labels"])
    positions = torch.arange(batch["input_ids"].shape[1]).expand_as(batch["input_ids"]).clone()
    with_pos = example_keys(batch["input_ids"], batch["attention_mask"], batch["labels"], [positions])
    positions[1] = positions[1].flip(0)  # another packing of row 1
    packed = example_keys(batch["input_ids"], batch["attention_mask"], batch["labels"], [positions])
    assert with_pos != plain and packed[0] == with_pos[0] and packed[1] != with_pos[1]


def test_the_fingerprint_sums_each_weight_in_float64_chunk_by_chunk() -> None:
    weights = [torch.randn(1000, 37, generator=torch.Generator().manual_seed(0)).bfloat16(), torch.randn(5, 3)]
    identity, sums = ref_fingerprint("base", weights, chunk=999)  # chunks that cut rows
    assert identity == "base" and len(sums) == 2
    for s, w in zip(sums, weights, strict=True):
        exact = math.fsum(w.double().reshape(-1).tolist())  # every element, in exact arithmetic, rounded once
        assert abs(s - exact) <= 1e-12 * w.double().abs().sum().item()
    bumped = weights[0].clone()
    bumped[999, 0] += 1.0  # one element in the second chunk
    assert ref_fingerprint("base", [bumped, weights[1]], chunk=999)[1][0] != sums[0]
