"""The ``heal`` CLI: every bundled config runs (tiny model swapped in) from any folder, bad values name the field."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from heal_pl.adapters.card import read_card
from heal_pl.cli import build_cli, main
from heal_pl.configs import FOLDER

ALL_CONFIGS = sorted(FOLDER.glob("*.yaml"))  # the bundled configs (gpu/: tests/test_fsdp_config.py)
CONFIGS = [p for p in ALL_CONFIGS if "trainer" in yaml.safe_load(p.read_text())]  # `heal fit` configs
TINY = ["--model.model", "tiny-llama", "--data.batch_size", "2", "--data.max_length", "48"]


def test_there_are_configs() -> None:
    assert {p.stem for p in CONFIGS} >= {"rmse", "mean", "p95", "max", "nll"}


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_every_config_fits_with_a_tiny_model(config: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # outside the repository: bundled data files resolve by name from any folder
    args = [
        "fit", "--config", str(config), *TINY,
        "--trainer.max_steps", "2", "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "2",
        "--trainer.logger.init_args.save_dir", str(tmp_path), "--trainer.enable_progress_bar", "false",
    ]  # fmt: skip
    cli = build_cli(args)
    spec = yaml.safe_load(config.read_text())
    assert cli.model.barrier.agg == spec["model"]["barrier"].get("agg", "rmse")
    assert cli.model.barrier.reg == spec["model"]["barrier"]["reg"]
    assert cli.trainer.global_step == 2
    log_dir = Path(cli.trainer.log_dir)
    events = EventAccumulator(str(log_dir))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/sft", "val/sft"} <= tags
    if spec["model"]["barrier"]["reg"] != "nll":
        assert {"train/barrier", "train/barrier_fired", "train/kl_p95", "val/kl_rmse", "val/kl_max"} <= tags
    routed = spec["model"].get("adapter") == "routed"
    assert (log_dir / "adapter" / ("routed.safetensors" if routed else "adapter_config.json")).is_file()
    card = read_card(log_dir / "adapter")  # heal_pl.json: the barrier and the final validation KL
    assert card["barrier"]["agg"] == cli.model.barrier.agg and card["final_validation"]["step"] == 2
    if routed:  # the routing configs: routing metrics every step, the kept-vs-ablated table at the end
        assert {"route/cin", "route/cout", "route/fired", "route/kept_hack", "route/ablated_solve"} <= tags
        assert (log_dir / "route_ablate.csv").is_file()
    assert (log_dir / "config.yaml").is_file()


def test_bad_yaml_value_names_the_field_and_choices(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(CONFIGS[0]), "--model.barrier.agg", "median"])
    err = capsys.readouterr().err
    assert "agg" in err and "median" in err and "rmse" in err


def test_unknown_model_alias_names_the_allowed_aliases(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["fit", "--config", str(CONFIGS[0]), "--model.model", "smollm3-nope", "--trainer.max_steps", "1"])
    assert done.value.code == 2
    assert re.search(r"^heal fit: error: model='smollm3-nope' is not a known alias \(allowed: smollm2-135m-instruct",
                     capsys.readouterr().err, re.M)  # fmt: skip


@pytest.mark.slow  # a subprocess (~15 s)
def test_console_script_prints_a_bundled_config_by_name(tmp_path: Path) -> None:
    heal = Path(sys.executable).with_name("heal")
    out = subprocess.run(
        [str(heal), "fit", "--config", "rmse", "--print_config"],
        cwd=tmp_path, capture_output=True, text=True, check=True, timeout=120,
    )  # fmt: skip
    printed = yaml.safe_load(out.stdout)
    assert printed["model"]["barrier"] == {
        "reg": "kl_rev", "agg": "rmse", "tau": 1.0, "lam": 1.0, "lam_round_pow": 0.0, "eps": 1e-8,
    }  # fmt: skip
    assert printed["model"]["model"] == "smollm2-135m-instruct"
    assert "model" not in printed["data"], "data.model is linked to model.model, not set on its own"


# configs that are not `heal fit` configs, each run by its own test (tiny model swapped in)
OTHER_CONFIGS = {
    "calibrate": "tests/test_cli.py",
    "calibrate_adapter": "tests/test_cli.py",
    "survival": "tests/survival/test_run.py",
    "compare": "tests/survival/test_compare.py",
    "rounds_rmse": "tests/rounds/test_run.py",
    "rounds_mean": "tests/rounds/test_run.py",
}


def test_every_config_is_a_fit_config_or_has_its_own_test() -> None:
    other = {p.stem for p in ALL_CONFIGS} - {p.stem for p in CONFIGS}
    assert other <= set(OTHER_CONFIGS), "a new kind of config needs its own test (add it to OTHER_CONFIGS)"


def test_calibrate_config_runs_with_a_tiny_model(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    import csv
    import json

    caplog.set_level("INFO", logger="heal_pl")
    config = next(p for p in ALL_CONFIGS if p.stem == "calibrate")
    main([
        "calibrate", "--config", str(config), "--model", "tiny-llama", "--out_dir", str(tmp_path),
        "--n_fit", "3", "--n_calib", "2", "--n_audit", "2", "--max_new_tokens", "6", "--max_iters", "3",
    ])  # fmt: skip
    results = json.loads((tmp_path / "calib.json").read_text())["results"]
    assert set(results) == {"+", "-"}
    with open(tmp_path / "history.csv") as f:
        history = list(csv.DictReader(f))
    for sign, r in results.items():
        rows = [h for h in history if h["sign"] == sign]
        assert len(rows) == r["evaluations"] == len(r["history"]) <= 3
        assert sum(m.startswith(f"calibrate {sign}: evaluation ") for m in caplog.messages) == r["evaluations"]
        # stderr is no terminal here: the progress is a log line (heal_pl.progress), not tqdm's bar
        assert sum(m.startswith(f"calibrate {sign}: {r['evaluations']}/3 eval · ") for m in caplog.messages) == 1
        assert r["coeff"] == pytest.approx((1 if sign == "+" else -1) * r["c_star"])
    with open(tmp_path / "summary.csv") as f:
        assert len(list(csv.DictReader(f))) == 2
    assert (tmp_path / "audit.csv").is_file() and (tmp_path / "vector.safetensors").is_file()
    assert list(tmp_path.glob("events.out.tfevents.*"))
    assert "calibrate +" not in capsys.readouterr().err


def test_calibrate_adapter_config_runs_with_a_tiny_adapter(tmp_path: Path) -> None:
    import json

    from peft import LoraConfig, get_peft_model

    from heal_pl.models.load import load_model

    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    torch.manual_seed(0)
    get_peft_model(load_model("tiny-llama"), lora).save_pretrained(tmp_path / "adapter")
    config = next(p for p in ALL_CONFIGS if p.stem == "calibrate_adapter")
    main([
        "calibrate", "--config", str(config), "--model", "tiny-llama", "--adapter_dir", str(tmp_path / "adapter"),
        "--out_dir", str(tmp_path / "out"), "--n_calib", "2", "--n_audit", "2", "--max_new_tokens", "6",
        "--max_iters", "3",
    ])  # fmt: skip
    saved = json.loads((tmp_path / "out" / "calib.json").read_text())
    assert saved["config"]["method"] == "adapter"
    assert set(saved["results"]) == {"+"}
    result = saved["results"]["+"]
    assert 1 <= result["evaluations"] == len(result["history"]) <= 3
    lo, hi = yaml.safe_load(config.read_text())["bracket"]
    assert all(lo <= h["c"] <= hi for h in result["history"])
    assert not (tmp_path / "out" / "vector.safetensors").exists(), "an adapter has no vector to save"


def test_calibrate_bad_arguments_name_the_field() -> None:
    from heal_pl.steering.run import run_calibration

    with pytest.raises(ValueError, match="adapter_dir"):
        run_calibration(model="tiny-llama", method="adapter")
    with pytest.raises(ValueError, match="signs"):
        run_calibration(model="tiny-llama", signs=[2])


# --------------------------------------------------------------------------- progress that reaches a log


@pytest.mark.slow  # a subprocess fit (~20 s)
def test_fit_to_a_file_writes_progress_lines(tmp_path: Path) -> None:
    import re

    config = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "max_steps": 4, "val_check_interval": 2, "check_val_every_n_epoch": None,
                    "num_sanity_val_steps": 0, "logger": False, "enable_checkpointing": False,
                    "default_root_dir": str(tmp_path)},  # where config.yaml goes
        "model": {"model": "tiny-llama", "barrier": {"agg": "rmse", "tau": 0.0}, "warmup_steps": 1,
                  "adapter_dir": str(tmp_path / "adapter")},
        "data": {"max_length": 48, "batch_size": 2, "max_examples": 8},
        "progress": {"every_n_steps": 2},
    }  # fmt: skip
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(config))
    with open(tmp_path / "log.txt", "w") as log:  # `python -m heal_pl.cli fit --config tiny.yaml > log.txt`
        done = subprocess.run([sys.executable, "-m", "heal_pl.cli", "fit", "--config", str(tmp_path / "tiny.yaml")],
                              cwd=Path(__file__).resolve().parents[1], stdout=log, stderr=subprocess.PIPE, check=True,
                              timeout=300, text=True)  # fmt: skip
    assert "args parameter" not in done.stderr, "main() passes the argument list: no LightningCLI warning about it"
    text = (tmp_path / "log.txt").read_text()
    number = r"[-+0-9.e]+"
    steps = re.findall(rf"^heal_pl: step (\d)/4 · loss {number} · sft {number} · D {number} · fired (\d+)% · "
                       rf"{number} steps/s · ETA \d+:\d\d:\d\d$", text, flags=re.M)  # fmt: skip
    assert [s for s, _ in steps] == ["2", "4"] and all(f == "100" for _, f in steps)  # tau = 0: every step fires
    vals = re.findall(rf"^heal_pl: validation at step (\d) · sft {number} · kl_mean {number} · kl_rmse {number}"
                      rf" · kl_p95 {number} · kl_max {number}$", text, flags=re.M)  # fmt: skip
    assert vals == ["2", "4"]
    assert "\r" not in text, "no progress bar in a file"
    assert (tmp_path / "config.yaml").is_file()


def test_progress_line_format() -> None:
    from heal_pl.callbacks.progress_log import ProgressLog, progress_line

    line = progress_line(12, 36, {"loss": 2.3141, "sft": 2.1, "D": 0.871, "lr": 1.0}, 5 / 12, 0.5)
    assert line == "step 12/36 · loss 2.314 · sft 2.1 · D 0.871 · fired 42% · 0.5 steps/s · ETA 0:00:48"
    assert progress_line(3, None, {"loss": 1.0}, None, 2.0) == "step 3 · loss 1 · 2 steps/s"
    assert not ProgressLog(when="never").active and ProgressLog(when="always").active
    with pytest.raises(ValueError, match="every_n_steps=0"):
        ProgressLog(every_n_steps=0)
    with pytest.raises(ValueError, match="when"):
        ProgressLog(when="sometimes")


def test_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    """``heal --help`` (exit 0) and ``heal`` alone (exit 2) list every command with its one-line description."""
    from heal_pl.cli import COMMANDS, DESCRIPTIONS, LIGHTNING_COMMANDS

    assert set(DESCRIPTIONS) == set(LIGHTNING_COMMANDS) | set(COMMANDS)
    for args, code in ((["--help"], 0), (["-h"], 0), ([], 2)):
        with pytest.raises(SystemExit) as done:
            main(args)
        assert done.value.code == code
        out = capsys.readouterr().out
        for name, text in DESCRIPTIONS.items():
            assert re.search(rf"^  {name} +{re.escape(text)}$", out, re.M), f"`heal {' '.join(args)}` lacks {name}"
        assert "heal <command>: error: <message>" in out and "--debug" in out and "HEAL_DEBUG=1" in out


@pytest.mark.parametrize("command", ["fit", "validate", "test", "calibrate", "survival", "thresholds", "compare",
                                     "rounds", "tau"])  # fmt: skip
def test_every_command_has_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main([command, "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: heal") and "--config" in out


def test_unknown_command_names_the_commands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["calbrate", "--config", "heal_pl/configs/calibrate.yaml"])
    assert done.value.code == 2
    assert "unknown command 'calbrate'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as done:  # predict is not offered: HealModule has no predict_step
        main(["predict", "--help"])
    assert done.value.code == 2 and "unknown command 'predict'" in capsys.readouterr().err


def test_console_script_help_lists_every_command() -> None:
    from heal_pl.cli import DESCRIPTIONS

    heal = Path(sys.executable).with_name("heal")
    out = subprocess.run([str(heal), "--help"], capture_output=True, text=True, check=True, timeout=120).stdout
    assert all(name in out for name in DESCRIPTIONS)


# --------------------------------------------------------------------------- errors a user reads


def _torch_refuses(batch_size: int = 0) -> None:
    """A ``ValueError`` raised inside torch (not a heal_pl check)."""
    from torch.utils.data import DataLoader

    DataLoader([1, 2], batch_size=batch_size)


def test_user_error_tells_heal_pl_checks_from_library_errors(tmp_path: Path) -> None:
    from heal_pl.checks import check_choice, read_json_object
    from heal_pl.cli import user_error
    from heal_pl.data.formats import jsonl_rows

    def raised(call: Callable[[], object]) -> BaseException:
        with pytest.raises(Exception) as info:
            call()
        return info.value

    (tmp_path / "bad.json").write_text("{")
    assert user_error(raised(lambda: check_choice("agg", "median", ["mean"])))  # raised by heal_pl
    assert user_error(raised(lambda: read_json_object(tmp_path / "bad.json", "calib_json")))
    assert user_error(raised(lambda: list(jsonl_rows(tmp_path / "none.jsonl", ""))))  # FileNotFoundError via pathlib
    assert user_error(raised(lambda: torch.load(tmp_path / "none.ckpt")))  # a missing file, even opened by torch
    assert not user_error(raised(_torch_refuses))  # raised inside torch
    assert not user_error(raised(lambda: int("x")))  # raised here, not in heal_pl
    assert not user_error(raised(lambda: check_choice("agg", "median", None)))  # a TypeError: a bug, not an input
    assert not user_error(ValueError("never raised"))  # no traceback at all


def test_library_errors_keep_their_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    from heal_pl import cli

    monkeypatch.delenv("HEAL_DEBUG", raising=False)
    monkeypatch.setitem(cli.COMMANDS, "thresholds", "tests.test_cli:_torch_refuses")
    with pytest.raises(ValueError, match="batch_size"):
        main(["thresholds", "--batch_size", "0"])


def test_parse_errors_are_one_line_too(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """jsonargparse's own refusals: no usage dump, the message (its indented lines joined) and where to look."""
    monkeypatch.delenv("HEAL_DEBUG", raising=False)
    for args, line in [
        (["fit", "--config", str(CONFIGS[0]), "--model.barrier.agg", "median"],
         r"heal fit: error: Parser key \"model.barrier.agg\": Expected a typing.Literal\['mean', 'rmse', 'p95', "
         r"'max'\]\. Got value: median \(heal fit --help lists the options\)\n"),
        (["thresholds", "--nope", "3"],
         r"heal thresholds: error: (?i:unrecognized) arguments: --nope 3 "
         r"\(heal thresholds --help lists the options\)\n"),
    ]:  # fmt: skip
        with pytest.raises(SystemExit) as done:
            main(args)
        err = capsys.readouterr().err
        assert done.value.code == 2 and re.fullmatch(line, err), err


def test_allow_empty_completions_is_a_data_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["fit", "--config", str(CONFIGS[0]), "--data.allow_empty_completions", "true", "--print_config"])
    assert done.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["data"]["allow_empty_completions"] is True
