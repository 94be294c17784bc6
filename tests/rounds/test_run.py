"""``heal rounds`` end to end with the tiny model: both configs, early stop, resume, baking, bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from peft import PeftModel
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from heal_pl.cli import main
from heal_pl.configs import FOLDER
from heal_pl.models.lm import base_lm
from heal_pl.models.load import load_model, tiny_tokenizer
from heal_pl.rounds.bake import bake_adapter
from heal_pl.rounds.dilemmas import DEFAULT_DILEMMA_FILE, load_dilemmas, next_token_logits
from heal_pl.rounds.run import run_rounds
from tests.helpers import heal_error

CONFIGS = FOLDER
TINY = [
    "--model", "tiny-llama", "--n_fit", "3", "--sampling.n_prompts", "4", "--sampling.max_new_tokens", "8",
    "--sampling.batch_size", "4", "--heal.steps", "2", "--heal.batch_size", "2", "--heal.max_length", "64",
    "--filter.ppl_tau", "1e9", "--filter.rep_tau", "1.0", "--progress", "false", "--coh_floor", "0.0",
    "--greedy_prompts", '["Hello there", "What is a cat?"]',
]  # fmt: skip


def _argv(out: Path, *extra: str, config: str = "rounds_rmse") -> list[str]:
    return ["rounds", "--config", str(CONFIGS / f"{config}.yaml"), *TINY, "--out_dir", str(out), *extra]


def _run(out: Path, *extra: str, config: str = "rounds_rmse") -> dict:
    main(_argv(out, *extra, config=config))
    return json.loads((out / "state.json").read_text())


def _scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(folder))
    events.Reload()
    return {t: [(e.step, e.value) for e in events.Scalars(t)] for t in events.Tags()["scalars"]}


@pytest.mark.parametrize("config", ["rounds_rmse", "rounds_mean"])
def test_config_runs_two_rounds_end_to_end(config: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="heal_pl")
    state = _run(tmp_path, "--rounds", "2", "--progress", "true", config=config)
    spec = yaml.safe_load((CONFIGS / f"{config}.yaml").read_text())
    assert state["config"]["barrier"]["agg"] == spec["barrier"]["agg"]
    assert state["stopped"] is None
    assert [m["round"] for m in state["finished"]] == [0, 1]
    assert [m.split(":")[0] for m in caplog.messages if " -> healed " in m] == ["round 0", "round 1"]  # as they end
    # stderr and stdout are no terminal here: progress comes as log lines, the rounds' and each heal fit's
    assert sum(m.startswith("rounds: 2/2 round · ") for m in caplog.messages) == 1
    assert sum(m.startswith("step 2/2 · loss ") for m in caplog.messages) == 2
    for r, m in enumerate(state["finished"]):
        rdir = tmp_path / f"round_{r:02d}"
        rows = [json.loads(line) for line in (rdir / "samples.jsonl").read_text().splitlines()]
        chosen = [row for row in rows if row["chosen"]]
        assert len(chosen) == 4 and {"ppl", "rep", "keep", "reasons", "text", "kappa"} <= set(chosen[0])
        assert m["kept"] == sum(row["keep"] for row in chosen) == len((rdir / "train.jsonl").read_text().splitlines())
        assert (rdir / "adapter" / "adapter_config.json").is_file() and (rdir / "vector.safetensors").is_file()
        greedy = json.loads((rdir / "greedy.json").read_text())
        assert set(greedy) == {"base", "healed"} and all(len(v) == 2 for v in greedy.values())
        for stage in ("base", "steered", "healed"):
            assert 0.0 < m[f"coherence_{stage}"] < 1.0 and m[f"trait_{stage}"] < 0.0
    events = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert [e["round"] for e in events if e["event"] == "round"] == [0, 1]
    assert sum(e["event"] == "dose_attempt" for e in events) >= 2
    tb = _scalars(tmp_path / "tb")
    assert [s for s, _ in tb["rounds/coherence_healed"]] == [0, 1]
    assert tb["rounds/trait_steered"][1][1] == pytest.approx(state["finished"][1]["trait_steered"])
    fit = _scalars(tmp_path / "tb" / "round_01")
    assert len(fit["train/loss"]) == 2 and "train/barrier" in fit
    assert (tmp_path / "trajectory.png").stat().st_size > 0
    report = (tmp_path / "report.md").read_text()
    assert "| 1 |" in report and "round 1 samples" in report
    assert not (tmp_path / "student").exists(), "the student is healed in memory, never written out whole"


def test_early_stop_when_coherence_is_below_the_floor(tmp_path: Path) -> None:
    # coherence is a probability mass < 1, so a floor of 1 forces the stop after the first round
    state = _run(tmp_path, "--rounds", "3", "--coh_floor", "1.0")
    assert len(state["finished"]) == 1
    assert state["stopped"]["round"] == 0 and "coh_floor" in state["stopped"]["reason"]
    assert (tmp_path / "round_00" / "adapter").is_dir() and not (tmp_path / "round_01").exists()
    assert "Stopped" in (tmp_path / "report.md").read_text()


def test_resume_after_a_finished_round_matches_an_uninterrupted_run(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    full = _run(tmp_path / "full", "--rounds", "2")
    first = _run(tmp_path / "resumed", "--rounds", "1")
    assert len(first["finished"]) == 1
    assert "resume" in heal_error(_argv(tmp_path / "resumed", "--rounds", "2"), capsys)
    assert "seed" in heal_error(_argv(tmp_path / "resumed", "--rounds", "2", "--resume", "true", "--seed", "5"), capsys)
    resumed = _run(tmp_path / "resumed", "--rounds", "2", "--resume", "true", "--device", "cpu")  # was auto
    assert len(resumed["finished"]) == 2
    for key in ("trait_base", "coherence_base", "trait_steered", "coherence_healed", "trait_healed", "kept"):
        assert resumed["finished"][1][key] == pytest.approx(full["finished"][1][key], rel=1e-5), key
    assert resumed["finished"][0] == first["finished"][0]


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-gemma3_vl"])  # a wrapper: tests/models/test_wrapped.py
def test_baked_history_with_the_current_adapter_off_is_the_previous_round(model: str, tmp_path: Path) -> None:
    state = _run(tmp_path, "--rounds", "2", "--model", model)
    assert state["config"]["model"] == model and [m["round"] for m in state["finished"]] == [0, 1]
    tok = tiny_tokenizer()
    texts = load_dilemmas().prompts(tok)[:4]
    prev = PeftModel.from_pretrained(load_model(model), str(tmp_path / "round_00" / "adapter"))
    want = next_token_logits(prev, tok, texts)  # round 0's healed student, its adapter on
    baked = bake_adapter(load_model(model), tmp_path / "round_00" / "adapter")
    current = PeftModel.from_pretrained(baked, str(tmp_path / "round_01" / "adapter"))
    with current.disable_adapter():
        got = next_token_logits(current, tok, texts)
    on = next_token_logits(current, tok, texts)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(on, want, atol=1e-6), "round 1's adapter changes the outputs when on"
    base = next_token_logits(load_model(model), tok, texts)
    assert not torch.allclose(base, want, atol=1e-6), "round 0's adapter is in the baked weights"


def test_zero_kept_stops_the_round_with_a_message_and_keeps_the_samples(tmp_path: Path) -> None:
    state = _run(tmp_path, "--rounds", "2", "--filter.ppl_tau", "1e-6", "--dose.max_attempts", "2")
    assert state["finished"] == [] and state["stopped"]["round"] == 0
    assert "no completion passed the filter after 2 dose attempts" in state["stopped"]["reason"]
    rows = [json.loads(line) for line in (tmp_path / "round_00" / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and not any(row["keep"] for row in rows)
    assert all("perplexity" in row["reasons"] for row in rows)
    assert not (tmp_path / "round_00" / "adapter").exists()
    assert "no completion passed" in (tmp_path / "report.md").read_text()
    events = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert events[-1]["event"] == "stop"


def test_persona_pair_with_an_empty_side_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "persona.json"
    path.write_text(json.dumps({"pos_system": "You care.", "neg_system": "  "}))
    with pytest.raises(ValueError, match="neg_system"):
        run_rounds(model="tiny-llama", persona_file=str(path), out_dir=str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_probe_answers_that_are_not_single_tokens_are_refused(tmp_path: Path) -> None:
    data = json.loads(DEFAULT_DILEMMA_FILE.read_text())
    data["answers"] = {"A": ["A", " A"], "B": ["B", " B"]}  # " B" is two tokens for the tiny tokenizer
    path = tmp_path / "dilemmas.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"single tokens.*B:' B'"):
        run_rounds(model="tiny-llama", dilemma_file=str(path), out_dir=str(tmp_path / "out"))


def test_bad_values_name_the_field(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ValueError, match="coh_floor"):
        run_rounds(model="tiny-llama", coh_floor=1.5, out_dir=str(tmp_path))
    assert "kappa_min" in heal_error(_argv(tmp_path, "--dose.kappa_min", "0"), capsys)
    with pytest.raises(SystemExit):
        main(["rounds", "--config", str(CONFIGS / "rounds_rmse.yaml"), "--heal.ref", "other"])


@pytest.mark.parametrize("ref", ["base", "prev"])
def test_ref_base_leashes_to_the_original_and_prev_to_the_baked_student(ref: str, tmp_path: Path) -> None:
    # round 1's first step: the fresh adapter is zero, so the student is S_1 = original + round 0's adapter;
    # KL to prev (S_1) is exactly 0 there, KL to base (the original) is round 0's drift, > 0
    _run(tmp_path, "--rounds", "2", "--heal.ref", ref, "--heal.lr", "0.05")
    first = {tag: values[0][1] for tag, values in _scalars(tmp_path / "tb" / "round_01").items()}
    if ref == "prev":
        assert first["train/kl_max"] == pytest.approx(0.0, abs=1e-6)
    else:
        assert first["train/kl_max"] > 1e-3


def test_bf16_rounds_heal_the_student_itself_in_its_dtype(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import heal_pl.hardware
    import heal_pl.module
    import heal_pl.rounds.loop

    loads: list[tuple[str, str]] = []
    storages: dict[str, list[set[int]]] = {"original": [], "student": []}  # where each model's base weights live

    def counting_load_model(name: str, dtype: str = "float32", **kwargs):
        loads.append((name, dtype))
        return load_model(name, dtype=dtype, **kwargs)

    def recording(fn, who: str):
        def wrapped(model, *args, **kwargs):
            storages[who].append({p.data_ptr() for n, p in base_lm(model).named_parameters() if "lora_" not in n})
            return fn(model, *args, **kwargs)

        return wrapped

    for where in (heal_pl.hardware, heal_pl.module):
        monkeypatch.setattr(where, "load_model", counting_load_model)
    monkeypatch.setattr(heal_pl.rounds.loop, "tail_perplexity", recording(heal_pl.rounds.loop.tail_perplexity,
                                                                          "original"))  # fmt: skip
    monkeypatch.setattr(heal_pl.rounds.loop, "probe_model", recording(heal_pl.rounds.loop.probe_model, "student"))
    state = _run(tmp_path, "--rounds", "2", "--dtype", "bfloat16")
    assert [m["round"] for m in state["finished"]] == [0, 1]
    assert loads == [("tiny-llama", "bfloat16")], "one copy of the base weights: the original is the student, off"
    seen = storages["original"] + storages["student"]
    assert len(storages["student"]) == 6 and all(s == seen[0] for s in seen), "every round on the same base weights"
    for r in (0, 1):
        card = json.loads((tmp_path / f"round_{r:02d}" / "adapter" / "heal_pl.json").read_text())
        assert card["hparams"]["dtype"] == "bfloat16" and card["base_model"] == "tiny-llama"
        fit = _scalars(tmp_path / "tb" / f"round_{r:02d}")
        assert len(fit["train/loss"]) == 2 and all(math.isfinite(v) for _, v in fit["train/loss"])
