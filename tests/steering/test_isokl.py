"""Tests of heal_pl.steering.isokl: the model-level iso-KL calibration of one sign of a steering method
(docs/maths.md §3).

Every ``measure_kl`` call is recorded through a wrapper, so the history is checked against what was
actually measured; the result and the audit are checked against fresh, independent ``measure_kl`` calls.
"""

from __future__ import annotations

import functools
import math

import pytest
from peft.tuners.lora import LoraLayer

import heal_pl.steering.isokl
from heal_pl.steering import AdapterSteering
from heal_pl.steering.isokl import calibrate_method
from heal_pl.steering.trajectory import STATS, measure_kl
from tests.helpers import lively, lively_peft
from tests.steering.test_trajectory import PROMPTS, vector

CALIB, AUDIT = PROMPTS[:3], PROMPTS[3:]
KW = dict(max_new_tokens=8, batch_size=4)


@pytest.fixture
def setup(tokenizer, monkeypatch):
    model = lively()
    vec = vector(model, tokenizer)
    calls: list[tuple[float, list[str]]] = []

    def recording(model, tokenizer, prompts, method, coeff, *args, **kwargs):
        calls.append((coeff, list(prompts)))
        return measure_kl(model, tokenizer, prompts, method, coeff, *args, **kwargs)

    monkeypatch.setattr(heal_pl.steering.isokl, "measure_kl", recording)
    return model, tokenizer, vec, calls


@pytest.mark.parametrize("sign", [1, -1])
def test_converges_and_history_is_every_measurement(setup, sign: int) -> None:
    model, tokenizer, vec, calls = setup
    seen = []
    out = calibrate_method(model, tokenizer, vec, CALIB, AUDIT, target=1.0, bracket=(0.5, 200.0), sign=sign,
                           tol=0.02, on_evaluation=seen.append, **KW)
    assert out["converged"] and out["message"] == "converged"
    assert abs(out["stat_star"] - 1.0) < 0.02
    history = out["history"]
    assert out["evaluations"] == len(history) == len(seen) == len(calls) - 1 >= 2
    assert seen == history
    for entry, (coeff, prompts) in zip(history, calls[:-1], strict=True):
        assert prompts == CALIB and coeff == entry["coeff"] == sign * entry["c"] and entry["c"] > 0
        assert set(STATS) <= set(entry)
    assert calls[-1] == (out["coeff"], AUDIT)  # the audit: one more measurement, held-out prompts, at c*
    assert out["coeff"] == sign * out["c_star"] and out["stat"] == "p95" and out["sign"] == sign

    again = measure_kl(model, tokenizer, CALIB, vec, out["coeff"], **KW).stats
    assert again == out["stats_star"] and again["p95"] == out["stat_star"]
    audit = measure_kl(model, tokenizer, AUDIT, vec, out["coeff"], **KW).stats
    assert out["audit"] == audit
    assert out["audit_ratio"] == pytest.approx(audit["p95"] / out["stat_star"], rel=1e-12)


def test_unreachable_target_is_not_converged_and_returns_the_closest_point(setup) -> None:
    model, tokenizer, vec, calls = setup
    out = calibrate_method(model, tokenizer, vec, CALIB, None, target=50.0, bracket=(0.5, 4.0), stat="max", **KW)
    assert not out["converged"] and "not reached" in out["message"]
    assert out["c_star"] == 4.0 and out["stat_star"] < 50.0
    best = min(out["history"], key=lambda h: abs(h["max"] - 50.0))
    assert best["c"] == out["c_star"]
    assert out["audit"] is None and out["audit_ratio"] is None
    assert len(calls) == len(out["history"])  # no audit measurement


def test_max_iters_keeps_the_closest_point_and_audits_there(setup, monkeypatch) -> None:
    model, tokenizer, vec, calls = setup
    # the doubling search (prior_slope=None), so that the last point evaluated is not the closest
    doubling = functools.partial(heal_pl.steering.isokl.calibrate, prior_slope=None)
    monkeypatch.setattr(heal_pl.steering.isokl, "calibrate", doubling)
    out = calibrate_method(model, tokenizer, vec, CALIB, AUDIT, target=0.6, bracket=(0.5, 200.0), tol=0.01,
                           max_iters=2, **KW)
    (c1, s1), (c2, s2) = [(h["c"], h["p95"]) for h in out["history"]]
    assert c1 == 10.0 and c2 == 20.0  # geometric middle, then doubled
    assert not out["converged"] and "max_iters=2" in out["message"]
    assert out["c_star"] == (c1 if abs(s1 - 0.6) <= abs(s2 - 0.6) else c2) == c1  # not the last one evaluated
    assert calls[-1] == (out["coeff"], AUDIT)
    assert out["audit"] == measure_kl(model, tokenizer, AUDIT, vec, c1, **KW).stats


def test_other_statistic(setup) -> None:
    model, tokenizer, vec, _ = setup
    out = calibrate_method(model, tokenizer, vec, CALIB, AUDIT, target=0.3, stat="mean", bracket=(0.5, 200.0), **KW)
    assert out["converged"] and abs(out["stats_star"]["mean"] - 0.3) < 0.05
    assert math.isfinite(out["audit_ratio"])


def test_bad_input(setup) -> None:
    model, tokenizer, vec, calls = setup
    with pytest.raises(ValueError, match="stat='p42' is not allowed; choose one of mean, p50"):
        calibrate_method(model, tokenizer, vec, CALIB, stat="p42")
    with pytest.raises(ValueError, match="sign=0 must be \\+1 or -1"):
        calibrate_method(model, tokenizer, vec, CALIB, sign=0)
    with pytest.raises(ValueError, match="sign=True"):
        calibrate_method(model, tokenizer, vec, CALIB, sign=True)
    with pytest.raises(ValueError, match="audit_prompts is empty"):
        calibrate_method(model, tokenizer, vec, CALIB, [])
    with pytest.raises(ValueError, match="target=0.0 must be a finite number > 0"):
        calibrate_method(model, tokenizer, vec, CALIB, target=0.0)
    with pytest.raises(ValueError, match="needs lo < hi"):
        calibrate_method(model, tokenizer, vec, CALIB, bracket=(5.0, 1.0))
    assert calls == []  # nothing was measured


def test_calibrates_an_adapter(tokenizer) -> None:
    model = lively_peft()
    method = AdapterSteering(model)
    out = calibrate_method(model, tokenizer, method, CALIB, AUDIT, target=0.5, bracket=(0.05, 20.0), sign=-1, **KW)
    assert out["converged"] and abs(out["stat_star"] - 0.5) < 0.05 and out["coeff"] < 0
    again = measure_kl(model, tokenizer, CALIB, method, out["coeff"], **KW).stats["p95"]
    assert again == out["stat_star"]
    assert all(m.scaling["default"] == 2.0 for m in model.modules() if isinstance(m, LoraLayer))  # restored
