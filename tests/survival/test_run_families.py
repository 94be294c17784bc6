"""``heal survival`` from the CLI on a tiny Gemma-3 (sliding window 8 < prompt + w) and a tiny Qwen3.5 (linear /
full hybrid): the fast fork path runs (no fallback log line), and every pmass it wrote equals the recompute.

The recompute reads each written trajectory again, one full cache-free forward per fork through the model's own
``logits`` (:func:`probe_forks_recompute`), under the vector and coefficient the run wrote down.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from heal_pl.cli import main
from heal_pl.data.prompts import chat_prompt
from heal_pl.models.load import load_model, load_tokenizer
from heal_pl.steering.vectors import SteeringVector
from heal_pl.survival.config import SweepConfig
from heal_pl.survival.fork_cache import fork_plan
from heal_pl.survival.forks import probe_forks_recompute
from heal_pl.survival.probes import answer_token_ids
from tests.survival.test_run import CALIB, CONFIG

W, STEP = 12, 3
SPLICE = "\nSo the answer (true or false) is:"


# the probe check needs half its prompts at pmass >= threshold at fork 0: the tiny random Qwen3.5 puts ≈ 0.0087 of its
# mass on the answers there, below the 0.009 that suits the others
@pytest.mark.parametrize(("family", "mode", "threshold"), [("gemma3", "packed", 0.009), ("qwen3_5", "batched", 0.008)])
def test_survival_cli_on_sliding_window_and_hybrid_models(family: str, mode: str, threshold: float, tmp_path: Path,
                                                          caplog) -> None:  # fmt: skip
    out = tmp_path / family
    with caplog.at_level(logging.INFO, logger="heal_pl"):
        main(["survival", "--config", str(CONFIG), "--model", f"tiny-{family}", "--device", "cpu", "--dtype",
              "float32", "--w", str(W), "--fork_step", str(STEP), "--n_eval", "3", "--alphas", "[0, 4]",
              "--signs", "[1]", "--threshold", str(threshold), "--splice", SPLICE, "--batch_size", "3",
              "--fork_batch", "2", "--out_dir", str(out), "--calibration", CALIB])  # fmt: skip
    assert not [r for r in caplog.records if "recomputing every fork" in r.getMessage()]
    model, tok = load_model(f"tiny-{family}").eval(), load_tokenizer(f"tiny-{family}")
    assert fork_plan(model).mode == mode
    vector = SteeringVector.load(out / "calibrate" / "vector.safetensors")
    config = SweepConfig(w=W, fork_step=STEP, splice=SPLICE)
    ids = answer_token_ids(tok, config.answer_sets())
    trajectories = json.loads((out / "trajectories.json").read_text())["trajectories"]
    assert len(trajectories) == 2 * 3 and {t["coeff"] != 0 for t in trajectories} == {True, False}
    spread = 0.0
    for t in trajectories:
        prompt = chat_prompt(tok, t["question"], None)
        ref = probe_forks_recompute(model, tok, prompt, t["tokens"], vector, t["coeff"], W, STEP, SPLICE, ids)
        written = np.array([np.nan if p is None else p for p in t["pmass"]], dtype=np.float64)
        np.testing.assert_array_equal(np.isnan(written), np.isnan(ref.pmass))
        np.testing.assert_allclose(written, ref.pmass, rtol=1e-4, atol=0)
        np.testing.assert_allclose(written, ref.pmass, rtol=0, atol=1e-4)
        spread = max(spread, float(np.nanmax(np.abs(np.diff(written)) / written[1:])))
    assert spread > 1e-3  # the forks differ by far more than the tolerance: a fork read off its place would show
    assert (out / "survival.csv").is_file()
