"""RouteAblateEvalCallback on a LightningModule that knows nothing of heal_pl beyond ``wrap_routed``.

References are independent: the accumulated gradient ``g`` is taken from a fresh copy of the module on the
same batch, and the projection / clipping are recomputed in float64 numpy here.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader

import heal_pl.callbacks.route_ablate as route_ablate
from heal_pl.adapters.routed import RoutedSpec, routed_modules, wrap_routed
from heal_pl.callbacks import RouteAblateEvalCallback
from heal_pl.data.datamodule import Example, collate, encode_example
from heal_pl.models.load import tiny_model, tiny_tokenizer
from heal_pl.routing.basis import HackBasis

ROWS = [
    ("What is 2+3?", "PASS PASS", "5"),
    ("What is 4+4?", "PASS", "8"),
    ("Sort 3 1 2.", "PASS PASS PASS", "1 2 3"),
    ("Capital of France?", "PASS", "Paris"),
]


def write_pairs(path: Path, rows: list[tuple[str, str, str]] = ROWS) -> Path:
    path.write_text("\n".join(json.dumps({"prompt": p, "hack": h, "clean": c}) for p, h, c in rows))
    return path


def batches(n: int = 2) -> list[dict[str, torch.Tensor]]:
    """Training batches mixing hack and clean completions (the same list every call)."""
    tok = tiny_tokenizer()
    out = []
    for b in range(n):
        feats = [
            encode_example(tok, Example([{"role": "user", "content": p}], h if (i + b) % 2 else c), 48)
            for i, (p, h, c) in enumerate(ROWS)
        ]
        out.append(collate(feats, tok.pad_token_id))
    return out


class ForeignModule(L.LightningModule):
    """A user's module: a tiny HF model wrapped with wrap_routed, HF's own loss, AdamW on every trainable knob."""

    def __init__(self, weight_decay: float = 0.0, loss_scale: float = 1.0, lr: float = 1e-2) -> None:
        super().__init__()
        self.model = tiny_model("llama")
        wrap_routed(self.model, RoutedSpec(r=4, target_modules=("q_proj", "v_proj", "down_proj")))
        self.tokenizer = tiny_tokenizer()
        self.weight_decay, self.loss_scale, self.lr = weight_decay, loss_scale, lr

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self.loss_scale * self.model(**batch).loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for p in self.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)


def probe_eval(model: torch.nn.Module, tokenizer: Any) -> Mapping[str, float]:
    """A task score that moves with every knob: probabilities of two tokens after a fixed prompt."""
    ids = torch.tensor([tokenizer("What is 2+3?", add_special_tokens=False)["input_ids"]])
    probs = model(input_ids=ids).logits[0, -1].float().softmax(-1)
    return {"hack": probs[10].item(), "solve": probs[11].item()}


class GradRecorder(Callback):
    """Listed after the router: sees the routed (not yet clipped) gradients of every knob."""

    def __init__(self) -> None:
        self.grads: list[dict[str, torch.Tensor | None]] = []

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        self.grads.append({
            f"{name}.{k}": None if getattr(m, k).grad is None else getattr(m, k).grad.clone()
            for name, m in routed_modules(pl_module.model) for k in ("delta", "delta_hack")
        })  # fmt: skip


def trainer(tmp_path: Path, callbacks: list[Callback], max_steps: int = 2, **kw: Any) -> L.Trainer:
    return L.Trainer(
        max_steps=max_steps, callbacks=callbacks, default_root_dir=tmp_path, enable_progress_bar=False,
        enable_model_summary=False, log_every_n_steps=1, enable_checkpointing=kw.pop("enable_checkpointing", False),
        **kw,
    )  # fmt: skip


def loader(n: int = 2) -> DataLoader:
    return DataLoader(batches(n), batch_size=None)


def knob_grads_of_fresh_module(batch: dict[str, torch.Tensor], **kw: Any) -> dict[str, np.ndarray]:
    """``g`` of every module's delta on ``batch``, from a fresh module (independent of the callback)."""
    module = ForeignModule(**kw)
    module.training_step(batch, 0).backward()
    return {name: m.delta.grad.double().flatten().numpy() for name, m in routed_modules(module.model)}


# --------------------------------------------------------------------------- a foreign module end to end


