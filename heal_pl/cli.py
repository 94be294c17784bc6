"""The ``heal`` command: ``heal fit|validate|test --config rmse`` (LightningCLI), and
``heal calibrate|survival|thresholds|compare|rounds|tau`` (jsonargparse, from each command's typed function).

``heal`` or ``heal --help`` lists every command with one line each (:data:`DESCRIPTIONS`);
``heal <command> --help`` gives that command's options; ``heal --version`` the version. ``--config`` takes a file or
the name of a bundled config (``--config rmse``; :mod:`heal_pl.configs`, listed by ``heal configs``).
``main(args)`` takes the argument list, so tests call ``main(["fit", "--config", path, ...])`` in-process.
``model.model`` is linked to ``data.model``: the data module tokenizes with the model's own tokenizer and cannot be
pointed at another one by mistake.

Progress: on a terminal, Lightning's bar. When stdout is not a terminal (a file, a job scheduler) the bar
is off by default and :class:`heal_pl.callbacks.ProgressLog` writes a line every ``progress.every_n_steps``
steps (``--progress.every_n_steps 50``, ``--progress.when always|never``); the other commands' bars become log
lines the same way (:mod:`heal_pl.progress`). heal_pl's log lines go to stdout.

Errors: a bad input (:func:`user_error`: a value the parser refuses, a missing file, heal_pl's own ``ValueError``)
prints one line on stderr, ``heal <command>: error: <message>``, and exits with status 2; ``--debug`` (taken by
every command, removed before parsing) or ``HEAL_DEBUG=1`` raises it with its traceback instead. Any other error,
a ``ValueError`` raised inside torch, transformers, ... included, keeps its traceback.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import os
import re
import sys
import sysconfig
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from jsonargparse import CLI, ActionConfigFile, ArgumentError, ArgumentParser
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from heal_pl import __version__
from heal_pl.callbacks.progress_log import ProgressLog
from heal_pl.configs import resolve_config_args
from heal_pl.data.datamodule import HealDataModule
from heal_pl.journal import config_changes
from heal_pl.module import HealModule
from heal_pl.progress import interactive


class HealCLI(LightningCLI):
    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """fit, validate and test: ``HealModule`` has no ``predict_step`` and ``HealDataModule`` no predict data."""
        return {k: v for k, v in LightningCLI.subcommands().items() if k in LIGHTNING_COMMANDS}

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("model.model", "data.model")
        parser.add_lightning_class_args(ProgressLog, "progress")

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Parse, then refuse a ``--ckpt_path`` whose model settings differ from the config's: LightningCLI (≥ 2.5.5)
        would silently replace the config's values by the checkpoint's (a checkpoint of another model, another LoRA
        rank, ...). Checked here, before that replacement, on every Lightning version."""
        with warnings.catch_warnings():  # main() always passes the argument list (``--debug`` taken out of it)
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
            super().parse_arguments(parser, args)
        sub = self.config.get("subcommand")
        ckpt_path = self.config[sub].get("ckpt_path") if sub else None
        if ckpt_path and Path(ckpt_path).is_file():
            saved = torch.load(ckpt_path, weights_only=True, map_location="cpu").get("hyper_parameters", {})
            ours = self.config[sub]["model"].as_dict()
            common = [k for k in ours if k in saved]
            changes = config_changes(_flat({k: saved[k] for k in common}), _flat({k: ours[k] for k in common}))
            if changes:
                raise ValueError(f"ckpt_path={str(ckpt_path)!r} was written with other model settings: "
                                 + "; ".join(f"model.{c}" for c in changes)
                                 + ". Resume with the checkpoint's settings, or start a new run without ckpt_path")


def configure_logging() -> None:
    """heal_pl's INFO lines to stdout, where ``heal ... > log.txt`` sends them."""
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", stream=sys.stdout)


def _flat(d: dict[str, Any]) -> dict[str, Any]:
    """One level of nesting as dotted keys: ``{"lora": {"r": 4}}`` -> ``{"lora.r": 4}``."""
    return {f"{k}.{kk}" if isinstance(v, dict) else k: vv
            for k, v in d.items() for kk, vv in (v.items() if isinstance(v, dict) else [(None, v)])}  # fmt: skip


