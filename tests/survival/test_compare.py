"""``heal compare``: heal_pl/configs/compare.yaml runs on a tiny model; every method sees the same prompts and forks,
the table is methods × α plus the prompt row, and each number agrees with an independent recomputation.

The prompt baseline's KL is recomputed from the model's own forward on the two whole sequences (with and without
the system prompt) in float64, its probe from full cache-free forwards with the system prompt present, and its
Kaplan–Meier row by lifelines directly (``tests.survival.test_run.km_reference``).
"""

from __future__ import annotations

import csv
import inspect
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import heal_pl.survival.compare
from heal_pl.cli import main
from heal_pl.configs import FOLDER
from heal_pl.data.prompts import PIRATE, chat_prompt
from heal_pl.models.load import load_model, load_tokenizer
from heal_pl.steering.prompt_baseline import SystemPrompt
from heal_pl.survival.compare import COMPARE_COLUMNS, SURVIVAL_ARGS, run_compare
from heal_pl.survival.config import SweepConfig, load_questions
from heal_pl.survival.forks import probe_forks_recompute
from heal_pl.survival.probes import answer_token_ids
from heal_pl.survival.run import run_survival
from tests.steering.test_prompt_baseline import reference
from tests.survival.test_run import km_reference

CONFIG = FOLDER / "compare.yaml"
SPLICE = "\nSo the answer (true or false) is:"
METHODS = ["mean_diff", "pca", "directional_ablation"]
TARGET, TOL = 0.02, 0.004  # a dose the tiny random model reaches (its KL at c = 64 is ≈ 0.03)
CALIB = f"{{n_fit: 3, n_calib: 2, n_audit: 2, max_new_tokens: 6, max_iters: 8, tol: {TOL}}}"
# the tiny random model puts ≈ 0.009 of its mass on the answers: this threshold gives deaths and survivors
TINY = ["--model", "tiny-llama", "--w", "9", "--fork_step", "2", "--n_eval", "5", "--alphas", "[0, 1, 4]",
        "--threshold", "0.009", "--splice", SPLICE, "--batch_size", "2", "--fork_batch", "3", "--target", str(TARGET),
        "--calibration", CALIB]  # fmt: skip
