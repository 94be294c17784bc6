"""Two instances of each stateful callback in one real Trainer keep their own checkpoint state.

Lightning stores a callback's state under ``checkpoint["callbacks"][callback.state_key]``; with the default key (the
class name) two instances overwrite each other. Each test fits once with two instances (different ``prefix``),
saves a checkpoint, checks both states are there under distinct keys, then resumes with fresh instances and checks
each got its own state back (recorded at train start, right after the restore).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch.utils.data import DataLoader

from heal_pl.barrier.kl import KLBarrier
from heal_pl.callbacks import IsoKLCalibrationCallback, KLBarrierCallback, ProgressLog, RouteAblateEvalCallback
from tests.callbacks import test_route_ablate as route
from tests.callbacks.test_kl_barrier import ForeignModule
from tests.helpers import lively_peft, make_batch


class Probe(Callback):
    """Keeps ``snapshot(callback)`` of each watched callback at train start (after a resume restored them)."""

    def __init__(self, watched: list[Callback], snapshot: Callable[[Any], Any]) -> None:
        self.watched, self.snapshot = watched, snapshot
        self.seen: list[Any] = []

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.seen = [copy.deepcopy(self.snapshot(cb)) for cb in self.watched]


def fit(tmp_path: Path, module: L.LightningModule, callbacks: list[Callback], train: DataLoader,
        val: DataLoader | None = None, ckpt_path: Path | None = None, **kw: Any) -> L.Trainer:  # fmt: skip
    trainer = L.Trainer(
        callbacks=callbacks, default_root_dir=tmp_path, accelerator="cpu", logger=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, **kw,
    )  # fmt: skip
    trainer.fit(module, train, val, ckpt_path=ckpt_path)
    return trainer


def saved(tmp_path: Path, pattern: str) -> tuple[Path, dict[str, Any]]:
    (path,) = list((tmp_path / "ckpt").glob(pattern))
    return path, torch.load(path, weights_only=False)["callbacks"]


def foreign() -> ForeignModule:
    return ForeignModule(lively_peft(seed=3).train(), lr=1e-3)


def loader(n: int = 2) -> DataLoader:
    return DataLoader([make_batch(seed=s) for s in range(n)], batch_size=None)


def test_two_kl_barriers_keep_their_own_round(tmp_path: Path) -> None:
    barrier = KLBarrier(agg="rmse", tau=0.0, lam=1.0)
    a, b = KLBarrierCallback(barrier, round=1, prefix="a/"), KLBarrierCallback(barrier, round=2, prefix="b/")
    assert a.state_key == "KLBarrierCallback{'prefix': 'a/', 'reg': 'kl_rev', 'agg': 'rmse'}"
    assert b.state_key == "KLBarrierCallback{'prefix': 'b/', 'reg': 'kl_rev', 'agg': 'rmse'}"
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2)
    t = fit(tmp_path, foreign(), [a, b, ckpt], loader(), max_steps=2)
    assert {"a/train/barrier", "b/train/barrier"} <= set(t.callback_metrics)  # both were in the loss
    path, states = saved(tmp_path, "*step=2*.ckpt")
    # tau 0: both steps fired, so the next one takes the eager path (the first transition is filed at step 3)
    plan = {"lazy": True, "fired": True, "last": True, "seen": [[0, 0], [0, 0]]}
    assert states[a.state_key] == {"round": 1, "kl_grad_plan": plan} and states[b.state_key] == {"round": 2,
                                                                                              "kl_grad_plan": plan}

    a2, b2 = KLBarrierCallback(barrier, prefix="a/"), KLBarrierCallback(barrier, prefix="b/")  # round 0 until restored
    probe = Probe([a2, b2], lambda cb: cb.round)
    fit(tmp_path, foreign(), [a2, b2, probe], loader(), ckpt_path=path, max_steps=3)
    assert probe.seen == [1, 2]


def test_two_isokl_calibrations_keep_their_own_counts(tmp_path: Path, tokenizer: Any) -> None:
    fast: dict[str, Any] = dict(n_calib=1, n_audit=0, max_new_tokens=4, max_iters=2)

    def pair() -> list[IsoKLCalibrationCallback]:
        return [IsoKLCalibrationCallback(prefix="a/", every_n_val_epochs=1, signs=(1,), **fast),
                IsoKLCalibrationCallback(prefix="b/", every_n_val_epochs=2, signs=(-1,), **fast)]  # fmt: skip

    def module() -> ForeignModule:
        m = foreign()
        m.tokenizer = tokenizer
        return m

    a, b = pair()
    assert a.state_key == "IsoKLCalibrationCallback{'prefix': 'a/', 'stat': 'p95', 'target': 1.0}"
    assert b.state_key == "IsoKLCalibrationCallback{'prefix': 'b/', 'stat': 'p95', 'target': 1.0}"
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_epochs=1, save_top_k=-1)
    fit(tmp_path, module(), [a, b, ckpt], loader(1), loader(1), max_epochs=2)
    path, states = saved(tmp_path, "epoch=1*.ckpt")
    # saved at the end of epoch 2: a calibrated after both validations, b after the second only
    counts = {k: (states[k]["val_epochs"], states[k]["calibrations"]) for k in (a.state_key, b.state_key)}
    assert counts == {a.state_key: (2, 2), b.state_key: (2, 1)}

    a2, b2 = pair()
    probe = Probe([a2, b2], lambda cb: (cb.val_epochs, cb.calibrations))
    fit(tmp_path, module(), [a2, b2, probe], loader(1), loader(1), ckpt_path=path, max_epochs=3)
    assert probe.seen == [(2, 2), (2, 1)]


def test_two_route_ablate_callbacks_keep_their_own_history(tmp_path: Path) -> None:
    pairs = str(route.write_pairs(tmp_path / "p.jsonl"))

    def pair() -> list[RouteAblateEvalCallback]:
        return [RouteAblateEvalCallback(arm="none", pairs=pairs, k=2, evaluate=route.probe_eval, eval_every=1,
                                        prefix="a/"),
                RouteAblateEvalCallback(arm="none", pairs=pairs, k=2, evaluate=route.probe_eval, eval_every=2,
                                        prefix="b/")]  # fmt: skip

    def history(cb: RouteAblateEvalCallback) -> list[int]:
        return [int(r["step"]) for r in cb.history]

    a, b = pair()
    assert a.state_key == "RouteAblateEvalCallback{'arm': 'none', 'prefix': 'a/'}" != b.state_key
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2)
    fit(tmp_path, route.ForeignModule(), [a, b, ckpt], route.loader(), max_steps=2)
    path, states = saved(tmp_path, "*step=2*.ckpt")
    assert [int(r["step"]) for r in states[a.state_key]["history"]] == [1, 2]
    assert [int(r["step"]) for r in states[b.state_key]["history"]] == [2]

    a2, b2 = pair()
    probe = Probe([a2, b2], history)
    fit(tmp_path, route.ForeignModule(), [a2, b2, probe], route.loader(), ckpt_path=path, max_steps=3)
    assert probe.seen == [[1, 2], [2]]


def test_progress_log_has_no_state() -> None:
    assert ProgressLog().state_dict() == {}  # nothing in checkpoints: no state key needed


def test_a_checkpoint_from_before_the_state_keys_still_loads() -> None:
    """Older checkpoints hold the state under the class name; a new key in the checkpoint wins over it."""
    old = {"callbacks": {"KLBarrierCallback": {"round": 3},
                         "IsoKLCalibrationCallback": {"results": {}, "val_epochs": 4, "calibrations": 2}}}  # fmt: skip
    kl, iso = KLBarrierCallback(), IsoKLCalibrationCallback()
    kl.on_load_checkpoint(None, None, old)  # type: ignore[arg-type]
    iso.on_load_checkpoint(None, None, old)  # type: ignore[arg-type]
    assert kl.round == 3 and (iso.val_epochs, iso.calibrations) == (4, 2)
    new = {"callbacks": {**old["callbacks"], KLBarrierCallback().state_key: {"round": 5}}}
    kl = KLBarrierCallback()
    kl.on_load_checkpoint(None, None, new)  # type: ignore[arg-type]
    assert kl.round == 0  # left to Lightning's load_state_dict, which reads the new key
