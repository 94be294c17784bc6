"""The drift panels (heal_pl.barrier.panels): the KL histogram and the top-k text panel, read back from the event
file."""

from __future__ import annotations

import math
import re
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader

from heal_pl.adapters.switch import adapter_off
from heal_pl.barrier.kl import KLBarrier, naive_token_stats
from heal_pl.barrier.panels import Drift, drift_table
from heal_pl.callbacks import KLBarrierCallback
from heal_pl.models.load import tiny_tokenizer
from heal_pl.module import HealModule
from tests.callbacks.test_kl_barrier import ForeignModule, perturbed_heal_module
from tests.helpers import make_batch

BATCHES = [make_batch(seed=s, B=3, T=16) for s in range(3)]
BARRIER = KLBarrier(agg="p95", tau=0.0)


def perturbed() -> HealModule:
    torch.manual_seed(0)  # LoRA's A: two modules built apart (one process, DDP) must be the same
    return perturbed_heal_module(BARRIER)


def trainer(tmp_path: Path, name: str, **kwargs) -> tuple[L.Trainer, TensorBoardLogger]:
    logger = TensorBoardLogger(tmp_path, name=name, version=0)  # fixed: spawned ranks must agree on the folder
    return L.Trainer(accelerator="cpu", logger=logger, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, num_sanity_val_steps=0, **kwargs), logger  # fmt: skip


