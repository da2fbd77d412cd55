"""The oldest torch and diffusers tadq runs on, checked when this module is imported (first thing ``tadq`` does).

pip enforces pyproject.toml's floors, but an environment put together around its resolver (``pip install --no-deps``,
a container's own torch build) can hold older releases, and those fail far from the cause: an ImportError inside a
model adapter (diffusers < 0.35 has no ``FluxAttention``), an AttributeError in the compiled integer backend
(torch < 2.8). The floors are measured (``make test-floors``; README, "Two commands"). Only the release numbers are
compared, so a pre-release or local build of a floor release (a container's ``2.8.0a0+…nv25.06`` torch) is accepted.
"""

from __future__ import annotations

import re
from importlib import metadata

FLOORS: dict[str, tuple[int, ...]] = {"torch": (2, 8), "diffusers": (0, 35)}
RELEASE = re.compile(r"\d+(?:\.\d+)+")  # PEP 440's release segment, what a pre-release or local tag follows


def releases_below_floor(installed: dict[str, str]) -> list[str]:
    """``"name version (tadq needs >= floor)"`` for each package in ``installed`` older than its floor; versions
    that do not parse are left to pip (nothing to compare)."""
    old = []
    for name, floor in FLOORS.items():
        version = installed.get(name)
        if version is None:
            continue
        release = RELEASE.match(version)
        if release is None:
            continue
        if tuple(int(part) for part in release.group(0).split(".")[:len(floor)]) < floor:
            old.append(f"{name} {version} (tadq needs >= {'.'.join(map(str, floor))})")
    return old


def installed_versions() -> dict[str, str]:
    """The installed distributions' versions of the packages with a floor (absent ones left out)."""
    versions = {}
    for name in FLOORS:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def check_installed(installed: dict[str, str] | None = None) -> None:
    """Raise ``ImportError`` naming every package below tadq's floor, before anything imports them."""
    old = releases_below_floor(installed_versions() if installed is None else installed)
    if old:
        raise ImportError(f"tadq cannot run with {', '.join(old)}: upgrade with pip install -U "
                          f"{' '.join(name.split()[0] for name in old)} (the floors are in tadq's pyproject.toml)")


check_installed()
