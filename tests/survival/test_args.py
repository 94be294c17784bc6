"""The typed arguments of ``heal survival`` / ``heal compare`` (heal_pl.survival.args): flat flags and YAML keys, one
error naming every bad field (the ``calibration`` dict's too), the sweep settings handed on as a plain SweepConfig."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from heal_pl.cli import main
from heal_pl.steering.args import CalibrateArgs
from heal_pl.survival.args import CompareArgs, SurvivalArgs, SweepArgs
from heal_pl.survival.config import SweepConfig

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
COMMANDS = {"calibrate": CalibrateArgs, "survival": SurvivalArgs, "compare": CompareArgs}


def names(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


@pytest.mark.parametrize("command", COMMANDS)
def test_flags_and_yaml_keys_are_the_bare_field_names(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main([command, "--config", str(CONFIGS / f"{command}.yaml"), "--print_config"])
    assert done.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert set(printed) == names(COMMANDS[command])  # flat: no group keys
    config = yaml.safe_load((CONFIGS / f"{command}.yaml").read_text())
    assert {k: printed[k] for k in config} == config  # every YAML value read as written
    with pytest.raises(SystemExit) as done:
        main([command, "--help"])
    text = capsys.readouterr().out
    assert all(f"--{k} " in text or f"--{k}\n" in text for k in names(COMMANDS[command]))


def test_every_field_type_is_checked_by_the_parser(capsys: pytest.CaptureFixture[str]) -> None:
    """The fields come from classes of several modules; each keeps its type (none is left unchecked)."""
    for flag, value in (("--w", "wide"), ("--stat", "p42"), ("--dtype", "half"), ("--n_eval", "some")):
        with pytest.raises(SystemExit):
            main(["survival", "--config", str(CONFIGS / "survival.yaml"), flag, value])
        assert flag[2:] in capsys.readouterr().err


def test_survival_names_every_bad_field_at_once() -> None:
    with pytest.raises(ValueError) as info:
        SurvivalArgs(stat="p42", signs=[1, 1], threshold=1.5, w=0,  # type: ignore[arg-type]
                     calibration={"n_calib": 0, "tol": -1})
    message = str(info.value)
    assert message.startswith("heal survival: ")
    for part in ("stat='p42' is not allowed; choose one of mean", "signs=[1, 1] must hold +1 and/or -1, each once",
                 "threshold=1.5 must be in the open interval (0, 1)", "w=0 must be an integer >= 1",
                 "calibration: n_calib=0 must be >= 1; tol=-1 must be a finite number > 0"):  # fmt: skip
        assert part in message, f"{part!r} is not in {message!r}"


def test_calibration_keys_and_the_fitted_methods() -> None:
    with pytest.raises(ValueError, match=r"calibration keys \['n_foo'\] are not heal calibrate arguments; allowed: "
                                         r"\['batch_size', 'bracket', .*'tol'\]"):  # fmt: skip
        SurvivalArgs(calibration={"n_foo": 3})
    with pytest.raises(ValueError, match=r"calibration: n_fit=0 must be >= 1"):
        CompareArgs(methods=["pca"], calibration={"n_fit": 0})
    assert CompareArgs(methods=["adapter"], adapter_dir="x", calibration={"n_fit": 0}).calibration == {"n_fit": 0}
    assert SurvivalArgs(calib_json="calib.json", calibration={"n_fit": 0}).calib_json == "calib.json"  # not fitted


def test_compare_names_method_and_baseline_problems_with_the_rest() -> None:
    with pytest.raises(ValueError) as info:
        CompareArgs(methods=["pca", "pca", "steer"], system=" ", dtype="half")  # type: ignore[list-item,arg-type]
    message = str(info.value)
    for part in ("heal compare: dtype='half'", "methods item='steer' is not allowed", "names pca more than once",
                 "system=' ' is empty"):
        assert part in message
    assert CompareArgs(calibration={"pos_system": "Be terse."}).baseline_system == "Be terse."
    assert CompareArgs(system="Be kind.").baseline_system == "Be kind."


def test_the_sweep_and_the_calibration_handed_on() -> None:
    args = SurvivalArgs(model="tiny-llama", w=8, fork_step=2, alphas=[0, 1], thresholds=[0.5],
                        calibration={"n_fit": 3}, signs=[-1])  # fmt: skip
    sweep = args.sweep_config()
    assert type(sweep) is SweepConfig and dataclasses.asdict(sweep) == {
        f.name: getattr(args, f.name) for f in dataclasses.fields(SweepConfig)}
    assert sweep.alphas == [0.0, 1.0]  # normalised as SweepConfig does
    kwargs = args.calibrate_kwargs("pca", None, "out/calibrate")
    assert CalibrateArgs(**kwargs).n_fit == 3 and kwargs["signs"] == [-1] and kwargs["method"] == "pca"
    assert names(SweepArgs) <= names(SurvivalArgs) & names(CompareArgs)
