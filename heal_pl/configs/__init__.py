"""The bundled configs: every YAML file of this folder, known by its name (``rmse``, ``gpu/fsdp``).

``--config`` of every command takes a path or a bundled name. An existing file wins (``--config rmse.yaml`` reads
the copy you edited in the current folder); otherwise the name, with or without ``.yaml``, is looked up here, so
``heal fit --config rmse`` runs the main job from any folder, in a clone or an installed wheel alike.
``heal configs`` lists the bundled configs; ``heal configs --copy rmse`` writes ``rmse.yaml`` into the current
folder for editing (never over an existing file unless ``--overwrite true``).

Inside a config, a data file is a path or the name of a bundled data file (``train_file: hack_train.jsonl``, read
from ``heal_pl/data/assets``), and output folders (``save_dir: runs``, ``out_dir: runs/calibrate``) are relative to
the folder the command runs in: a config means the same wherever it is run.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

FOLDER = Path(__file__).resolve().parent

def _usage(name: str) -> re.Pattern[str]:
    """The "how to run me" line of a config's header: ``#   heal <command> --config <name>``."""
    return re.compile(rf"^#\s+heal (\w+) --config {re.escape(name)}(?:\s|$)", re.M)


@dataclass(frozen=True)
class BundledConfig:
    """One bundled config: ``name`` (``--config name``), its file, the ``heal`` command that runs it (from its
    header's ``#   heal <command> --config <name>`` line) and the first line of its header (what it runs)."""

    name: str
    path: Path
    command: str
    summary: str


def bundled_configs() -> dict[str, BundledConfig]:
    """Every bundled config by name, sorted (``calibrate``, ..., ``gpu/fsdp``, ..., ``vanilla``)."""
    configs = {}
    for path in sorted(FOLDER.rglob("*.yaml")):
        name = path.relative_to(FOLDER).with_suffix("").as_posix()
        text = path.read_text(encoding="utf-8")
        usage = _usage(name).search(text)
        summary = next((line.lstrip("# ").strip() for line in text.splitlines() if line.startswith("#")), "")
        configs[name] = BundledConfig(name, path, usage.group(1) if usage else "fit", summary)
    return configs


def _bundled(value: str, field: str = "--config") -> BundledConfig:
    """The bundled config named ``value`` (``.yaml`` optional); ``ValueError`` naming ``field`` and listing them."""
    configs = bundled_configs()
    name = value.removesuffix(".yaml")
    if name not in configs:
        what = "neither an existing file nor a bundled config" if field == "--config" else "not a bundled config"
        raise ValueError(f"{field} {value!r} is {what}; the bundled ones: {', '.join(configs)} "
                         "(heal configs lists them)")
    return configs[name]


def resolve_config(value: str) -> str:
    """What ``--config value`` reads: ``value`` itself when it is an existing file or inline YAML (it holds ``:``
    or ``{``: jsonargparse parses it), else the path of the bundled config of that name.

    Raises:
        ValueError: neither a file nor a bundled name; the message lists the bundled configs.
    """
    if Path(value).expanduser().is_file() or any(c in value for c in ":{\n"):
        return value
    return str(_bundled(value).path)


def resolve_config_args(argv: list[str]) -> list[str]:
    """``argv`` with the value of every ``--config VALUE`` / ``--config=VALUE`` passed through
    :func:`resolve_config`; every other argument unchanged."""
    out: list[str] = []
    for i, arg in enumerate(argv):
        if i > 0 and argv[i - 1] == "--config":
            out.append(resolve_config(arg))
        elif arg.startswith("--config="):
            out.append("--config=" + resolve_config(arg.removeprefix("--config=")))
        else:
            out.append(arg)
    return out


def copy_config(name: str, to: str | None = None, overwrite: bool = False) -> Path:
    """Copy the bundled config ``name`` to ``to`` (default: ``<last part of name>.yaml`` in the current folder; a
    folder: that file inside it) and return the path written.

    Raises:
        ValueError: ``name`` is not bundled (the message lists the bundled ones), or the target exists and
            ``overwrite`` is false.
    """
    config = _bundled(name, "--copy")
    target = Path(to).expanduser() if to else Path(config.path.name)
    if target.is_dir() or (to is not None and to.endswith(("/", os.sep))):
        target = target / config.path.name
    if target.exists() and not overwrite:
        raise ValueError(f"{target} exists; pass --overwrite true to replace it, or --to another file")
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(config.path, target)
    return target


def run_configs(copy: str | None = None, to: str | None = None, overwrite: bool = False) -> None:
    """List the bundled configs (``heal configs``), or copy one here for editing (``heal configs --copy rmse``).

    Args:
        copy: name of the bundled config to copy (``rmse``, ``gpu/fsdp``); None lists them all.
        to: where to write the copy: a file, or a folder (the copy keeps its name); None = ``<name>.yaml`` in the
            current folder.
        overwrite: replace an existing file at ``to``.
    """
    if copy is not None:
        target = copy_config(copy, to, overwrite)
        command = bundled_configs()[copy.removesuffix(".yaml")].command
        print(f"wrote {target}; edit it, then: heal {command} --config {target}")
        return
    configs = bundled_configs().values()
    width = max(len(c.name) for c in configs)
    print(f"{'config':<{width}}  {'command':<9}  what")
    for c in configs:
        print(f"{c.name:<{width}}  {c.command:<9}  {c.summary}")
    print("\nRun one: heal <command> --config <config>; copy one here to edit: heal configs --copy <config>")