def reference(peft: torch.nn.Module) -> list[tuple[float, int, int, int]]:
    """(KL, student argmax, base argmax, context length) of every counted token, from the model's own full forward
    in float64; the context is the ten tokens up to the position (fewer near the row's start)."""
    rows = []
    peft.eval()
    with torch.no_grad():
        for b in BATCHES:
            logits = peft(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.double()
            with adapter_off(peft):
                base = peft(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.double()
            kl = naive_token_stats(logits, base, b["labels"]).kl
            counted = b["labels"][:, 1:] != -100
            context = (torch.arange(counted.shape[1]) + 1).clamp(max=10).expand_as(counted)[counted]
            rows += zip(kl.tolist(), logits[:, :-1][counted].argmax(-1).tolist(),
                        base[:, :-1][counted].argmax(-1).tolist(), context.tolist(), strict=True)  # fmt: skip
    return rows


def read(log_dir: str, prefix: str = "") -> tuple[object, str, EventAccumulator]:
    events = EventAccumulator(log_dir, size_guidance={"histograms": 0, "tensors": 0})
    events.Reload()
    assert f"{prefix}val/kl_hist" in events.Tags()["histograms"]
    assert f"{prefix}val/kl_top/text_summary" in events.Tags()["tensors"]
    hist = events.Histograms(f"{prefix}val/kl_hist")[-1].histogram_value
    text = events.Tensors(f"{prefix}val/kl_top/text_summary")[-1].tensor_proto.string_val[0].decode()
    return hist, text, events


def table_rows(text: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split(" | ")] for line in text.splitlines()
            if re.match(r"^\| \d+ \|", line)]  # fmt: skip


def check_panels(hist: object, text: str, ref: list[tuple[float, int, int, int]]) -> None:
    kl = torch.tensor([r[0] for r in ref], dtype=torch.float64)
    assert hist.num == len(ref) == sum(int((b["labels"][:, 1:] != -100).sum()) for b in BATCHES)
    assert math.isclose(hist.max, kl.max().item(), rel_tol=1e-5) and math.isclose(hist.min, kl.min().item(),
                                                                                  rel_tol=1e-4, abs_tol=1e-7)
    assert math.isclose(hist.sum, kl.sum().item(), rel_tol=1e-5)
    rows = table_rows(text)
    top = sorted(ref, key=lambda r: -r[0])[:10]
    assert len(rows) == 10
    for row, (want_kl, s_top1, b_top1, n_context) in zip(rows, top, strict=True):
        assert math.isclose(float(row[1]), want_kl, rel_tol=1e-3)  # printed with 4 significant digits
        assert row[4:] == [f"[{s_top1}]", f"[{b_top1}]"]  # no tokenizer in these runs: token ids
        assert len(row[2].removeprefix("…").split()) == n_context
    share = sum(r[0] for r in top) / kl.sum().item()
    assert f"hold {share:.1%} of the total KL" in text and f"{len(ref)} validation tokens" in text


def test_heal_module_writes_the_panels_of_every_validation_token(tmp_path: Path) -> None:
    m = perturbed()
    t, logger = trainer(tmp_path, "heal")
    t.validate(m, DataLoader(BATCHES, batch_size=None), verbose=False)
    hist, text, _ = read(logger.log_dir)
    check_panels(hist, text, reference(m.student))


def test_hp_metric_is_val_sft_next_to_the_hparams(tmp_path: Path) -> None:
    m = perturbed()
    t, logger = trainer(tmp_path, "fit", max_steps=2, val_check_interval=1, log_every_n_steps=1)
    t.fit(m, DataLoader(BATCHES[:2], batch_size=None), DataLoader(BATCHES, batch_size=None))
    _, _, events = read(logger.log_dir)
    hp = [(e.step, e.value) for e in events.Scalars("hp_metric")]
    sft = [(e.step, e.value) for e in events.Scalars("val/sft")]
    assert hp[0] == (0, -1) and len(hp) == 1 + len(sft) == 3  # Lightning's placeholder, then one per validation
    assert hp[1:] == sft  # same values at the same steps
    assert [e.step for e in events.Histograms("val/kl_hist")] == [s for s, _ in sft]
    from tensorboard.plugins.hparams import plugin_data_pb2

    start = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hparams = plugin_data_pb2.HParamsPluginData.FromString(start).session_start_info.hparams
    assert hparams["barrier/agg"].string_value == "p95" and hparams["lr"].number_value == m.hparams.lr


def test_callback_writes_the_same_panels(tmp_path: Path) -> None:
    peft = perturbed().student
    t, logger = trainer(tmp_path, "callback", callbacks=[KLBarrierCallback(BARRIER, prefix="kl/")])
    t.validate(ForeignModule(peft), DataLoader(BATCHES, batch_size=None), verbose=False)
    hist, text, _ = read(logger.log_dir, prefix="kl/")
    check_panels(hist, text, reference(peft))


def test_nll_runs_write_no_panels(tmp_path: Path) -> None:
    t, logger = trainer(tmp_path, "nll")
    t.validate(HealModule(model="tiny-llama", barrier=KLBarrier(reg="nll")), DataLoader(BATCHES, batch_size=None),
               verbose=False)  # fmt: skip
    events = EventAccumulator(logger.log_dir)
    events.Reload()
    assert "val/kl_hist" not in events.Tags()["histograms"]
    assert "val/kl_top/text_summary" not in events.Tags()["tensors"]


def test_drift_table_decodes_and_escapes_tokens() -> None:
    tok = tiny_tokenizer()
    ids = tok("Cows eat grass | and hay", add_special_tokens=False)["input_ids"]
    drift = Drift(2.5, ids, [1] * len(ids), tok.eos_token_id, tok.convert_tokens_to_ids("Ġgrass"), ids[0])
    text = drift_table(torch.tensor([2.5, 0.5, 2.0]), [drift], tok, context=3)
    (row,) = table_rows(text)
    assert row[1] == "2.5"
    assert row[2] == "…" + tok.decode(ids[-3:]).replace("|", "\\|")  # the last three tokens, the pipe escaped
    assert row[3] == "&lt;\\|im\\_end\\|&gt;"  # a special token stays visible in rendered markdown
    assert row[4] == "␣grass"
    assert "the top 1 positions hold 50.0% of the total KL" in text and "3 validation tokens" in text


@pytest.mark.slow
def test_ddp_panels_hold_every_rank_s_tokens(tmp_path: Path) -> None:
    """2 CPU processes (gloo), one validation batch each: the panels equal one process validating both."""
    one, logger_one = trainer(tmp_path, "one")
    one.validate(perturbed(), DataLoader(BATCHES[:2], batch_size=None), verbose=False)
    ddp, logger_ddp = trainer(tmp_path, "ddp", devices=2, strategy="ddp_spawn")
    ddp.validate(perturbed(), DataLoader(BATCHES[:2], batch_size=None), verbose=False)
    (hist_one, text_one, _), (hist_ddp, text_ddp, _) = read(logger_one.log_dir), read(logger_ddp.log_dir)
    n_tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in BATCHES[:2])
    assert hist_ddp.num == hist_one.num == n_tokens
    assert math.isclose(hist_ddp.sum, hist_one.sum, rel_tol=1e-5) and math.isclose(hist_ddp.max, hist_one.max,
                                                                                     rel_tol=1e-6)
    assert table_rows(text_ddp) == table_rows(text_one)


def test_top_replays_the_rows_position_ids() -> None:
    """Packed rows: the top-1 forwards get the prefix's own position ids (and mask), not a fresh 0..t."""
    from heal_pl.barrier.panels import DriftPanels

    batch = make_batch(seed=0, B=2, T=12)
    batch["position_ids"] = torch.tensor([[0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5]] * 2)  # two documents per row
    counted = batch["labels"][:, 1:] != -100
    kl = torch.arange(int(counted.sum()), dtype=torch.float32)  # the last counted position has the largest KL
    panels = DriftPanels(k=1)
    panels.update(kl, batch)
    seen = []

    def logits(inputs: dict) -> torch.Tensor:
        seen.append({k: v.tolist() for k, v in inputs.items()})
        return torch.zeros(1, inputs["input_ids"].shape[1], 5)

    (top,) = panels.top(logits, logits, torch.device("cpu"))
    b = 1 if counted[1].any() else 0
    t = int(counted[b].nonzero().max())
    want = {"input_ids": [batch["input_ids"][b, : t + 1].tolist()], "attention_mask": [batch["attention_mask"][b,
            : t + 1].tolist()], "position_ids": [batch["position_ids"][b, : t + 1].tolist()]}  # fmt: skip
    assert seen == [want, want] and top.kl == kl.max().item() and top.target == int(batch["input_ids"][b, t + 1])
