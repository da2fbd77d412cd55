"""tadq refuses, on import, a torch or diffusers older than its measured floors, naming them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tadq._requirements import FLOORS, check_installed, installed_versions, releases_below_floor

SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.mark.parametrize("torch_version", ["2.8.0", "2.10.1", "2.13.0+cpu", "2.8.0a0+5228986c39.nv25.06", "3.0"])
def test_floor_releases_and_newer_pass_whatever_their_tags(torch_version):
    assert releases_below_floor({"torch": torch_version, "diffusers": "0.35.2"}) == []


def test_older_releases_are_named_with_the_floor():
    assert releases_below_floor({"torch": "2.7.1", "diffusers": "0.42.1"}) == ["torch 2.7.1 (tadq needs >= 2.8)"]
    assert releases_below_floor({"torch": "2.13.0", "diffusers": "0.34.0"}) == [
        "diffusers 0.34.0 (tadq needs >= 0.35)"]
    assert releases_below_floor({"torch": "1.13.1", "diffusers": "0.9.0"}) == [
        "torch 1.13.1 (tadq needs >= 2.8)", "diffusers 0.9.0 (tadq needs >= 0.35)"]


def test_unparsable_or_absent_versions_are_left_to_pip():
    assert releases_below_floor({"torch": "unknown"}) == []
    assert releases_below_floor({}) == []


def test_check_raises_an_import_error_with_the_upgrade_command():
    with pytest.raises(ImportError, match=r"torch 2\.4\.1 \(tadq needs >= 2\.8\), diffusers 0\.30\.3 .*"
                                          r"pip install -U torch diffusers"):
        check_installed({"torch": "2.4.1", "diffusers": "0.30.3"})


def test_this_environment_meets_the_floors():
    installed = installed_versions()
    assert set(installed) == set(FLOORS)  # both distributions' metadata is read
    check_installed()


def test_import_tadq_names_an_old_torch_before_importing_diffusers():
    """The check runs first: an old diffusers fails inside tadq's adapters otherwise (``FluxAttention``)."""
    code = ("import importlib.metadata as m, sys\n"
            "real = m.version\n"
            "m.version = lambda name: '2.7.1' if name == 'torch' else real(name)\n"
            "try:\n"
            "    import tadq\n"
            "except ImportError as error:\n"
            "    print('refused:', error)\n"
            "print('diffusers imported:', 'diffusers' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(SRC), "PATH": ""})
    assert done.returncode == 0, done.stderr
    assert "refused: tadq cannot run with torch 2.7.1 (tadq needs >= 2.8)" in done.stdout
    assert "diffusers imported: False" in done.stdout


def test_the_floors_are_pyprojects():
    """The check and the package metadata say the same floor (pip reads one, ``import tadq`` the other)."""
    text = (SRC.parent / "pyproject.toml").read_text(encoding="utf-8")
    for name, floor in FLOORS.items():
        assert f'"{name}>={".".join(map(str, floor))}"' in text, name