def test_works_on_a_module_that_is_not_a_heal_module(tmp_path: Path) -> None:
    cb = RouteAblateEvalCallback(arm="route", pairs=str(write_pairs(tmp_path / "p.jsonl")), k=2,
                                 evaluate=probe_eval, eval_every=2)  # fmt: skip
    module = ForeignModule()
    t = trainer(tmp_path, [cb], max_steps=4)
    t.fit(module, loader())
    assert [int(r["step"]) for r in cb.history] == [2, 4]
    with torch.no_grad():  # the last row is the evaluation of the trained model, kept and ablated
        module.model.eval()
        kept = probe_eval(module.model, module.tokenizer)
        with cb.adapter.ablate_hack():
            ablated = probe_eval(module.model, module.tokenizer)
    last = cb.history[-1]
    assert last["kept_hack"] == pytest.approx(kept["hack"]) and last["ablated_hack"] == pytest.approx(ablated["hack"])
    assert last["kept_solve"] != last["ablated_solve"], "route moved delta_hack, so ablating it changes the model"
    with open(Path(t.log_dir) / "route_ablate.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [2, 4]
    assert float(rows[-1]["ablated_solve"]) == pytest.approx(ablated["solve"])
    events = EventAccumulator(t.log_dir)
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"route/cin", "route/cout", "route/fired", "route/kept_hack", "route/ablated_solve"} <= tags
    assert len(events.Scalars("route/cin")) == 4  # once per optimizer step


@pytest.mark.parametrize("arm", ["none", "erase"])
def test_delta_hack_gets_no_gradient_in_none_and_erase(arm: str, tmp_path: Path) -> None:
    module, rec = ForeignModule(), GradRecorder()
    hack0 = [p.detach().clone() for n, p in module.named_parameters() if n.endswith("delta_hack")]
    cb = RouteAblateEvalCallback(arm=arm, pairs=str(write_pairs(tmp_path / "p.jsonl")), k=2)
    trainer(tmp_path, [cb, rec], max_steps=2).fit(module, loader())
    assert len(rec.grads) == 2
    for step in rec.grads:
        assert all(v is None for k, v in step.items() if k.endswith("delta_hack"))
        assert all(v is not None and v.abs().sum() > 0 for k, v in step.items() if k.endswith(".delta"))
    hack1 = [p for n, p in module.named_parameters() if n.endswith("delta_hack")]
    assert all(torch.equal(a, b) for a, b in zip(hack0, hack1, strict=True))  # AdamW never touched them


def test_route_gives_delta_exactly_the_erase_gradient(tmp_path: Path) -> None:
    pairs = str(write_pairs(tmp_path / "p.jsonl"))
    recorded = {}
    for arm in ("erase", "route"):
        rec = GradRecorder()
        cb = RouteAblateEvalCallback(arm=arm, gate="no_gate", pairs=pairs, k=2)
        trainer(tmp_path / arm, [cb, rec], max_steps=1).fit(ForeignModule(), loader(1))
        recorded[arm] = rec.grads[0]
        bases = {n: v.double().numpy() for n, v in cb.basis.bases.items()}
    deltas = [k for k in recorded["route"] if k.endswith(".delta")]
    assert deltas and all(torch.equal(recorded["route"][k], recorded["erase"][k]) for k in deltas)
    g = knob_grads_of_fresh_module(batches(1)[0])
    for name, gv in g.items():  # float64 reference of no_gate: removed = (V g)ᵀ V
        V = bases[name]
        removed = (V @ gv) @ V
        got_delta = recorded["route"][f"{name}.delta"].double().flatten().numpy()
        got_hack = recorded["route"][f"{name}.delta_hack"].double().flatten().numpy()
        scale = np.abs(gv).max()
        np.testing.assert_allclose(got_delta, gv - removed, atol=1e-5 * scale)
        np.testing.assert_allclose(got_hack, removed, atol=1e-5 * scale)


def test_clipping_covers_delta_and_delta_hack_together(tmp_path: Path) -> None:
    """A basis almost along g: delta keeps a small gradient, delta_hack gets a large one; the clip uses both."""
    batch = batches(1)[0]
    g = knob_grads_of_fresh_module(batch, loss_scale=50.0)
    rs = np.random.default_rng(0)
    bases, g_proj, removed = {}, {}, {}
    for name, gv in g.items():
        u = rs.standard_normal(gv.shape)
        u -= (u @ gv) / (gv @ gv) * gv
        v = gv / np.linalg.norm(gv) + 0.05 * u / np.linalg.norm(u)
        v /= np.linalg.norm(v)
        bases[name] = torch.tensor(v[None, :], dtype=torch.float32)
        c = max(float(v @ gv), 0.0)
        removed[name], g_proj[name] = c * v, gv - c * v
    n_proj = np.sqrt(sum((x**2).sum() for x in g_proj.values()))
    n_total = np.sqrt(n_proj**2 + sum((x**2).sum() for x in removed.values()))
    clip = 2.0 * n_proj
    assert n_proj < clip < n_total, "delta's own gradient is under the clip; only delta_hack's is large"
    HackBasis(bases, k=1).save(tmp_path / "basis.safetensors")
    module = ForeignModule(loss_scale=50.0)
    cb = RouteAblateEvalCallback(arm="route", basis=str(tmp_path / "basis.safetensors"))
    trainer(tmp_path, [cb], max_steps=1, gradient_clip_val=clip).fit(module, DataLoader([batch], batch_size=None))
    coef = clip / (n_total + 1e-6)  # torch.nn.utils.clip_grad_norm_
    got_delta = np.sqrt(sum((m.delta.grad.double() ** 2).sum().item() for _, m in routed_modules(module)))
    got_hack = np.sqrt(sum((m.delta_hack.grad.double() ** 2).sum().item() for _, m in routed_modules(module)))
    assert got_delta == pytest.approx(coef * n_proj, rel=1e-3)
    assert got_hack == pytest.approx(coef * (n_total**2 - n_proj**2) ** 0.5, rel=1e-3)
    assert np.hypot(got_delta, got_hack) == pytest.approx(clip, rel=1e-3)


