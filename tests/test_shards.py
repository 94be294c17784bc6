"""heal_pl.shards: the steering commands on 2 CPU processes (gloo, as ``torchrun --nproc_per_node 2`` starts them)
give the tables of one process, rank 0 alone writes, and a job with more processes than prompts is refused."""

from __future__ import annotations

import json
import os
import socket
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from heal_pl import shards
from heal_pl.cli import main
from tests.survival.test_run import CALIB, CONFIG, TINY

CALIBRATE = ["calibrate", "--config", "calibrate", "--model", "tiny-llama", "--n_fit", "3", "--n_calib", "5",
             "--n_audit", "3", "--max_new_tokens", "6", "--max_iters", "3", "--batch_size", "2"]  # fmt: skip
# 5 evaluation prompts in batches of 2: [0, 1] on rank 0, [2, 3], [4] on rank 1 (the batches of one process)
SURVIVAL = ["survival", "--config", str(CONFIG), *TINY, "--signs", "[1]", "--calibration", CALIB]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(rank: int, port: int, argv: list[str], report: str) -> None:
    """One process of a 2-process job, with the environment torchrun gives it."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank),
                      LOCAL_RANK=str(rank))  # fmt: skip
    torch.set_num_threads(1)
    outcome = "ok"
    try:
        main(argv)
    except SystemExit as done:  # heal's one-line error: exit 2
        outcome = f"exit {done.code}"
    except Exception:  # noqa: BLE001 (reported to the test)
        outcome = traceback.format_exc()
    finally:
        Path(report, f"rank{rank}.txt").write_text(outcome)
        if dist.is_initialized():
            dist.destroy_process_group()


def run_job(argv: list[str], tmp: Path) -> list[str]:
    tmp.mkdir(parents=True, exist_ok=True)
    mp.spawn(worker, args=(free_port(), argv, str(tmp)), nprocs=2, join=True)
    return [(tmp / f"rank{r}.txt").read_text() for r in (0, 1)]


def test_outside_a_job_nothing_is_sharded() -> None:
    shards.init()  # no WORLD_SIZE: a no-op
    assert not dist.is_initialized() and shards.world_size() == 1 and shards.is_writer()
    with shards.sharded():
        assert not shards.active() and shards.block(3) == range(3) and shards.gather([1, 2]) == [1, 2]


@pytest.mark.slow  # 2 processes (~15 s)
def test_more_processes_than_prompts_is_refused_on_every_rank(tmp_path: Path) -> None:
    argv = [*CALIBRATE, "--n_calib", "1", "--max_iters", "1", "--out_dir", str(tmp_path / "out")]
    assert run_job(argv, tmp_path / "job") == ["exit 2", "exit 2"]
    assert not (tmp_path / "out" / "calib.json").exists()


@pytest.mark.slow  # 2 processes, twice, + 1 (~60 s)
def written(folder: Path) -> list[str]:
    """The files of a run (its calibration's included), TensorBoard's counted as one name each."""
    def name(p: Path) -> str:
        return "events" if p.name.startswith("events.out.tfevents.") else p.name

    return sorted(str(p.parent.relative_to(folder) / name(p)) for p in folder.rglob("*") if p.is_file())


def test_two_processes_give_the_survival_table_of_one_and_resume_only_what_is_missing(tmp_path: Path) -> None:
    main([*SURVIVAL, "--out_dir", str(tmp_path / "one")])
    two = tmp_path / "two"
    assert run_job([*SURVIVAL, "--out_dir", str(two)], tmp_path / "job") == ["ok", "ok"]

    def read(d: Path) -> tuple[list[dict], list[dict]]:
        return (json.loads((d / "summary.json").read_text())["table"],
                json.loads((d / "trajectories.json").read_text())["trajectories"])  # fmt: skip

    one, two_calib = (json.loads((d / "calibrate" / "calib.json").read_text())["results"]
                      for d in (tmp_path / "one", two))  # fmt: skip
    for sign in one:  # the calibration ran sharded too: the pooled statistics of all its prompts
        a, b = one[sign], two_calib[sign]
        assert a["evaluations"] == b["evaluations"] and a["converged"] == b["converged"]
        assert b["c_star"] == pytest.approx(a["c_star"], rel=1e-5)
        for ha, hb in zip(a["history"], b["history"], strict=True):
            assert {k: hb[k] for k in ("c", "mean", "p95", "max")} == pytest.approx(
                {k: ha[k] for k in ("c", "mean", "p95", "max")}, rel=1e-4)  # fmt: skip
    assert written(two) == written(tmp_path / "one"), "one writer, the same files"
    (table_1, trs_1), (table_2, trs_2) = read(tmp_path / "one"), read(two)
    assert [(r["label"], r["n"], r["died"]) for r in table_2] == [(r["label"], r["n"], r["died"]) for r in table_1]
    assert [r["kl_p95"] for r in table_2] == pytest.approx([r["kl_p95"] for r in table_1], rel=1e-4)
    assert len(trs_2) == len(trs_1) == 3 * 5
    for a, b in zip(trs_1, trs_2, strict=True):  # every prompt once, in prompt order
        assert (b["label"], b["prompt_index"], b["tokens"]) == (a["label"], a["prompt_index"], a["tokens"])
        assert b["pmass"] == pytest.approx(a["pmass"], rel=1e-4, nan_ok=True)
    # a kill after two of the three α: the rerun measures the third alone, and the tables come out the same
    journal = two / "journal"
    kept = {p.name: p.stat().st_mtime_ns for p in journal.glob("alpha_*.json") if p.name != "alpha_plus_4.json"}
    assert len(kept) == 2
    (journal / "alpha_plus_4.json").unlink()
    (two / "summary.json").unlink()
    assert run_job([*SURVIVAL, "--out_dir", str(two)], tmp_path / "rerun") == ["ok", "ok"]
    assert {p.name: p.stat().st_mtime_ns for p in journal.glob("alpha_*.json") if p.name in kept} == kept
    assert read(two) == (table_2, trs_2)
