"""The docs a user follows: README.md and docs/**/*.md.

- every ``heal ...`` command line in a code block parses (run in-process with ``--print_config`` when it has
  ``--config``, else ``--help``);
- every relative Markdown link and image points to an existing file, and to an existing heading when it has an
  anchor;
- every ``heal_pl.xxx`` name in backticks, and every ``from heal_pl... import ...`` of a Python block, imports;
  every backticked repository path (``heal_pl/...``, ``tests/...``, ``configs/...``, ...) exists;
- README's "Where things live" tree lists exactly the package's folders and modules, and its module map names
  attributes that exist.
"""

from __future__ import annotations

import importlib
import re
import shlex
from pathlib import Path

import pytest

from heal_pl.cli import DESCRIPTIONS, main

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.M | re.S)
INLINE = re.compile(r"(`+)(.+?)\1")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
DOTTED = re.compile(r"\bheal_pl(?:\.[A-Za-z_]\w*)+")
REPO_PATH = re.compile(r"^(?:heal_pl|tests|benchmarks|scripts|configs|docs)/[\w./\-]*(?:::\w+)?$")
FILE_SUFFIXES = {"json", "jsonl", "py", "md", "csv", "yaml", "png", "safetensors"}


def rel(page: Path) -> str:
    return str(page.relative_to(ROOT))


def prose(text: str) -> str:
    """The text outside fenced code blocks."""
    return FENCE.sub("", text)


def inline_spans(text: str) -> list[str]:
    return [m.group(2).strip() for m in INLINE.finditer(prose(text))]


# --------------------------------------------------------------------------- commands


def command_lines(text: str) -> list[str]:
    """The ``heal ...`` lines of the shell code blocks, continuation lines joined, env prefixes dropped."""
    lines = []
    for m in FENCE.finditer(text):
        if m.group(1) not in ("bash", "sh", "shell", "console", ""):
            continue
        for line in m.group(2).replace("\\\n", " ").splitlines():
            for part in re.split(r"\s(?:&&|\|\||;)\s", line):  # `a && heal fit ...`: each command of the line
                part = re.sub(r"^\s*(?:\$\s+)?(?:[A-Z_][A-Z0-9_]*=\S*\s+)*", "", part)
                if part.startswith("heal "):
                    lines.append(part)
    return lines


def commands() -> list[tuple[str, tuple[str, ...]]]:
    found: dict[tuple[str, ...], str] = {}
    for page in PAGES:
        for line in command_lines(page.read_text()):
            words = shlex.split(line, comments=True)[1:]
            cut = next((i for i, w in enumerate(words) if w in (">", ">>", "|", "&&", ";", "2>&1")), len(words))
            found.setdefault(tuple(words[:cut]), rel(page))
    return sorted((page, args) for args, page in found.items())


COMMAND_LINES = commands()


def test_the_docs_show_commands() -> None:
    shown = {args[0] for _, args in COMMAND_LINES}
    assert {"fit", "calibrate", "survival", "thresholds", "compare", "rounds"} <= shown


@pytest.mark.parametrize(("page", "args"), COMMAND_LINES, ids=[" ".join(a) for _, a in COMMAND_LINES])
def test_every_heal_command_in_the_docs_parses(page: str, args: tuple[str, ...], tmp_path, monkeypatch, capsys) -> None:
    assert args and args[0] in (*DESCRIPTIONS, "--version"), f"{page}: `heal {' '.join(args)}` is not a heal command"
    monkeypatch.chdir(tmp_path)  # outside the clone: the bundled configs are found by name from any folder
    extra = "--print_config" if "--config" in args else "--help"
    with pytest.raises(SystemExit) as done:
        main([*args, extra])
    out = capsys.readouterr()
    assert done.value.code in (0, None), f"{page}: `heal {' '.join(args)} {extra}` failed:\n{out.err[-2000:]}"


# --------------------------------------------------------------------------- links


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: markup dropped, lower case, punctuation removed, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip())
    return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*\s*$", prose(page.read_text()), re.M):
        base = slug(m.group(1))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def links() -> list[tuple[str, str]]:
    found = []
    for page in PAGES:
        text = INLINE.sub("", prose(page.read_text()))
        found += [(rel(page), m.group(1)) for m in LINK.finditer(text) if not re.match(r"[a-z]+:", m.group(1))]
    return found


def test_the_docs_have_links() -> None:
    assert len(links()) > 20


@pytest.mark.parametrize(("page", "target"), links())
def test_every_relative_link_resolves(page: str, target: str) -> None:
    path, _, anchor = target.partition("#")
    file = (ROOT / page).parent / path if path else ROOT / page
    assert file.exists(), f"{page}: link to {target!r}: {file} does not exist"
    if anchor:
        assert file.suffix == ".md", f"{page}: anchor on a non-Markdown file: {target!r}"
        assert anchor in anchors(file), f"{page}: link to {target!r}: no heading with that anchor in {file.name}"


