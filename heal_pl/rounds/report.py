"""The trajectory figure and the markdown report of steer → heal runs (docs/maths.md §4.7, §5.4).

Figure: top, the trait (mean log probability of the trait's answer given an answer, nats) per round at
each stage — base (the round's start), steered (at the chosen dose), healed (after the heal fit); bottom,
``1 − coherence`` on a log axis for the same stages, with the floor ``1 − coh_floor`` dotted. Several runs
(e.g. an rmse and a mean barrier) share the axes, one colour per run.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

STAGES = ("base", "steered", "healed")
STYLES = {"base": ":", "steered": "--", "healed": "-"}
MARKERS = {"base": "o", "steered": "^", "healed": "s"}


def _series(rows: Sequence[Mapping[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
    x = np.array([row["round"] for row in rows if key in row], dtype=np.float64)
    y = np.array([row[key] for row in rows if key in row], dtype=np.float64)
    return x, y


def trajectory_figure(runs: Mapping[str, Sequence[Mapping[str, Any]]], coh_floor: float | None = None,
                      title: str = "") -> Figure:  # fmt: skip
    """Trait and ``1 − coherence`` per round and stage; ``runs`` maps a label to its per-round metrics
    (``round``, ``trait_<stage>``, ``coherence_<stage>``). Lines: per run, per stage, trait then coherence
    (``axes[0].lines`` and ``axes[1].lines`` in that order), the floor last on the lower axis."""
    if not runs:
        raise ValueError("runs must hold at least one labelled list of round metrics")
    fig = Figure(figsize=(7.5, 6.0))
    FigureCanvasAgg(fig)
    ax_t, ax_c = fig.subplots(2, 1, sharex=True)
    colours = [f"C{i}" for i in range(10)]
    for i, (label, rows) in enumerate(runs.items()):
        for stage in STAGES:
            kw = {"color": colours[i % 10], "ls": STYLES[stage], "marker": MARKERS[stage], "ms": 4}
            ax_t.plot(*_series(rows, f"trait_{stage}"), label=f"{label} {stage}", **kw)
            x, c = _series(rows, f"coherence_{stage}")
            ax_c.plot(x, np.clip(1.0 - c, 1e-6, None), **kw)
    if coh_floor is not None:
        ax_c.axhline(max(1.0 - coh_floor, 1e-6), color="gray", ls=":", lw=1.2, label=f"floor (coh {coh_floor:g})")
        ax_c.legend(loc="upper left", fontsize="small")
    ax_c.set_yscale("log")
    ax_t.set_ylabel("trait: mean log p(trait answer) [nats]")
    ax_c.set_ylabel("1 − coherence (log)")
    ax_c.set_xlabel("round")
    ax_c.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_t.legend(fontsize="x-small", ncol=max(1, len(runs)), loc="best")
    if title:
        ax_t.set_title(title)
    fig.tight_layout()
    return fig


def _fmt(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return str(v)
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.3e}"
    return str(v)


COLUMNS = ("round", "kappa", "coeff", "kept", "sampled", "trait_base", "trait_steered", "trait_healed",
           "coherence_base", "coherence_steered", "coherence_healed")  # fmt: skip


def rounds_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] = COLUMNS) -> str:
    """A markdown table, one row per round (missing values empty)."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def markdown_report(rows: Sequence[Mapping[str, Any]], samples: Mapping[int, Sequence[Mapping[str, Any]]],
                    figure: str | Path | None = None, stopped: Mapping[str, Any] | None = None,
                    n_show: int = 2) -> str:  # fmt: skip
    """The per-round table, the figure link, the stop reason and ``n_show`` kept and dropped chosen-dose
    completions per round (``samples[r]`` are the rows of ``round_NN/samples.jsonl``)."""
    out = ["# steer → heal rounds", "", rounds_table(rows), ""]
    if figure is not None:
        out += [f"![trajectory]({Path(figure).name})", ""]
    if stopped:
        out += [f"**Stopped** at round {stopped['round']}: {stopped['reason']}", ""]
    for r, rs in sorted(samples.items()):
        chosen = [s for s in rs if s.get("chosen")]
        out.append(f"## round {r} samples")
        for keep in (True, False):
            for s in [s for s in chosen if s["keep"] is keep][:n_show]:
                verdict = "kept" if keep else "dropped (" + ", ".join(s["reasons"]) + ")"
                text = s["text"].replace("\n", " ")[:300]
                out.append(f"- **{verdict}**, ppl {s['ppl']:.3g}, rep {s['rep']:.2f} — *{s['prompt']}* → {text}")
        out.append("")
    return "\n".join(out)