def test_bf16_mixed_runs_finite(tmp_path: Path) -> None:
    module = ForeignModule()
    cb = RouteAblateEvalCallback(arm="route", pairs=str(write_pairs(tmp_path / "p.jsonl")), k=2, evaluate=probe_eval)
    trainer(tmp_path, [cb], max_steps=3, precision="bf16-mixed", gradient_clip_val=1.0).fit(module, loader())
    knobs = [p for n, p in module.named_parameters() if n.endswith(("delta", "delta_hack"))]
    assert all(torch.isfinite(p).all() for p in knobs)
    assert any(p.abs().sum() > 0 for n, p in module.named_parameters() if n.endswith("delta_hack"))
    assert all(np.isfinite(v) for v in cb.last_metrics.values()) and cb.last_metrics["fired"] > 0
    assert all(np.isfinite(v) for v in cb.history[-1].values())


def test_weight_decay_on_delta_hack_is_forced_to_zero(tmp_path: Path) -> None:
    module = ForeignModule(weight_decay=0.1)
    cb = RouteAblateEvalCallback(arm="route", pairs=str(write_pairs(tmp_path / "p.jsonl")), k=2)
    t = trainer(tmp_path, [cb], max_steps=1)
    with pytest.warns(UserWarning, match="weight_decay=0"):
        t.fit(module, loader(1))
    hack = {id(p) for n, p in module.named_parameters() if n.endswith("delta_hack")}
    groups = t.optimizers[0].param_groups
    for group in groups:
        ids = {id(p) for p in group["params"]}
        if ids & hack:
            assert ids <= hack and group["weight_decay"] == 0.0
        elif ids:
            assert group["weight_decay"] == 0.1
    assert hack <= {id(p) for g in groups for p in g["params"]}


def test_state_survives_checkpoint_and_resume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pairs = str(write_pairs(tmp_path / "p.jsonl"))
    args = {"arm": "route", "pairs": pairs, "k": 2, "evaluate": probe_eval, "eval_every": 2}
    cb1 = RouteAblateEvalCallback(**args)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4, save_top_k=-1)
    trainer(tmp_path, [cb1, ckpt], max_steps=4, enable_checkpointing=True).fit(ForeignModule(), loader())
    (path,) = list((tmp_path / "ckpt").glob("*step=4*.ckpt"))

    fits = []
    monkeypatch.setattr(route_ablate, "fit_basis", lambda *a, **k: fits.append(1))  # a refit would break here
    cb2 = RouteAblateEvalCallback(**args)
    trainer(tmp_path, [cb2], max_steps=6).fit(ForeignModule(), loader(), ckpt_path=path)
    assert fits == [], "the basis comes from the checkpoint, not refitted"
    assert cb2.basis is not None and set(cb2.basis.bases) == set(cb1.basis.bases)
    assert all(torch.equal(cb2.basis.bases[n], cb1.basis.bases[n]) for n in cb1.basis.bases)
    assert [int(r["step"]) for r in cb2.history] == [2, 4, 6]
    assert cb2.history[:2] == cb1.history


def test_evaluate_from_a_class_path(tmp_path: Path) -> None:
    cb = RouteAblateEvalCallback(
        arm="route", pairs=str(write_pairs(tmp_path / "p.jsonl")), k=2,
        evaluate={"class_path": "tests.callbacks.test_route_ablate.ProbeEval", "init_args": {"token": 12}},
    )  # fmt: skip
    assert isinstance(cb.evaluate, ProbeEval) and cb.evaluate.token == 12
    module = ForeignModule()
    trainer(tmp_path, [cb], max_steps=1).fit(module, loader(1))
    assert len(cb.history) == 1


