"""The matched-tau rule (heal_pl.barrier.tau) against a float64 numpy computation, and a real event file read back."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from torch.utils.tensorboard import SummaryWriter

from heal_pl.barrier.tau import (
    AGGS,
    read_scalars,
    read_trajectory,
    suggest_taus,
    tail_mean,
    tau_table,
    usage_line,
    window_size,
)


def trajectory(steps: int = 37, seed: int = 0) -> dict[str, list[float]]:
    """A drifting KL per aggregate, the tail ones above the mean as in a real run."""
    rng = np.random.default_rng(seed)
    drift = np.linspace(0.0, 1.0, steps) + rng.normal(0, 0.1, steps).clip(-0.05)
    return {f"kl_{a}": (drift * scale + rng.uniform(0, 0.2, steps)).tolist()
            for a, scale in zip(AGGS, (1.0, 1.6, 3.2, 9.0), strict=True)}  # fmt: skip


def write_events(folder: Path, scalars: dict[str, list[float]]) -> Path:
    """A TensorBoard event file of ``train/<name>`` scalars, step by step, as Lightning's logger writes them."""
    writer = SummaryWriter(str(folder))
    for step in range(max(len(v) for v in scalars.values())):
        for name, values in scalars.items():
            if step < len(values):
                writer.add_scalar(f"train/{name}", values[step], step)
    writer.close()
    return folder


@pytest.mark.parametrize("steps", [37, 108, 5])
def test_suggest_taus_equals_a_float64_hand_computation(steps: int) -> None:
    traj = trajectory(steps)
    ms = (1.1, 1.5, 2.0)
    got = suggest_taus(traj, ms)
    k = max(1, steps // 4)
    assert list(got) == list(AGGS)
    for agg in AGGS:
        x = np.asarray(traj[f"kl_{agg}"], dtype=np.float64)
        s = got[agg]
        assert (s.steps, s.window) == (steps, k)
        assert s.last == pytest.approx(x[-k:].mean(), rel=1e-13)
        assert s.first == pytest.approx(x[:k].mean(), rel=1e-13)
        assert (s.low, s.high) == (x.min(), x.max())
        for m in ms:
            assert s.tau[m] == pytest.approx(m * x[-k:].mean(), rel=1e-13)
            assert s.fired[m] == np.mean(x > s.tau[m])


def test_the_loop_experiments_quarter() -> None:
    """``-(steps // 4):`` of benchmarks/loop_experiment.py, the same values for its 36- and 108-step runs."""
    for steps in (36, 108):
        x = trajectory(steps)["kl_p95"]
        assert window_size(steps) == steps // 4
        assert tail_mean(x) == math.fsum(x[-(steps // 4) :]) / (steps // 4)


def test_window_size_edges() -> None:
    assert window_size(3) == 1  # never empty
    assert window_size(10, 1.0) == 10  # tail 1: the whole run
    assert window_size(100, 0.29) == 29  # 0.29 · 100 = 28.999... in floating point


def test_tail_and_fired_on_a_flat_run() -> None:
    s = suggest_taus({"kl_mean": [0.5] * 8}, ms=(1.0, 1.5))["mean"]
    assert s.first == s.last == s.low == s.high == 0.5
    assert s.fired == {1.0: 0.0, 1.5: 0.0}  # "above": a step exactly at tau does not fire


@pytest.mark.parametrize("ms", [(1.5, 0.0), (-1.0,), (), (float("nan"),), (1.5, 1.5)])
def test_bad_margins_name_ms(ms: tuple[float, ...]) -> None:
    with pytest.raises(ValueError, match=r"^ms=.* must be a non-empty list of distinct numbers > 0"):
        suggest_taus(trajectory(), ms)


@pytest.mark.parametrize("tail", [0.0, 1.5, -0.25])
def test_bad_tail_names_tail(tail: float) -> None:
    with pytest.raises(ValueError, match=r"^tail="):
        suggest_taus(trajectory(), tail=tail)


def test_no_kl_series_says_nll() -> None:
    with pytest.raises(ValueError, match="reg: nll"):
        suggest_taus({"loss": [1.0, 2.0]})


def test_a_diverged_step_is_named() -> None:
    with pytest.raises(ValueError, match=r"train/kl_rmse is nan at step 2"):
        suggest_taus({"kl_rmse": [0.1, 0.2, float("nan"), 0.3]})


def test_read_trajectory_reads_a_real_event_file_back(tmp_path: Path) -> None:
    traj = trajectory(12)
    fired = [float(v > 1.0) for v in traj["kl_rmse"]]
    write_events(tmp_path, {**traj, "barrier_fired": fired, "loss": [2.0] * 12})
    read = read_trajectory(tmp_path)
    assert set(read) == {*traj, "barrier_fired"}  # loss is not part of it
    for name, values in traj.items():
        np.testing.assert_array_equal(read[name], np.float32(values))  # float32 in the event file
    assert read["barrier_fired"] == fired
    (file,) = tmp_path.glob("events.out.tfevents.*")
    assert read_trajectory(file) == read  # the event file itself, or its folder
    assert read_scalars(tmp_path)["loss"] == [2.0] * 12


def test_an_nll_run_is_refused_with_the_tags_it_has(tmp_path: Path) -> None:
    write_events(tmp_path, {"sft": [2.0, 1.9], "loss": [2.0, 1.9]})
    with pytest.raises(ValueError, match=r"events=.* has no train/kl_mean\|kl_rmse\|kl_p95\|kl_max scalars \(found: "
                                         r"train/loss, train/sft\): the run was reg: nll"):  # fmt: skip
        read_trajectory(tmp_path)


def test_missing_or_wrong_folder_names_events(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"^events='.*nowhere' does not exist"):
        read_trajectory(tmp_path / "nowhere")
    write_events(tmp_path / "rmse" / "version_0", trajectory(4))
    with pytest.raises(ValueError, match=r"holds no TensorBoard event file .* below it hold some: .*rmse/version_0"):
        read_trajectory(tmp_path / "rmse")


def test_table_and_usage_line() -> None:
    got = suggest_taus({"kl_mean": [0.0, 1.0, 2.0, 3.0], "kl_rmse": [0.0, 2.0, 4.0, 6.0]}, ms=(1.1, 2.0))
    assert tau_table(got).splitlines() == [
        "| agg | first 1 → last 1 of 4 steps | min / max | m = 1.1: tau (fired) | m = 2: tau (fired) |",
        "|---|---|---|---|---|",
        "| mean | 0 → 3 | 0 / 3 | 3.3 (0 %) | 6 (0 %) |",
        "| rmse | 0 → 6 | 0 / 6 | 6.6 (0 %) | 12 (0 %) |",
    ]
    assert usage_line(got, "rmse", "rmse") == (
        "use: heal fit --config rmse --model.barrier.tau TAU, TAU = 6.6 (m = 1.1) or 12 (m = 2) (the rmse row: the "
        "config's agg)"
    )
    assert "--model.barrier.agg AGG" in usage_line(got, None, None)
