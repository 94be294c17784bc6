"""heal_pl.configs: every bundled config by name, from any folder; copies for editing; the wheel carries them."""

from __future__ import annotations

import importlib.metadata
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from heal_pl.cli import DESCRIPTIONS, main
from heal_pl.configs import (
    FOLDER,
    bundled_configs,
    copy_config,
    resolve_config,
    resolve_config_args,
)
from heal_pl.data.formats import ASSETS, bundled_file, read_examples

ROOT = Path(__file__).resolve().parents[2]


def test_every_yaml_is_bundled_by_its_name_and_says_how_to_run_it() -> None:
    configs = bundled_configs()
    files = {p.relative_to(FOLDER).with_suffix("").as_posix() for p in FOLDER.rglob("*.yaml")}
    assert set(configs) == files and {"rmse", "gpu/fsdp", "survival", "rounds_rmse"} <= files
    for name, config in configs.items():
        text = config.path.read_text(encoding="utf-8")
        usage = [line.split() for line in text.splitlines() if line.startswith("#   heal ")]
        assert ["#", "heal", config.command, "--config", name] in [u[:5] for u in usage], f"{name}: no usage line"
        assert config.command in DESCRIPTIONS and config.summary, name
        assert ("trainer" in yaml.safe_load(text)) == (config.command == "fit"), name


def test_a_name_resolves_to_its_file_and_an_existing_file_wins(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert resolve_config("rmse") == resolve_config("rmse.yaml") == str(FOLDER / "rmse.yaml")
    assert resolve_config("gpu/fsdp") == str(FOLDER / "gpu" / "fsdp.yaml")
    (tmp_path / "rmse.yaml").write_text("seed_everything: 1\n")  # a copy being edited, in the current folder
    assert resolve_config("rmse.yaml") == "rmse.yaml" and resolve_config("rmse") == str(FOLDER / "rmse.yaml")
    assert resolve_config("{trainer: {max_steps: 1}}") == "{trainer: {max_steps: 1}}"  # inline YAML: jsonargparse's
    args = ["fit", "--config", "rmse", "--config=mean", "--trainer.max_steps", "rmse"]
    assert resolve_config_args(args) == [
        "fit", "--config", str(FOLDER / "rmse.yaml"), f"--config={FOLDER / 'mean.yaml'}", "--trainer.max_steps", "rmse",
    ]  # fmt: skip


def test_an_unknown_name_lists_the_bundled_ones(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ValueError, match=r"'rmsee' is neither an existing file nor a bundled config; .*rmse"):
        resolve_config("rmsee")
    with pytest.raises(SystemExit) as exit_info:
        main(["survival", "--config", "surviva"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1
    assert err.startswith("heal survival: error: --config 'surviva' is neither") and "gpu/fsdp" in err


def test_copy_writes_the_bundled_file_and_never_overwrites_unasked(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    written = copy_config("rmse")
    assert written == Path("rmse.yaml") and written.read_bytes() == (FOLDER / "rmse.yaml").read_bytes()
    written.write_text("# edited\n")
    with pytest.raises(ValueError, match=r"rmse.yaml exists; pass --overwrite true"):
        copy_config("rmse")
    assert written.read_text() == "# edited\n", "a refused copy must leave the file alone"
    copy_config("rmse", overwrite=True)
    assert written.read_bytes() == (FOLDER / "rmse.yaml").read_bytes()
    assert copy_config("gpu/fsdp", to="recipes/") == Path("recipes/fsdp.yaml")
    assert copy_config("mean", to="recipes") == Path("recipes/mean.yaml")  # an existing folder
    assert copy_config("nll", to="mine.yaml").read_bytes() == (FOLDER / "nll.yaml").read_bytes()
    with pytest.raises(ValueError, match=r"--copy 'rmsee' is not a bundled config; the bundled ones: calibrate"):
        copy_config("rmsee")


def test_heal_configs_lists_every_config_and_copies_one(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    main(["configs"])
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines()[1:] if line.strip()][:-1]
    assert listed == list(bundled_configs())
    main(["configs", "--copy", "survival"])
    assert "heal survival --config survival.yaml" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main(["configs", "--copy", "survival"])
    assert exit_info.value.code == 2 and "survival.yaml exists" in capsys.readouterr().err


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    import heal_pl

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out == f"heal_pl {importlib.metadata.version('heal_pl')}\n"
    assert heal_pl.__version__ == importlib.metadata.version("heal_pl")


def test_a_bundled_data_file_is_read_by_name_from_any_folder(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert bundled_file("hack_train.jsonl") == str(ASSETS / "hack_train.jsonl")
    assert read_examples("hack_train.jsonl") == read_examples(ASSETS / "hack_train.jsonl")
    assert bundled_file("data/hack_train.jsonl") == "data/hack_train.jsonl"  # a path with a folder is never bundled
    (tmp_path / "hack_train.jsonl").write_text('{"prompt": "p", "completion": "c"}\n')
    assert bundled_file("hack_train.jsonl") == "hack_train.jsonl"  # a file in the current folder wins
    assert len(read_examples("hack_train.jsonl")) == 1


@pytest.mark.slow  # builds the wheel (~10 s)
def test_the_wheel_carries_every_config_and_data_file(tmp_path: Path) -> None:
    source = tmp_path / "source"  # a copy: building in the repository would leave build/ and egg-info behind
    shutil.copytree(ROOT / "heal_pl", source / "heal_pl", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(source)], check=True, timeout=300, capture_output=True)  # fmt: skip
    (wheel,) = tmp_path.glob("heal_pl-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    package = ROOT / "heal_pl"
    for folder in (FOLDER, ASSETS):
        for path in folder.rglob("*"):
            if path.is_file() and "__pycache__" not in path.parts:
                assert path.relative_to(ROOT).as_posix() in names, f"the wheel lacks {path.relative_to(package)}"
    assert wheel.name.startswith(f"heal_pl-{importlib.metadata.version('heal_pl')}-")