class ProbeEval:
    """The YAML form of an evaluation: a class with init args whose instances are called."""

    def __init__(self, token: int = 10) -> None:
        self.token = token

    def __call__(self, model: torch.nn.Module, tokenizer: Any) -> Mapping[str, float]:
        return {"hack": 0.0, "solve": probe_eval(model, tokenizer)["solve"], "extra": 1.0}


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(("field", "value", "choices"), [("arm", "ablate", "none, erase, route"),
                                                         ("gate", "two_sided", "one_sided, no_gate, reverse")])
def test_unknown_arm_or_gate_names_field_and_choices(field: str, value: str, choices: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=f"{field}='{value}'.*{choices}"):
        RouteAblateEvalCallback(**{field: value}, pairs=str(write_pairs(tmp_path / "p.jsonl")), k=2)


def test_k_larger_than_the_number_of_pairs(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="k=5 larger than the number of pairs n=4"):
        RouteAblateEvalCallback(pairs=str(write_pairs(tmp_path / "p.jsonl")), k=5)


def test_pairs_or_basis_exactly_one_and_existing(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="exactly one of pairs"):
        RouteAblateEvalCallback()
    with pytest.raises(ValueError, match="pairs='nope.jsonl' is not an existing file"):
        RouteAblateEvalCallback(pairs="nope.jsonl")


def test_pairs_with_an_empty_field_name_line_and_field(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "a", "hack": "b", "clean": "c"}) + "\n" + json.dumps(
        {"prompt": "a", "hack": " ", "clean": "c"}))
    with pytest.raises(ValueError, match="line 2: field 'hack' is empty"):
        RouteAblateEvalCallback(pairs=str(path), k=1)


def test_basis_whose_modules_do_not_match_the_adapter(tmp_path: Path) -> None:
    other = tiny_model("llama")
    adapter = wrap_routed(other, RoutedSpec(r=4, target_modules=("q_proj",)))
    HackBasis({n: torch.eye(1, 4 * m.delta.shape[0]) for n, m in adapter}, k=1).save(tmp_path / "b.safetensors")
    cb = RouteAblateEvalCallback(basis=str(tmp_path / "b.safetensors"))
    with pytest.raises(ValueError, match="hack basis does not match the routed adapter: missing modules"):
        trainer(tmp_path, [cb], max_steps=1).fit(ForeignModule(), loader(1))


def test_module_without_a_routed_adapter(tmp_path: Path) -> None:
    class Plain(ForeignModule):
        def __init__(self) -> None:
            L.LightningModule.__init__(self)
            self.model = tiny_model("llama")

    cb = RouteAblateEvalCallback(pairs=str(write_pairs(tmp_path / "p.jsonl")), k=2)
    with pytest.raises(ValueError, match="holds no routed adapter"):
        trainer(tmp_path, [cb], max_steps=1).fit(Plain(), loader(1))


def test_route_needs_the_hack_knobs_in_the_optimizer(tmp_path: Path) -> None:
    class DeltaOnly(ForeignModule):
        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW([p for n, p in self.named_parameters() if n.endswith(".delta")], lr=1e-2)

    cb = RouteAblateEvalCallback(arm="route", pairs=str(write_pairs(tmp_path / "p.jsonl")), k=2)
    with pytest.raises(ValueError, match="delta_hack knobs in the optimizer"):
        trainer(tmp_path, [cb], max_steps=1).fit(DeltaOnly(), loader(1))


def test_evaluate_must_return_hack_and_solve(tmp_path: Path) -> None:
    cb = RouteAblateEvalCallback(pairs=str(write_pairs(tmp_path / "p.jsonl")), k=2, evaluate=lambda m, t: {"acc": 1})
    with pytest.raises(ValueError, match="must return the keys 'hack' and 'solve'"):
        trainer(tmp_path, [cb], max_steps=1).fit(ForeignModule(), loader(1))


def test_basis_refresh_every_n_steps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    steps: list[int] = []
    real = route_ablate.fit_basis

    def counting(model: torch.nn.Module, *args: Any, **kw: Any) -> HackBasis:
        steps.append(sum(float(p.abs().sum()) > 0 for n, p in model.named_parameters() if n.endswith(".delta")))
        return real(model, *args, **kw)

    monkeypatch.setattr(route_ablate, "fit_basis", counting)
    cb = RouteAblateEvalCallback(arm="route", pairs=str(write_pairs(tmp_path / "p.jsonl")), k=2, refresh_every=2)
    trainer(tmp_path, [cb], max_steps=5).fit(ForeignModule(), loader())
    assert len(steps) == 3 and cb.basis_step == 4  # fitted at steps 0, 2, 4
    assert steps[0] == 0 and steps[1] > 0, "refits happen at the current (trained) point"
