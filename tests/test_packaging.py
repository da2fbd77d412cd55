"""What ``pip install`` builds from pyproject.toml: the wheel holds every file tadq reads at run time, the metadata
builds with the declared backend floor, and the dependencies accept any recent release.

These read pyproject.toml and the source tree instead of building a wheel (a build writes ``build/`` and
``*.egg-info`` into the checkout): setuptools puts ``packages.find`` packages and the ``package-data`` globs into
the wheel, and nothing else.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIR = ROOT / "src" / "tadq"
# files under src/tadq that document the code beside them; nothing loads them at run time
NOT_RUNTIME = {"README.md"}


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def _declared_data() -> set[Path]:
    """The non-Python files the wheel gets: every file the ``tool.setuptools.package-data`` globs of ``tadq``
    match (setuptools resolves them against the package folder, ``**`` recursively)."""
    globs = _pyproject()["tool"]["setuptools"]["package-data"]["tadq"]
    return {path for pattern in globs for path in PACKAGE_DIR.glob(pattern) if path.is_file()}


def _shipped_folders() -> dict[str, Path]:
    """Every folder of shipped weights tadq opens at run time, by the function that gives it."""
    from tadq.experiments.workload import SHIPPED_MODELS
    from tadq.metrics.classifier import default_classifier_path
    from tadq.metrics.photo_classifier import default_photo_classifier_path

    folders = {f"tadq run --model {name}": find() for name, find in SHIPPED_MODELS.items()}
    folders["default_classifier_path"] = default_classifier_path()
    folders["default_photo_classifier_path"] = default_photo_classifier_path()
    return folders


def test_every_shipped_folder_goes_into_the_wheel():
    """An installed (not editable) tadq finds its shipped models and classifiers beside the package."""
    declared = _declared_data()
    for who, folder in _shipped_folders().items():
        assert folder.resolve().is_relative_to(PACKAGE_DIR.resolve()), f"{who}: {folder} is outside the package"
        files = [path for path in folder.rglob("*") if path.is_file()]
        assert files, f"{who}: {folder} is empty"
        missing = sorted(str(path.relative_to(PACKAGE_DIR)) for path in files if path not in declared)
        assert not missing, f"{who}: files not in package-data, so not in the wheel: {missing}"


def test_every_data_file_in_the_package_is_declared():
    """A data file added under src/tadq (a JSON table, a tokenizer) is read from the source tree in tests but
    would be missing from an installed wheel unless package-data names it."""
    declared = _declared_data()
    undeclared = sorted(str(path.relative_to(PACKAGE_DIR)) for path in PACKAGE_DIR.rglob("*")
                        if path.is_file() and path.suffix not in (".py", ".pyc") and path.name not in NOT_RUNTIME
                        and "__pycache__" not in path.parts and path not in declared)
    assert not undeclared, f"data files under src/tadq that package-data does not ship: {undeclared}"


def test_every_package_folder_is_a_package():
    """``packages.find`` (not find_namespace) skips a folder without ``__init__.py``: its modules would be left
    out of the wheel while working from the checkout."""
    missing = sorted(str(folder.relative_to(PACKAGE_DIR)) for folder in PACKAGE_DIR.rglob("*")
                     if folder.is_dir() and "__pycache__" not in folder.parts and any(folder.glob("*.py"))
                     and not (folder / "__init__.py").is_file())
    assert not missing, f"folders with modules but no __init__.py: {missing}"


def _floor(requirements: list[str], name: str) -> tuple[int, ...] | None:
    for requirement in requirements:
        match = re.fullmatch(rf"{re.escape(name)}\s*>=\s*([\d.]+)", requirement.split(";")[0].strip())
        if match:
            return tuple(int(part) for part in match.group(1).split("."))
    return None


def test_the_build_backend_floor_reads_the_license_field():
    """``license = "Apache-2.0"`` (an SPDX expression, PEP 639) is read from setuptools 77.0 on (77.0.3 also names
    a too-old ``packaging``); an older setuptools that the floor allowed (a ``--no-build-isolation`` install beside
    setuptools 68-76) refused pyproject.toml: ``project.license`` must be a table there."""
    config = _pyproject()
    if not isinstance(config["project"].get("license"), str):
        pytest.skip("project.license is a table, which every setuptools reads")
    floor = _floor(config["build-system"]["requires"], "setuptools")
    assert floor is not None, "build-system.requires names no setuptools floor"
    assert floor >= (77, 0, 3), f"setuptools>={'.'.join(map(str, floor))} cannot read project.license as a string"


def test_dependencies_accept_any_recent_release():
    """Floors, never exact pins: a CUDA torch or a newer diffusers installs beside tadq."""
    pinned = [requirement for requirement in _pyproject()["project"]["dependencies"]
              if re.search(r"==|~=|<", requirement)]
    assert not pinned, f"runtime dependencies pinned or capped: {pinned}"
    assert _floor(_pyproject()["project"]["dependencies"], "torch") is not None


def test_the_console_script_names_a_callable():
    target = _pyproject()["project"]["scripts"]["tadq"]
    module, _, attribute = target.partition(":")
    assert callable(getattr(importlib.import_module(module), attribute))


# what setuptools puts into an sdist without being told: the packages (and their package-data), README,
# pyproject.toml, MANIFEST.in
SDIST_BY_DEFAULT = {"src", "README.md", "pyproject.toml", "MANIFEST.in"}


def _manifest_top_level() -> set[str]:
    """The top-level names MANIFEST.in's ``graft``/``include`` lines add to the sdist."""
    added = set()
    for line in (ROOT / "MANIFEST.in").read_text(encoding="utf-8").splitlines():
        words = line.split("#")[0].split()
        if len(words) >= 2 and words[0] in ("graft", "include"):
            added.update(word.split("/")[0] for word in words[1:])
    return added


def test_the_sdist_carries_the_tests_and_every_file_they_read_from_the_checkout():
    """It carried src/ and tests/test*.py alone: no conftest, no test subfolder, none of the docs, recipes and
    benchmark scripts the tests check, so the suite could not run from an sdist."""
    read = set()
    for path in (ROOT / "tests").rglob("*.py"):
        read.update(re.findall(r"(?:ROOT|parents\[\d\])\s*/\s*\"([^\"/]+)", path.read_text(encoding="utf-8")))
    assert read, "found no file the tests read from the checkout (the pattern no longer matches)"
    carried = SDIST_BY_DEFAULT | _manifest_top_level()
    assert "tests" in carried
    assert not read - carried, f"the tests read {sorted(read - carried)} from the checkout, not in MANIFEST.in"
    assert all((ROOT / name).exists() for name in _manifest_top_level()), "MANIFEST.in names a path that is gone"


def test_manifest_in_leaves_the_wheel_as_package_data_makes_it():
    """MANIFEST.in would also put every file it adds under src/tadq (the package READMEs) into the wheel unless
    include-package-data is off: the wheel keeps the package-data globs alone."""
    assert _pyproject()["tool"]["setuptools"]["include-package-data"] is False
