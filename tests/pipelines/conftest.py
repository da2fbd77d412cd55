"""Tiny SD / SDXL pipeline folders (built once per session) and the adapter they need for sampling."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
from tests.pipelines.builders import build_sd, build_sdxl


@pytest.fixture(scope="session")
def sd_folder(tmp_path_factory) -> Path:
    return build_sd(tmp_path_factory.mktemp("pipelines") / "sd")


@pytest.fixture(scope="session")
def sdxl_folder(tmp_path_factory) -> Path:
    return build_sdxl(tmp_path_factory.mktemp("pipelines") / "sdxl")


@pytest.fixture(scope="session")
def condition_adapter() -> None:
    """Sampling a ``UNet2DConditionModel`` needs its adapter; skip (naming it) while it is not in the tree."""
    from tadq.registry import registered_families

    if "UNet2DConditionModel" not in registered_families():
        try:
            importlib.import_module("tadq.adapters.unet_condition")
        except ImportError:
            pytest.skip("tadq.adapters.unet_condition (the UNet2DConditionModel adapter) is not available")