# --------------------------------------------------------------------------- names and paths


def dotted_names() -> list[tuple[str, str]]:
    found: dict[str, str] = {}
    for page in PAGES:
        text = page.read_text()
        for span in inline_spans(text):
            for name in DOTTED.findall(span):
                if name.rsplit(".", 1)[1] not in FILE_SUFFIXES:
                    found.setdefault(name, rel(page))
        for m in FENCE.finditer(text):
            if m.group(1) != "python":
                continue
            for mod, names in re.findall(r"^\s*from (heal_pl[\w.]*) import ([\w, ]+)", m.group(2), re.M):
                for name in names.split(","):
                    found.setdefault(f"{mod}.{name.strip()}", rel(page))
    return sorted((page, name) for name, page in found.items())


def resolve(name: str) -> object:
    """Import the longest module prefix of ``name``, then get the remaining attributes."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ModuleNotFoundError as e:
            if e.name is None or not ".".join(parts[:i]).startswith(e.name):
                raise
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ModuleNotFoundError(name)


@pytest.mark.parametrize(("page", "name"), dotted_names())
def test_every_heal_pl_name_in_the_docs_imports(page: str, name: str) -> None:
    try:
        resolve(name)
    except (ImportError, AttributeError) as e:
        pytest.fail(f"{page}: `{name}` does not import: {e}")


def repo_paths() -> list[tuple[str, str]]:
    found: dict[str, str] = {}
    for page in PAGES:
        for span in inline_spans(page.read_text()):
            for word in span.split():
                if REPO_PATH.match(word) and not word.endswith("."):
                    found.setdefault(word, rel(page))
    return sorted((page, path) for path, page in found.items())


@pytest.mark.parametrize(("page", "path"), repo_paths())
def test_every_repository_path_in_the_docs_exists(page: str, path: str) -> None:
    file, _, test = path.partition("::")
    assert (ROOT / file).exists(), f"{page}: `{path}` does not exist"
    if test:
        assert re.search(rf"^\s*def {test}\(", (ROOT / file).read_text(), re.M), f"{page}: no {test} in {file}"


# --------------------------------------------------------------------------- README's tree and module map


def section(text: str, heading: str) -> str:
    start = text.index(f"\n## {heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end > 0 else None]


def test_readme_tree_matches_the_package() -> None:
    tree = FENCE.search(section((ROOT / "README.md").read_text(), "Where things live")).group(2)
    package = ROOT / "heal_pl"
    entries: dict[str, list[str]] = {}  # top-level entry -> the text of its line(s)
    current = None
    for line in tree.splitlines()[1:]:
        m = re.match(r"^  (\S+)", line)
        if m:
            current = m.group(1)
            entries[current] = [line]
        elif current and line.strip():
            entries[current].append(line)
    real = {p.name + ("/" if p.is_dir() else "") for p in package.iterdir() if p.name != "__pycache__"}
    assert set(entries) == real, f"README tree: missing {real - set(entries)}, stale {set(entries) - real}"
    for entry, text in entries.items():
        if not entry.endswith("/") or entry == "assets/":
            continue
        named = set(re.findall(r"\b(\w+\.py)\b", " ".join(text)))
        folder = package / entry
        modules = {p.name for p in folder.glob("*.py")} - {"__init__.py"}
        assert named == modules, f"README tree, {entry}: missing {modules - named}, stale {named - modules}"
        subfolders = {p.name + "/" for p in folder.iterdir() if p.is_dir() and p.name != "__pycache__"}
        assert all(s in " ".join(text) for s in subfolders), f"README tree, {entry}: lists no {subfolders}"


def outside_parentheses(text: str) -> str:
    """``text`` without its parenthesised remarks (parentheses inside backticks do not count)."""
    out, depth, code = [], 0, False
    for ch in text:
        code = not code if ch == "`" else code
        depth += (ch == "(") - (ch == ")") if not code else 0
        if depth == 0 and (code or ch != ")"):
            out.append(ch)
    return "".join(out)


def module_map() -> list[tuple[str, str]]:
    """(module, name) for every name a row of README's module map lists (not the ones its remarks mention)."""
    rows = []
    for line in section((ROOT / "README.md").read_text(), "Module map (the smaller public names)").splitlines():
        m = re.match(r"^\| `(heal_pl[\w.]*)` \| (.*) \|$", line)
        if m:
            for span in INLINE.findall(outside_parentheses(m.group(2))):
                name = re.match(r"^([A-Za-z_]\w*)(?:\(.*\))?$", span[1])
                if name and name.group(1) not in ("None", "True", "False"):
                    rows.append((m.group(1), name.group(1)))
    return rows


def test_readme_module_map_is_not_empty() -> None:
    assert len(module_map()) > 100


@pytest.mark.parametrize(("module", "name"), module_map())
def test_readme_module_map_names_exist(module: str, name: str) -> None:
    assert hasattr(importlib.import_module(module), name), f"README module map: {module} has no {name}"
