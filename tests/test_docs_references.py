"""Every reference in code and docs resolves inside the repository.

Docstrings, comments and READMEs cite the documentation under ``docs/`` (``docs/methods/ptqd.md#pitfalls``). These
tests fail when a reference points outside the repository (the old ``methods.md`` / ``facts.md`` /
``architecture.md`` design notes, ``shared/design``), when a cited ``docs/`` page or ``#anchor`` does not exist,
or when a relative Markdown link (in ``docs/``, the top-level README or any README under ``src/``) is broken, or
when a ``tadq COMMAND --flag`` they show names a flag the command does not have (or a row, preset or search axis
it refuses), when a ``tadq.…`` Python name they show does not exist, or when a ``tests/x.py::test_name`` they
cite is not in that file.
"""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCANNED_DIRS = ("src", "tests", "benchmarks", "docs")
SCANNED_SUFFIXES = {".py", ".md", ".toml", ".txt", ".cfg", ".ini", ".yaml", ".yml"}
SKIPPED_PARTS = {"__pycache__", ".venv", "runs", ".cache"}
THIS_FILE = Path(__file__).resolve()

OUTSIDE = re.compile(r"shared/design|\.\./shared\b")
DESIGN_NOTE = re.compile(r"(?<![\w./-])([\w./-]*\b(?:methods|facts|architecture)\.md)")
DOCS_REFERENCE = re.compile(r"(?<![\w./-])(docs/[\w./-]+\.md)(?:#([\w-]+))?")
MARKDOWN_LINK = re.compile(r"\]\(([^)\s]+)\)")
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
FENCE = re.compile(r"^ {0,3}(```|~~~)")


def _scanned_files() -> list[Path]:
    files = [ROOT / "README.md"]
    for directory in SCANNED_DIRS:
        for path in sorted((ROOT / directory).rglob("*")):
            if (path.is_file() and path.suffix in SCANNED_SUFFIXES and path.resolve() != THIS_FILE
                    and not SKIPPED_PARTS.intersection(path.relative_to(ROOT).parts)
                    and not any(part.endswith(".egg-info") for part in path.parts)):
                files.append(path)
    return files


def _markdown_files() -> list[Path]:
    return [path for path in _scanned_files() if path.suffix == ".md"]


def _lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8", errors="replace").splitlines()


def _where(path: Path, number: int) -> str:
    return f"{path.relative_to(ROOT)}:{number}"


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: link text kept, lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    text = "".join(ch for ch in text if ch.isalnum() or ch in " -_")
    return text.replace(" ", "-")


@cache
def anchors(path: Path) -> frozenset[str]:
    """The anchors GitHub generates for ``path``'s headings (duplicates numbered -1, -2, …)."""
    seen: dict[str, int] = {}
    found: set[str] = set()
    in_fence = False
    for line in _lines(path):
        if FENCE.match(line):
            in_fence = not in_fence
            continue
        match = None if in_fence else HEADING.match(line)
        if match:
            base = slug(match.group(2))
            count = seen.get(base, 0)
            seen[base] = count + 1
            found.add(base if count == 0 else f"{base}-{count}")
    return frozenset(found)


def test_slug_matches_github():
    assert slug("Variance schedule calibration") == "variance-schedule-calibration"
    assert slug("TCEC: closed-form error propagation") == "tcec-closed-form-error-propagation"
    assert slug("`TFMQConfig` fields") == "tfmqconfig-fields"


def test_scanning_finds_the_code_and_the_docs():
    names = {path.relative_to(ROOT).as_posix() for path in _scanned_files()}
    assert "README.md" in names and "src/tadq/config.py" in names
    assert "docs/README.md" in names and "docs/methods/notation.md" in names


def test_nothing_points_outside_the_repository():
    bad = [f"{_where(path, n)}: {line.strip()}" for path in _scanned_files()
           for n, line in enumerate(_lines(path), 1) if OUTSIDE.search(line)]
    assert not bad, "references to files outside the repository:\n" + "\n".join(bad)


def test_design_note_names_resolve_inside_the_repository():
    """``methods.md``, ``facts.md`` and ``architecture.md`` may only be named by a path that exists here."""
    bad = []
    for path in _scanned_files():
        for n, line in enumerate(_lines(path), 1):
            for match in DESIGN_NOTE.finditer(line):
                target = match.group(1)
                if target.startswith("/") or not any((base / target).is_file() for base in (ROOT, path.parent)):
                    bad.append(f"{_where(path, n)}: {target!r} in {line.strip()}")
    assert not bad, "design-note references that do not resolve in the repository:\n" + "\n".join(bad)


