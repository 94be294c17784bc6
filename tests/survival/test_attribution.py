"""Death attribution on hand-made trajectories: known deaths, known spikes, window stats recomputed by numpy.

Forks 0, 4, 8, 12, 16; threshold 0.5; KL target 1; window k = 8 (the probe at fork t has seen tokens 0 … t − 1).

    A  kl 0.1, a spike of 5 at token 10; pmass drops at fork 12  → dies at 12, window kl[4:12] holds the spike
    B  kl 0.2 everywhere; pmass drops at fork 8                  → dies at 8 without a spike
    C  kl = 0.05 · p (0 … 0.75), never drops                     → alive
    D  kl 0.05, a spike of 3 at token 6, never drops              → alive, and spiking (a survivor's spike)
    E  ends at EOS after 6 tokens, never drops                    → censored at fork 4
    F  drops at fork 0                                            → dies with no window
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from matplotlib.colors import to_rgba
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter

from heal_pl.survival.attribution import (
    attribute_deaths,
    attribution_figure,
    transitions,
    window_stats,
    write_attribution,
)
from heal_pl.survival.plotting import ALIVE_COLOUR, DEAD_COLOUR
from heal_pl.survival.stored import by_label, load_trajectories

FORKS = [0, 4, 8, 12, 16]
NAN = float("nan")


def kls() -> dict[str, np.ndarray]:
    a = np.full(16, 0.1)
    a[10] = 5.0
    d = np.full(16, 0.05)
    d[6] = 3.0
    return {"A": a, "B": np.full(16, 0.2), "C": 0.05 * np.arange(16), "D": d, "E": np.full(6, 0.3),
            "F": np.full(16, 0.4)}  # fmt: skip


PMASS = {"A": [0.9, 0.9, 0.9, 0.2, 0.9], "B": [0.9, 0.8, 0.3, 0.1, 0.1], "C": [0.9] * 5, "D": [0.8] * 5,
         "E": [0.9, 0.9, NAN, NAN, NAN], "F": [0.1, 0.9, 0.9, 0.9, 0.9]}  # fmt: skip


def records(label: str = "+1", alpha: float = 1.0, sign: str = "+") -> list[dict]:
    return [{"label": label, "sign": sign, "alpha": alpha, "prompt_index": i, "gen_len": len(kl), "kl": kl.tolist(),
             "pmass": PMASS[name]} for i, (name, kl) in enumerate(kls().items())]  # fmt: skip


def group():
    forks, recs = load_trajectories({"fork_points": FORKS, "trajectories": records()})
    return forks, by_label(recs)["+1"]


def test_window_stats_are_the_tokens_the_probe_has_seen() -> None:
    kl = kls()["A"]
    mx, p95, mean = window_stats(kl, 12, 8)
    win = kl[4:12]  # tokens 4 … 11: the last 8 before the splice at fork 12
    assert (mx, p95, mean) == (5.0, pytest.approx(np.percentile(win, 95)), pytest.approx(win.mean()))
    assert window_stats(kl, 10, 8)[0] == pytest.approx(0.1)  # token 10 is not seen by the probe at fork 10
    assert window_stats(kl, 11, 8)[0] == 5.0  # … but by the one at fork 11
    assert window_stats(kl, 3, 8)[2] == pytest.approx(0.1)  # a short head: tokens 0 … 2
    assert all(np.isnan(window_stats(kl, 0, 8)))
    with pytest.raises(ValueError, match="window k=0 must be an integer ≥ 1"):
        window_stats(kl, 4, 0)
    with pytest.raises(ValueError, match=r"fork t=17 is outside \[0, 16\]"):
        window_stats(kl, 17)


def test_deaths_spikes_and_the_alive_comparison() -> None:
    forks, g = group()
    row, deaths = attribute_deaths(g, forks, threshold=0.5, kl_target=1.0, k=8)
    k = kls()
    by_prompt = {d["prompt_index"]: d for d in deaths}
    assert sorted(by_prompt) == [0, 1, 5]  # A, B, F
    a, b, f = by_prompt[0], by_prompt[1], by_prompt[5]
    assert (a["t_death"], a["win_lo"], a["win_hi"], a["spike"]) == (12, 4, 12, True)
    assert a["win_max"] == 5.0 and a["win_mean"] == pytest.approx(k["A"][4:12].mean())
    assert a["win_p95"] == pytest.approx(np.percentile(k["A"][4:12], 95))
    assert (b["t_death"], b["spike"], b["win_max"]) == (8, False, pytest.approx(0.2))
    assert f["t_death"] == 0 and f["win_max"] is None and f["spike"] is False and f["pct_rank"] is None
    # alive at fork 8: A (dies later), C, D; E ended at 6, F is dead. At fork 12: C, D (A dies there).
    alive8 = [k["A"][0:8].max(), k["C"][0:8].max(), k["D"][0:8].max()]  # 0.1, 0.35, 3
    alive12 = [k["C"][4:12].max(), k["D"][4:12].max()]  # 0.55, 3
    assert (b["n_alive"], a["n_alive"]) == (3, 2)
    assert b["alive_max_med"] == pytest.approx(np.median(alive8))
    assert a["alive_max_med"] == pytest.approx(np.median(alive12))
    assert b["pct_rank"] == pytest.approx(1 / 3) and a["pct_rank"] == 1.0
    pooled = alive8 + alive12
    assert row == {
        "label": "+1", "sign": "+", "alpha": 1.0, "k": 8, "n": 6, "died": 3, "died_at_0": 1, "spike": 1, "no_spike": 1,
        "dead_max_med": pytest.approx(np.median([5.0, 0.2])), "alive_max_med": pytest.approx(np.median(pooled)),
        "dead_mean_med": pytest.approx(np.median([k["A"][4:12].mean(), 0.2])),
        "alive_mean_med": pytest.approx(np.median([k["A"][0:8].mean(), k["C"][0:8].mean(), k["D"][0:8].mean(),
                                                   k["C"][4:12].mean(), k["D"][4:12].mean()])),
        "alive_spike": pytest.approx(2 / 5), "pct_rank": pytest.approx((1 / 3 + 1) / 2),
    }  # fmt: skip
    # a one-token window (token 11 before fork 12) misses A's spike at token 10
    assert attribute_deaths(g, forks, 0.5, 1.0, k=1)[0]["spike"] == 0


def test_a_label_without_deaths_has_no_statistics() -> None:
    forks, recs = load_trajectories({"fork_points": FORKS, "trajectories": [r for r in records()
                                                                            if r["prompt_index"] in (2, 3)]})
    row, deaths = attribute_deaths(by_label(recs)["+1"], forks, 0.5, 1.0)
    assert deaths == [] and row["died"] == row["spike"] == 0
    assert row["dead_max_med"] is row["alive_max_med"] is row["pct_rank"] is row["alive_spike"] is None


def test_transitions_are_the_at_risk_forks() -> None:
    forks, g = group()
    tr = transitions(g, forks, threshold=0.5, k=8)
    # fork 4: A B C D E (F died at 0); fork 8: A B C D (E ended at 6); fork 12: A C D; fork 16: C D
    assert tr["drop"].size == 5 + 4 + 3 + 2
    dying = np.flatnonzero(tr["dying"])
    assert dying.tolist() == [6, 9]  # B at fork 8 (second of fork 8's), A at fork 12 (first of fork 12's)
    assert tr["drop"][dying].tolist() == pytest.approx([0.3 - 0.8, 0.2 - 0.9])
    assert tr["win_max"][dying].tolist() == pytest.approx([0.2, 5.0])
    assert tr["win_max"][4] == pytest.approx(0.3) and tr["drop"][4] == 0.0  # E at fork 4: kl[0:4]


def test_figure_artists() -> None:
    forks, g = group()
    tr = transitions(g, forks, 0.5)
    fig = attribution_figure({"0": tr, "+1": tr, "+2": tr}, kl_target=1.0)
    visible = [ax for ax in fig.axes if ax.get_visible()]
    assert len(visible) == 3
    ax = visible[1]
    alive, dead = ax.collections
    np.testing.assert_allclose(alive.get_offsets(), np.c_[tr["win_max"], tr["drop"]][~tr["dying"]])
    np.testing.assert_allclose(dead.get_offsets(), np.c_[tr["win_max"], tr["drop"]][tr["dying"]])
    assert to_rgba(alive.get_facecolor()[0], 1) == to_rgba(ALIVE_COLOUR)
    assert to_rgba(dead.get_facecolor()[0], 1) == to_rgba(DEAD_COLOUR)
    target = ax.lines[0]
    assert target.get_xdata()[0] == 1.0 and target.get_linestyle() == "--"
    with pytest.raises(ValueError, match="at least one"):
        attribution_figure({}, 1.0)


def test_write_attribution_files_and_tensorboard(tmp_path: Path) -> None:
    recs = records("0", 0.0, "0") + records("+1") + records("-1", 1.0, "-")
    forks, stored = load_trajectories({"fork_points": FORKS, "trajectories": recs})
    writer = SummaryWriter(str(tmp_path))
    rows = write_attribution(tmp_path, by_label(stored), forks, 0.5, 1.0, ["+", "-"], writer=writer)
    writer.close()
    assert [r["label"] for r in rows] == ["0", "+1", "-1"] and all(r["spike"] == 1 for r in rows)
    md = (tmp_path / "attribution.md").read_text().splitlines()
    assert md[0].startswith("| label | sign | alpha | k | n | died") and len(md) == 5
    deaths = (tmp_path / "attribution_deaths.csv").read_text().splitlines()
    assert len(deaths) == 1 + 3 * 3 and deaths[0].startswith("label,prompt_index,t_death")
    assert {p.name for p in (tmp_path / "figures").iterdir()} == {"attribution_plus.png", "attribution_minus.png"}
    events = EventAccumulator(str(tmp_path), size_guidance={"images": 0})
    events.Reload()
    assert set(events.Tags()["images"]) == {"survival/attribution/+", "survival/attribution/-"}
    pct = events.Scalars("survival/attribution/-/pct_rank")
    assert [e.step for e in pct] == [0, 100] and [e.value for e in pct] == pytest.approx([2 / 3, 2 / 3])


def test_stored_trajectories_bad_input(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="trajectories='/nonexistent.json' does not exist"):
        load_trajectories("/nonexistent.json")
    (tmp_path / "x.json").write_text(json.dumps({"table": []}))
    with pytest.raises(ValueError, match="is not a heal survival trajectories.json"):
        load_trajectories(tmp_path / "x.json")
    with pytest.raises(ValueError, match="holds no trajectory"):
        load_trajectories({"fork_points": FORKS, "trajectories": []})
    bad = records()[:1]
    del bad[0]["kl"]
    with pytest.raises(ValueError, match=r"trajectory 0 lacks \['kl'\]"):
        load_trajectories({"fork_points": FORKS, "trajectories": bad})
    with pytest.raises(ValueError, match="trajectory 0 has 5 pmass values for 4 forks"):
        load_trajectories({"fork_points": FORKS[:4], "trajectories": records()[:1]})
    short = records()[:1]
    short[0]["gen_len"] = 15
    with pytest.raises(ValueError, match="trajectory 0 has 16 kl values but gen_len=15"):
        load_trajectories({"fork_points": FORKS, "trajectories": short})