LABELS = ["0", "+1", "+4"]


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.mark.slow  # a whole heal compare (~11 s)
def test_compare_config_runs_with_a_tiny_model(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "run"
    main(["compare", "--config", str(CONFIG), *TINY, "--out_dir", str(out)])
    table = read_csv(out / "compare.csv")
    assert list(table[0]) == list(COMPARE_COLUMNS)
    assert [(r["method"], r["label"]) for r in table] == [(m, lab) for m in METHODS for lab in LABELS] + [
        ("prompt", "prompt")]
    questions = [q["prompt"] for q in load_questions("eval")[:5]]
    forks = SweepConfig(w=9, fork_step=2).fork_points().tolist()

    for m in METHODS:  # each method: its own calibration, the same prompts and forks, rows copied faithfully
        calib = json.loads((out / m / "calibrate" / "calib.json").read_text())
        assert calib["config"]["method"] == m and calib["config"]["target"] == TARGET
        result = calib["results"]["+"]
        assert result["converged"] and abs(result["stat_star"] - TARGET) < TOL  # c* reaches the shared target
        summary = json.loads((out / m / "summary.json").read_text())
        assert summary["fork_points"] == forks and summary["c_star"] == {"+": result["c_star"]}
        trajectories = json.loads((out / m / "trajectories.json").read_text())["trajectories"]
        survival = {r["label"]: r for r in read_csv(out / m / "survival.csv")}
        kl_rows = read_csv(out / m / "kl.csv")
        for r in (r for r in table if r["method"] == m):
            assert [t["question"] for t in trajectories if t["label"] == r["label"]] == questions
            for key in ("alpha", "coeff", "n", "died", "censored", "S_mid", "S_end", "t_half", "kl_p95", "kl_mean"):
                ours, theirs = r[key], survival[r["label"]][key]
                assert ours == theirs, (m, key)
            assert float(r["kl_max"]) == max(float(x["kl"]) for x in kl_rows if x["label"] == r["label"])
            if r["label"] == "0":
                assert r["c_star"] == "-"
            else:
                assert float(r["c_star"]) == result["c_star"]
                assert float(r["coeff"]) == pytest.approx(float(r["alpha"]) * result["c_star"], rel=1e-12)
    # additive methods at α = 0 are the unsteered model; the ablation is on at α = 0
    zero = {r["method"]: r for r in table if r["label"] == "0"}
    assert float(zero["mean_diff"]["kl_max"]) == float(zero["pca"]["kl_max"]) == 0.0
    assert float(zero["directional_ablation"]["kl_max"]) > 0

    # the prompt row, recomputed from the model and from prompt.json
    saved = json.loads((out / "prompt" / "prompt.json").read_text())
    prompt_row = table[-1]
    assert saved["system"] == PIRATE and saved["fork_points"] == forks
    assert [prompt_row[k] for k in ("alpha", "coeff", "c_star")] == ["-", "-", "-"]
    trs = saved["trajectories"]
    assert [t["question"] for t in trs] == questions
    model, tokenizer = load_model("tiny-llama").eval(), load_tokenizer("tiny-llama")
    answer_ids = answer_token_ids(tokenizer, SweepConfig(w=9, fork_step=2).answer_sets())
    for t in trs[:3]:
        gen, kl_ref = reference(model, tokenizer, t["question"], PIRATE, max_new_tokens=9)
        assert gen.tolist() == t["tokens"]  # the rollout WITH the system prompt
        np.testing.assert_allclose(t["kl"], kl_ref.numpy(), rtol=1e-4, atol=1e-6)
        with_system = probe_forks_recompute(model, tokenizer, chat_prompt(tokenizer, t["question"], PIRATE),
                                            t["tokens"], SystemPrompt(PIRATE), 1.0, 9, forks, SPLICE, answer_ids)
        without = probe_forks_recompute(model, tokenizer, chat_prompt(tokenizer, t["question"], None), t["tokens"],
                                        SystemPrompt(PIRATE), 1.0, 9, forks, SPLICE, answer_ids)  # fmt: skip
        read = np.array([np.nan if p is None else p for p in t["pmass"]])
        np.testing.assert_allclose(read, with_system.pmass, rtol=1e-4, atol=1e-7)  # read with the prompt present
        assert np.nanmax(np.abs(with_system.pmass - without.pmass)) > 1e-5  # ... which the check would see
    pooled = np.concatenate([np.asarray(t["kl"], dtype=np.float64) for t in trs])
    assert float(prompt_row["kl_p95"]) == pytest.approx(np.percentile(pooled, 95), rel=1e-6)
    assert float(prompt_row["kl_mean"]) == pytest.approx(pooled.mean(), rel=1e-6)
    assert float(prompt_row["kl_max"]) == pooled.max() > 0
    pmass = np.array([[np.nan if p is None else p for p in t["pmass"]] for t in trs])
    ref = km_reference(pmass, np.array([t["gen_len"] for t in trs]), np.asarray(forks), 0.009)
    assert int(prompt_row["died"]) == ref["died"] and prompt_row["t_half"] == ref["t_half"]
    assert float(prompt_row["S_end"]) == pytest.approx(ref["S_end"]) and int(prompt_row["n"]) == 5

    report = json.loads((out / "compare.json").read_text())
    assert report["prompt"]["stats"]["p95"] == pytest.approx(np.percentile(pooled, 95), rel=1e-6)
    assert report["table"][-1]["alpha"] is None and set(report["calibration"]) == set(METHODS)
    md = (out / "compare.md").read_text().splitlines()
    assert md[0] == "| " + " | ".join(COMPARE_COLUMNS) + " |" and md[2 + len(table)] == ""
    calibration_md = md[md.index("| method | sign | c* | stat at c* | converged | evaluations | audit ratio |"):]
    assert calibration_md[1] == "|---|---|---|---|---|---|---|" and len(calibration_md) == 2 + len(METHODS)
    assert all(line.startswith(f"| {m} | + | ") for line, m in zip(calibration_md[2:], METHODS, strict=True))
    figures = {p.name: p.stat().st_size for p in (out / "figures").glob("*.png")}
    assert set(figures) == {"compare_0.png", "compare_plus_1.png", "compare_plus_4.png"}
    assert min(figures.values()) > 5000 and (out / "prompt" / "figures" / "spaghetti_prompt.png").is_file()
    events = EventAccumulator(str(out), size_guidance={"images": 0})
    events.Reload()
    assert set(events.Tags()["images"]) == {f"compare/curves/{lab}" for lab in LABELS} | {"compare/spaghetti/prompt"}
    s_end = events.Scalars("compare/pca/+/S_end")
    assert [e.step for e in s_end] == [0, 100, 400]
    assert [e.value for e in s_end] == pytest.approx([float(r["S_end"]) for r in table if r["method"] == "pca"])
    assert events.Scalars("compare/prompt/kl_p95")[0].value == pytest.approx(float(prompt_row["kl_p95"]), rel=1e-6)

    # a rerun continues from every journal and writes the same table
    caplog.set_level("INFO", logger="heal_pl")
    main(["compare", "--config", str(CONFIG), *TINY, "--out_dir", str(out)])
    continuing = [m for m in caplog.messages if "continuing from" in m]
    assert len(continuing) == 2 * len(METHODS) + 1  # calibration and sweep per method, and the prompt
    assert read_csv(out / "compare.csv") == table


@pytest.mark.slow  # a whole heal compare (~5 s)
def test_an_adapter_beside_a_vector(tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        get_peft_model(load_model("tiny-llama"), lora).save_pretrained(tmp_path / "adapter")
    out = tmp_path / "run"
    main(["compare", "--config", str(CONFIG), *TINY, "--alphas", "[0, 1]", "--methods", "[mean_diff, adapter]",
          "--adapter_dir", str(tmp_path / "adapter"), "--prompt_baseline", "false", "--signs", "[1, -1]",
          "--out_dir", str(out)])  # fmt: skip
    table = read_csv(out / "compare.csv")
    assert [(r["method"], r["label"]) for r in table] == [(m, lab) for m in ("mean_diff", "adapter") for lab in
                                                          ("0", "+1", "-1")]  # fmt: skip
    assert {p.name for p in (out / "figures").glob("*.png")} == {"compare_0.png", "compare_plus_1.png",
                                                                 "compare_minus_1.png"}  # fmt: skip
    events = EventAccumulator(str(out))
    events.Reload()
    for sign in "+-":  # the α = 0 row is on both signs' curves
        s_end = events.Scalars(f"compare/adapter/{sign}/S_end")
        assert [e.step for e in s_end] == [0, 100]
        assert [e.value for e in s_end] == pytest.approx([float(r["S_end"]) for r in table if r["method"] == "adapter"
                                                          and r["label"] in ("0", f"{sign}1")])  # fmt: skip
    adapter_calib = json.loads((out / "adapter" / "calibrate" / "calib.json").read_text())["config"]
    assert adapter_calib["adapter_dir"] == str(tmp_path / "adapter")
    assert json.loads((out / "mean_diff" / "calibrate" / "calib.json").read_text())["config"]["adapter_dir"] is None
    adapter = {r["label"]: r for r in table if r["method"] == "adapter"}
    assert float(adapter["0"]["kl_max"]) == 0.0 and float(adapter["+1"]["kl_max"]) > 0  # α = 0 is the base model
    assert not (out / "prompt").exists()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"methods": []}, r"methods=\[\] is empty; give at least one of mean_diff, pca, directional_ablation, adapter"),
        ({"methods": ["mean_diff", "steer"]}, r"methods item='steer' is not allowed; choose one of mean_diff, pca"),
        ({"methods": ["pca", "mean_diff", "pca"]}, r"names pca more than once"),
        ({"methods": ["adapter"]}, r"methods holds 'adapter', which needs adapter_dir"),
        ({"methods": ["pca"], "adapter_dir": "x"}, r"adapter_dir is only read with 'adapter' in methods"),
        ({"system": "  "}, r"system='  ' is empty: the prompt baseline compares a system prompt against none"),
        ({"calibration": {"pos_system": ""}}, r"system='' is empty"),
        ({"threshold": 1.5}, r"threshold=1.5 must be in the open interval \(0, 1\)"),
        ({"dtype": "half"}, r"dtype='half' is not allowed"),
        ({"device": "tpu"}, r"device='tpu' is not allowed"),
    ],
)
def test_bad_input_fails_before_any_work(kwargs: dict, message: str, tmp_path: Path, monkeypatch) -> None:
    def no_work(**_: object) -> None:
        raise AssertionError("a method ran before the bad input was reported")

    monkeypatch.setattr(heal_pl.survival.compare, "run_survival", no_work)
    with pytest.raises(ValueError, match=message):
        run_compare(model="tiny-llama", out_dir=str(tmp_path), **kwargs)


def test_an_empty_system_prompt_is_fine_without_the_baseline(tmp_path: Path, monkeypatch) -> None:
    calls = []
    monkeypatch.setattr(heal_pl.survival.compare, "run_survival", lambda **kw: calls.append(kw) or 1 / 0)
    with pytest.raises(ZeroDivisionError):  # got past the checks to the first method
        run_compare(model="tiny-llama", system="", prompt_baseline=False, methods=["pca"], out_dir=str(tmp_path))
    assert calls[0]["method"] == "pca" and calls[0]["adapter_dir"] is None
    assert calls[0]["out_dir"] == str(tmp_path / "pca")


def test_compare_takes_every_survival_argument_with_the_same_default() -> None:
    ours, theirs = inspect.signature(run_compare).parameters, inspect.signature(run_survival).parameters
    missing = [k for k in SURVIVAL_ARGS if k not in ours]
    assert not missing, f"run_compare lacks run_survival's arguments {missing}: add them to its signature"
    assert {k: ours[k].default for k in SURVIVAL_ARGS} == {k: theirs[k].default for k in SURVIVAL_ARGS}
    assert {k: ours[k].annotation for k in SURVIVAL_ARGS} == {k: theirs[k].annotation for k in SURVIVAL_ARGS}