def build_cli(args: list[str] | None = None) -> HealCLI:
    """Parse ``args`` (default: ``sys.argv``), build model, data and trainer, run the subcommand."""
    configure_logging()
    return HealCLI(
        HealModule,
        HealDataModule,
        save_config_kwargs={"overwrite": True},
        trainer_defaults={"enable_progress_bar": interactive(sys.stdout)},  # off in files: ProgressLog writes lines
        args=args,
        parser_kwargs={"default_env": False, "prog": "heal", "exit_on_error": False},  # main() reports ArgumentError
    )


LIGHTNING_COMMANDS = ("fit", "validate", "test")  # parsed by LightningCLI (HealCLI)
COMMANDS = {  # parsed by jsonargparse from the function's signature: its arguments are the YAML keys and the flags
    "calibrate": "heal_pl.steering.run:run_calibration",
    "survival": "heal_pl.survival.run:run_survival",
    "thresholds": "heal_pl.survival.thresholds:run_thresholds",
    "compare": "heal_pl.survival.compare:run_compare",
    "rounds": "heal_pl.rounds.run:run_rounds",
    "configs": "heal_pl.configs:run_configs",
    "tau": "heal_pl.barrier.run:run_tau",
}
DESCRIPTIONS = {  # one line per command, for `heal --help`
    "fit": "train a LoRA student with SFT + the KL barrier (HealModule on HealDataModule)",
    "validate": "one validation pass: SFT loss and the pooled per-token KL to the base",
    "test": "one pass over the test data, the same metrics as validate",
    "calibrate": "iso-KL calibration: the steering dose c* per sign at which the KL to the base hits a budget",
    "survival": "calibrate, then survival of the answer format over steered rollouts (Kaplan-Meier)",
    "thresholds": "a saved survival run's table at other pmass thresholds (no model needed)",
    "compare": "several steering methods at the same KL dose, beside a system-prompt baseline",
    "rounds": "steer -> heal rounds: sample under steering, filter, heal with the barrier, stack, repeat",
    "configs": "list the bundled configs; --copy NAME writes one into the current folder for editing",
    "tau": "a tau per aggregate: m × a barrier-free run's last-quarter train/kl_<agg> (--config runs one first)",
}