def test_docs_references_and_anchors_exist():
    """``docs/…md`` and ``docs/…md#anchor`` cited anywhere (docstrings, comments, READMEs) exist."""
    bad = []
    for path in _scanned_files():
        for n, line in enumerate(_lines(path), 1):
            for match in DOCS_REFERENCE.finditer(line):
                page, anchor = ROOT / match.group(1), match.group(2)
                if not page.is_file():
                    bad.append(f"{_where(path, n)}: no page {match.group(1)}")
                elif anchor and anchor not in anchors(page):
                    bad.append(f"{_where(path, n)}: no heading #{anchor} in {match.group(1)}")
    assert not bad, "broken docs references:\n" + "\n".join(bad)


@pytest.mark.parametrize("markdown", _markdown_files(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_markdown_links_resolve(markdown: Path):
    bad = []
    in_fence = False
    for n, line in enumerate(_lines(markdown), 1):
        if FENCE.match(line):
            in_fence = not in_fence
        if in_fence:
            continue
        for match in MARKDOWN_LINK.finditer(line):
            link = match.group(1).strip("<>")
            if re.match(r"^[a-z][a-z0-9+.-]*:", link):  # http:, https:, mailto:
                continue
            target, _, anchor = link.partition("#")
            page = (markdown.parent / target).resolve() if target else markdown
            if not page.exists():
                bad.append(f"{_where(markdown, n)}: {link} (no such file)")
            elif anchor and page.suffix == ".md" and anchor not in anchors(page):
                bad.append(f"{_where(markdown, n)}: {link} (no such heading)")
    assert not bad, "broken links:\n" + "\n".join(bad)


# -- CLI flags named in the docs ------------------------------------------------------------------------------------
INVOCATION = re.compile(r"(?:^|[\s(])(?:python -m tadq|-m tadq|tadq)(?:\.cli(?:\.app)?)?\s+([a-z][\w-]*)(.*)")
SHELL_END = re.compile(r"[;|&`]|\$\(|\s#\s|\s\s#")


def _shell_snippets(path: Path) -> list[tuple[int, str]]:
    """(line, text) of every fenced line (backslash continuations joined) and every inline code span (spans broken
    over lines joined within their paragraph) of a Markdown file."""
    snippets: list[tuple[int, str]] = []
    paragraph: list[tuple[int, str]] = []
    pending: tuple[int, str] | None = None
    in_fence = False

    def end_paragraph() -> None:
        text = " ".join(line for _, line in paragraph)
        snippets.extend((paragraph[0][0], match.group(1)) for match in re.finditer(r"`([^`]+)`", text))
        paragraph.clear()

    for n, line in enumerate(_lines(path), 1):
        if FENCE.match(line):
            end_paragraph()
            in_fence = not in_fence
        elif in_fence:
            pending = (pending[0], f"{pending[1]} {line.strip()}") if pending else (n, line)
            if pending[1].rstrip().endswith("\\"):
                pending = (pending[0], pending[1].rstrip()[:-1])
            else:
                snippets.append(pending)
                pending = None
        elif line.strip():
            paragraph.append((n, line.strip()))
        else:
            end_paragraph()
    end_paragraph()
    return snippets


def documented_flags() -> list[tuple[str, str, str, bool]]:
    """(where, command, flag, is_prefix) for every ``--flag`` after ``tadq COMMAND`` in the Markdown files; a flag
    followed by ``…`` stands for every flag it begins (``--budget …``)."""
    from typer.main import get_command

    from tadq.cli.app import app

    commands = get_command(app).commands
    found = []
    for path in _markdown_files():
        for n, snippet in _shell_snippets(path):
            for match in INVOCATION.finditer(snippet):
                name, command = match.group(1), commands.get(match.group(1))
                words = SHELL_END.split(match.group(2))[0].split()
                if command is not None and hasattr(command, "commands"):  # tadq zoo train …
                    command = command.commands.get(words[0]) if words else None
                    name = f"{name} {words[0]}" if command is not None else name
                if command is None:
                    continue
                for i, word in enumerate(words):
                    if word.startswith("--"):
                        prefix = i + 1 < len(words) and words[i + 1].startswith("…")
                        found.append((_where(path, n), name, word.split("=")[0].rstrip(",.:)"), prefix))
    return found


def _command_flags() -> dict[str, set[str]]:
    from typer.main import get_command

    from tadq.cli.app import app

    flags: dict[str, set[str]] = {}

    def walk(command, name: str) -> None:
        flags[name] = {opt for param in command.params for opt in (*param.opts, *param.secondary_opts)}
        for sub_name, sub in getattr(command, "commands", {}).items():
            walk(sub, f"{name} {sub_name}".strip())

    walk(get_command(app), "")
    return flags


def test_the_flag_scan_sees_the_quick_start():
    # toothless if the scan missed fenced blocks, continuations or inline spans broken over lines
    seen = {(name, flag) for _, name, flag, _ in documented_flags()}
    assert {("quantize", "--split-shortcut"), ("quantize", "--recon-rounding"), ("sample", "--backend"),
            ("recipe", "--budget-bits"), ("run", "--recon-activation-iters")} <= seen


def test_every_documented_flag_exists_on_its_command():
    """A flag the docs give a ``tadq`` command (``tadq run --fp-layers none``) is one of that command's options: a
    renamed or misspelt flag in README.md, docs/ or a README under src/ fails here, not in a user's terminal."""
    flags = _command_flags()
    bad = [f"{where}: tadq {name} {flag}" for where, name, flag, prefix in documented_flags()
           if not (any(known.startswith(flag) for known in flags[name]) if prefix else flag in flags[name])]
    assert not bad, "flags the docs give that the command does not have:\n" + "\n".join(bad)


# -- Python names the docs give -------------------------------------------------------------------------------------
DOTTED_NAME = re.compile(r"(?<![\w./-])(tadq(?:\.[A-Za-z_]\w*)+)")
FROM_IMPORT = re.compile(r"\bfrom (tadq(?:\.\w+)*) import \(?([\w ,]+)")


def _resolves(dotted: str) -> bool:
    """Whether ``tadq.a.b.c`` is a module, or an attribute path under the longest importable module prefix."""
    import importlib

    parts = dotted.split(".")
    for split in range(len(parts), 0, -1):
        try:
            found = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        for part in parts[split:]:
            if not hasattr(found, part):
                return False
            found = getattr(found, part)
        return True
    return False


def documented_names() -> list[tuple[str, str]]:
    """(where, dotted name) of every ``tadq.…`` name in the Markdown files' code, ``from tadq.x import A, B`` as
    ``tadq.x.A`` and ``tadq.x.B``."""
    found = []
    for path in _markdown_files():
        for n, snippet in _shell_snippets(path):
            found += [(_where(path, n), match.group(1)) for match in DOTTED_NAME.finditer(snippet)]
            for match in FROM_IMPORT.finditer(snippet):
                found += [(_where(path, n), f"{match.group(1)}.{name.split()[0]}")
                          for name in match.group(2).split(",") if name.strip()]
    return found


def test_the_name_scan_sees_the_api():
    # toothless if the scan found nothing or the resolver accepted anything
    names = {name for _, name in documented_names()}
    assert {"tadq.load_pipeline", "tadq.experiments.rows.recipes.shipped_recipes",
            "tadq.corrections.attach.fit_corrections"} <= names
    assert _resolves("tadq.load_pipeline") and not _resolves("tadq.experiments.rows.tfmq.tfmq_base")


def test_every_documented_python_name_exists():
    """A dotted ``tadq.…`` name in a code span or block of the docs (``tadq.recipe.override_recipe``, or imported with
    ``from tadq.recipe import Recipe``) exists: a renamed or removed function named in README.md, docs/ or a README
    under src/ fails here, not in a user's script."""
    seen: dict[str, bool] = {}
    bad = []
    for where, name in documented_names():
        if name not in seen:
            seen[name] = _resolves(name)
        if not seen[name]:
            bad.append(f"{where}: {name}")
    assert not bad, "names the docs give that tadq does not have:\n" + "\n".join(bad)


# -- values the docs give to the list flags -------------------------------------------------------------------------
def documented_values(flags: set[str]) -> list[tuple[str, str, str, str]]:
    """(where, command, flag, value) for every ``tadq COMMAND … --flag VALUE`` in the Markdown files with ``--flag``
    in ``flags``; a comma list broken over a continued line (``naive,\\`` then ``svdquant``) is one value."""
    found = []
    for path in _markdown_files():
        for n, snippet in _shell_snippets(path):
            for match in INVOCATION.finditer(snippet):
                words = SHELL_END.split(match.group(2))[0].split()
                for i, word in enumerate(words):
                    flag, _, value = word.partition("=")
                    if flag not in flags:
                        continue
                    if not value:
                        rest = words[i + 1:]
                        while rest and (not value or value.endswith(",")):
                            value, rest = value + rest[0], rest[1:]
                    if value and not value.startswith(("…", "-", "$")):
                        found.append((_where(path, n), match.group(1), flag, value.rstrip(".,;:)`")))
    return found


def _refusal(command: str, flag: str, item: str) -> str | None:
    """Why ``tadq command flag item`` would be refused before any work, or None."""
    from tadq.config import FP_LAYER_PRESETS
    from tadq.experiments import run  # noqa: F401  (registers the rows)
    from tadq.experiments.rows.base import method_names
    from tadq.quant.qscheme import preset_key
    from tadq.search.space import BASES, parse_stack

    try:
        if flag in ("--preset", "--presets", "--budget-bits"):
            preset_key(item)
        elif flag == "--methods" and command in ("run", "bench") and item not in method_names():
            return f"no row {item!r}"
        elif flag == "--bases" and item not in BASES:
            return f"no base {item!r}"
        elif flag == "--stacks":
            parse_stack(item)
        elif flag == "--fp-layers" and item not in FP_LAYER_PRESETS:
            return f"no fp-layers key {item!r}"
    except ValueError as error:
        return str(error)
    return None


LIST_FLAGS = {"--preset", "--presets", "--budget-bits", "--methods", "--bases", "--stacks", "--fp-layers"}


def test_the_value_scan_joins_continued_lists():
    values = {(command, flag, value) for _, command, flag, value in documented_values(LIST_FLAGS)}
    assert ("run", "--methods", "naive,best") in values and ("recipe", "--stacks", "none,tac") in values
    assert any(value.endswith("svdquant+tcec") and "svdquant-rot," in value for _, flag, value in values)
    assert _refusal("run", "--methods", "tfmq_base") and _refusal("recipe", "--presets", "W9A9")


def test_every_documented_row_preset_and_axis_exists():
    """The rows, presets, search axes and floating-point layer keys the docs give ``tadq run``, ``bench``,
    ``recipe`` and ``quantize`` (``--methods naive,best``, ``--stacks none,tac``) are ones the command takes."""
    bad = [f"{where}: tadq {command} {flag} {value}: {why}"
           for where, command, flag, value in documented_values(LIST_FLAGS)
           for item in value.split(",") if item and (why := _refusal(command, flag, item))]
    assert not bad, "values the docs give that the command refuses:\n" + "\n".join(bad)


# -- tests the docs cite --------------------------------------------------------------------------------------------
TEST_REFERENCE = re.compile(r"(tests/[\w/]+\.py)|::(\w+)")


def cited_tests() -> list[tuple[str, str, str]]:
    """(where, test file, test name) for every ``tests/x.py::test_name`` in the Markdown files; a bare ``::name``
    belongs to the test file named last before it in the same file (``tests/a.py::test_x``, ``::test_y``)."""
    found = []
    for path in _markdown_files():
        last = None
        for n, line in enumerate(_lines(path), 1):
            for match in TEST_REFERENCE.finditer(line):
                if match.group(1):
                    last = match.group(1)
                elif last is not None:
                    found.append((_where(path, n), last, match.group(2)))
    return found


def test_the_cited_test_scan_reads_the_guarantees():
    cited = {(file, name) for _, file, name in cited_tests()}
    assert ("tests/test_io.py", "test_existing_folder_is_kept_unless_overwrite") in cited  # a bare ::name


def test_every_cited_test_exists_in_its_file():
    """README's "What tadq guarantees" names the test behind each line (``tests/test_io.py::test_…``, then ``::test_…``
    for the same file): a renamed or moved test, or a bare name under the wrong file, fails here."""
    bad = [f"{where}: {file}::{name}" for where, file, name in cited_tests()
           if not (ROOT / file).is_file()
           or not re.search(rf"^\s*(?:async )?(?:def|class) {name}\b", (ROOT / file).read_text(), re.MULTILINE)]
    assert not bad, "cited tests that do not exist where the docs say:\n" + "\n".join(bad)
