"""What a steer → heal run keeps on disk, and how it is resumed.

    out_dir/
      state.json            config, one metrics dict per finished round, and the stop reason (if any)
      events.jsonl          one JSON object per event: dose attempts, finished rounds, the stop
      tb/                   TensorBoard: rounds/* scalars (step = round) and each round's heal fit
      round_NN/             samples.jsonl (every sampled completion with its filter scores),
                            train.jsonl (the kept rows), vector.safetensors, adapter/ (peft),
                            greedy.json (greedy answers to the fixed prompts), metrics.json
      trajectory.png, report.md

A round is finished when its metrics are in ``state.json`` (written atomically, last). Resuming stacks
the adapters of the finished rounds on the original model, in order (``heal_pl.rounds.stack.load_stack``), and
starts at the next round.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STATE_FILE = "state.json"
# the arguments a resumed run may change: where the run is, whether to resume, how far to go
RESUMABLE = frozenset({"out_dir", "resume", "rounds", "progress", "device"})  # a run may continue on other hardware


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as JSON atomically (a temporary sibling renamed into place)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str), encoding="utf-8")
    os.replace(tmp, path)


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, default=str) + "\n")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def round_dir(out: Path, r: int) -> Path:
    return out / f"round_{r:02d}"


@dataclass
class RoundsState:
    """``config`` of the run, ``finished`` (one metrics dict per finished round, in order), ``stopped``."""

    out: Path
    config: dict[str, Any]
    finished: list[dict[str, Any]] = field(default_factory=list)
    stopped: dict[str, Any] | None = None

    @property
    def next_round(self) -> int:
        return len(self.finished)

    def adapter_dirs(self) -> list[Path]:
        """The adapters of the finished rounds, in order (the student's stack)."""
        return [round_dir(self.out, r) / "adapter" for r in range(self.next_round)]

    def save(self) -> None:
        write_json(self.out / STATE_FILE, {"config": self.config, "finished": self.finished, "stopped": self.stopped})

    def event(self, kind: str, **data: Any) -> None:
        with (self.out / "events.jsonl").open("a", encoding="utf-8") as f:
            f.write(json.dumps({"event": kind, **data}, default=str) + "\n")

    @classmethod
    def open(cls, out: Path, config: dict[str, Any], resume: bool) -> RoundsState:
        """A new state, or the saved one when ``resume`` (its config must match except :data:`RESUMABLE`).

        Raises:
            ValueError: ``out_dir`` holds a run and ``resume`` is false, or the saved config differs.
        """
        path = out / STATE_FILE
        if not path.is_file():
            out.mkdir(parents=True, exist_ok=True)
            return cls(out, config)
        if not resume:
            raise ValueError(f"out_dir={os.fspath(out)!r} already holds a run (state.json); pass resume: true to "
                             "continue it or choose another out_dir")  # fmt: skip
        saved = json.loads(path.read_text(encoding="utf-8"))
        old = {k: v for k, v in saved["config"].items() if k not in RESUMABLE}
        new = {k: v for k, v in json.loads(json.dumps(config, default=str)).items() if k not in RESUMABLE}
        changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
        if changed:
            raise ValueError(f"resume: the config differs from the saved run in {', '.join(changed)}; only "
                             f"{', '.join(sorted(RESUMABLE))} may change")  # fmt: skip
        return cls(out, config, saved["finished"], saved.get("stopped"))