def usage() -> str:
    """The text of ``heal --help``: every command with its one-line description."""
    width = max(map(len, DESCRIPTIONS))
    lines = ["usage: heal <command> [options]   (heal <command> --help: that command's options)", "", "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, text in DESCRIPTIONS.items()]
    lines += ["", "Options come from a YAML file (--config FILE, or the name of a bundled config: heal configs)",
              "and/or flags (--trainer.max_steps 10); --print_config prints the resolved configuration. Examples:",
              "  heal fit --config rmse",
              "  heal calibrate --config calibrate --model tiny-llama",
              "", "A bad input prints one line, `heal <command>: error: <message>`, and exits with status 2;",
              "--debug (after any command) or the environment variable HEAL_DEBUG=1 shows the traceback.",
              "heal --version prints the version of heal_pl."]  # fmt: skip
    return "\n".join(lines)


def run_command(name: str, function: Callable[..., Any], argv: list[str]) -> Any:
    """``heal <name> ...``: parse ``argv`` and call ``function``.

    A function made by :func:`heal_pl.checks.command` takes the fields of one arguments dataclass
    (``function.args_type``, e.g. :class:`heal_pl.steering.args.CalibrateArgs`): the parser is built from that class
    at the top level, so the flags and YAML keys are the bare field names (``--stat``, never ``--args.stat``),
    whichever groups the class inherits them from; the function then builds and checks it (one ``ValueError``
    naming every bad field). Any other function is read from its signature (jsonargparse ``CLI``), except one with
    a ``config`` argument of its own (``heal tau --config rmse``: a ``heal fit`` config to run), which jsonargparse's
    ``CLI`` would take for its config-file option: its parser is built here, ``--print_config`` included."""
    args_type = getattr(function, "args_type", None)
    summary = (inspect.getdoc(function) or "").split("\n\n")[0]
    if args_type is None and "config" in inspect.signature(function).parameters:
        parser = ArgumentParser(prog=f"heal {name}", description=summary, default_env=False, exit_on_error=False)
        parser.add_function_arguments(function, as_group=False, fail_untyped=True, sub_configs=True)
        values = parser.parse_args([a for a in argv if a != "--print_config"])
        if "--print_config" in argv:
            print(parser.dump(values), end="")
            raise SystemExit(0)
        return function(**values.as_dict())
    if args_type is None:
        return CLI(function, args=argv, as_positional=False, prog=f"heal {name}", exit_on_error=False)
    parser = ArgumentParser(prog=f"heal {name}", description=summary, default_env=False, exit_on_error=False)
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_class_arguments(args_type, fail_untyped=True, sub_configs=True)  # no nested_key: flat
    values = parser.parse_args(argv).as_dict()
    return function(**{k: v for k, v in values.items() if k not in ("config", "__path__")})


HEAL_PL = Path(__file__).resolve().parent
_STDLIB = Path(sysconfig.get_paths()["stdlib"]).resolve()
_SITE = {Path(sysconfig.get_paths()[k]).resolve() for k in ("purelib", "platlib")}


def _in_stdlib(filename: str) -> bool:
    """Whether a frame of ``filename`` is Python's own (``<frozen os>``, ``.../lib/python3.11/json/decoder.py``)."""
    path = Path(filename).resolve()
    return filename.startswith("<") or (path.is_relative_to(_STDLIB) and not any(map(path.is_relative_to, _SITE)))


def user_error(error: BaseException) -> bool:
    """Whether ``error`` is a bad input, told in one line by :func:`main`: the parser's ``ArgumentError`` (an unknown
    option, a value of the wrong type); a ``FileNotFoundError``, wherever the missing path was opened (a data file,
    ``--ckpt_path``); a ``ValueError`` whose innermost frame outside Python's standard library is heal_pl's (its
    checks). A ``ValueError`` raised inside torch, transformers, ... is not: it keeps its traceback."""
    if isinstance(error, ArgumentError | FileNotFoundError):
        return True
    if not isinstance(error, ValueError):
        return False
    files = [frame.f_code.co_filename for frame, _ in traceback.walk_tb(error.__traceback__)]
    raiser = next((f for f in reversed(files) if not _in_stdlib(f)), None)
    return raiser is not None and Path(raiser).resolve().is_relative_to(HEAL_PL)


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``heal`` console script: fit/validate/test (LightningCLI) or a command of ``COMMANDS``.

    ``heal`` alone prints :func:`usage` and exits with status 2; ``heal --help`` prints it and exits 0; an unknown
    command exits 2 naming the known ones; a bad input (:func:`user_error`) prints ``heal <command>: error: ...``
    and exits 2, unless ``--debug`` is among ``args`` or ``HEAL_DEBUG=1``: then it raises with its traceback."""
    argv = sys.argv[1:] if args is None else list(args)
    debug = "--debug" in argv or os.environ.get("HEAL_DEBUG") == "1"
    argv = [a for a in argv if a != "--debug"]
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        raise SystemExit(0 if argv else 2)
    if argv[0] == "--version":
        print(f"heal_pl {__version__}")
        raise SystemExit(0)
    if not argv[0].startswith("-") and argv[0] not in DESCRIPTIONS:
        print(f"heal: unknown command {argv[0]!r}; choose one of {', '.join(DESCRIPTIONS)} (heal --help)",
              file=sys.stderr)
        raise SystemExit(2)
    try:
        argv = [argv[0], *resolve_config_args(argv[1:])]  # a bundled config's name -> its file
        if argv[0] in COMMANDS:
            configure_logging()
            module, name = COMMANDS[argv[0]].split(":")
            run_command(argv[0], getattr(importlib.import_module(module), name), argv[1:])
        else:
            build_cli(argv)
    except (ArgumentError, ValueError, FileNotFoundError) as error:
        if debug or not user_error(error):
            raise
        prog = "heal" if argv[0].startswith("-") else f"heal {argv[0]}"
        message = re.sub(r"\s*\n\s*", " ", str(error).strip()).removeprefix(f"{prog}: ")  # one line; prog said once
        tip = f" ({prog} --help lists the options)" if isinstance(error, ArgumentError) else ""
        print(f"{prog}: error: {message}{tip}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
