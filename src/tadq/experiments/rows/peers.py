"""Rows of the maintained tools users would pick (``tadq.experiments.peers``), in the same table as tadq's rows.

Each method maps a tadq preset onto the tool's nearest setting and raises ``UnsupportedPreset`` (a ``ValueError``
naming what the tool supports) when it has none, before anything is sampled. The tools are imported only when a
row is built, so registering these methods needs none of them installed.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from torch import nn

from tadq.config import fp_layer_roles
from tadq.experiments.peers.base import (
    INSTALL_HINT,
    PeerNotInstalled,
    UnsupportedPreset,
    kept_fp_layers,
    peer_report,
    tool_version,
)
from tadq.experiments.rows.base import BaseModels, Variant, method_label, register_method

if TYPE_CHECKING:
    from tadq.experiments.run import RunConfig

__all__ = ["PEERS", "PeerMethod", "check_peer_row", "supported_presets"]


@dataclass(frozen=True)
class PeerMethod:
    """One peer method: the tool (distribution + top-level module), its setting and the presets it maps onto."""

    label: str
    distribution: str
    module: str
    setting: str
    presets: tuple[str, ...]
    retargeted: tuple[str, ...] = ()  # presets reached by changing the recipe's bit widths, flagged in the row name


PEERS: dict[str, PeerMethod] = {
    "quanto": PeerMethod("optimum-quanto", "optimum-quanto", "optimum.quanto", "quantize + Calibration",
                         ("W8A8", "W4A8", "W8A16", "W4A16")),
    "modelopt-int8": PeerMethod("ModelOpt INT8_DEFAULT", "nvidia-modelopt", "modelopt", "INT8_DEFAULT_CFG",
                                ("W8A8", "W4A8", "W4A4", "W8A16", "W4A16"), ("W4A8", "W4A4", "W8A16", "W4A16")),
    "modelopt-smoothquant": PeerMethod("ModelOpt INT8_SMOOTHQUANT", "nvidia-modelopt", "modelopt",
                                       "INT8_SMOOTHQUANT_CFG", ("W8A8",)),
    "modelopt-w4a8-awq": PeerMethod("ModelOpt W4A8_AWQ_BETA (FP8 act.)", "nvidia-modelopt", "modelopt",
                                    "W4A8_AWQ_BETA_CFG", ("W4A8",)),
    "torchao-int8-dynamic": PeerMethod("torchao int8 dynamic (Linear only)", "torchao", "torchao",
                                       "int8 dynamic activations", ("W8A8", "W4A8")),
}


def supported_presets(method: str) -> tuple[str, ...]:
    """The tadq presets peer ``method`` maps onto."""
    return PEERS[method].presets


def missing_peer(method: str) -> str | None:
    """Why the row ``method`` cannot run here (its peer tool is not installed), or ``None``: what ``tadq run`` checks
    before calibrating (``tadq bench`` turns the same into a "not supported" row)."""
    peer = PEERS.get(method)
    if peer is None or not _missing(peer.module):
        return None
    return f"method {method!r} needs {peer.distribution}, which is not installed: {INSTALL_HINT}"


def check_peer_row(method: str, preset_name: str) -> None:
    """``UnsupportedPreset`` when peer ``method`` has no setting for ``preset_name``, ``PeerNotInstalled`` when its
    tool is missing; nothing for a row that is not a peer's. ``tadq.experiments.run.run_main_job`` asks before the
    model is loaded and calibrated: the row itself is built only after that work (``tadq run``'s default presets
    include W4A4, which no peer but ``modelopt-int8`` can do)."""
    peer = PEERS.get(method)
    if peer is None:
        return
    if preset_name.strip().upper() not in peer.presets:
        raise UnsupportedPreset(f"method {method!r} ({peer.distribution} {peer.setting}) has no setting for "
                                f"{preset_name!r}; supported presets: {list(peer.presets)} (run the other presets "
                                "in a separate job, or leave this method out)")
    if (reason := missing_peer(method)) is not None:
        raise PeerNotInstalled(reason)


def _missing(module: str) -> bool:
    """True when ``module`` cannot be found (checked without importing it; a parent package may be imported)."""
    try:
        return importlib.util.find_spec(module) is None
    except (ImportError, ValueError):
        return True


def _builder(method: str, peer: PeerMethod, keep_fp: tuple[str, ...]
             ) -> Callable[[nn.Module, Any, str, int], nn.Module]:
    from tadq.experiments.peers import quantize_modelopt, quantize_quanto, quantize_torchao

    if method == "quanto":
        return lambda model, calib, preset, batch: quantize_quanto(model, calib, preset, batch, keep_fp=keep_fp)
    if method == "torchao-int8-dynamic":
        return lambda model, calib, preset, batch: quantize_torchao(model, calib, preset, batch, keep_fp=keep_fp)
    return lambda model, calib, preset, batch: quantize_modelopt(model, calib, peer.setting, batch, preset=preset,
                                                                 keep_fp=keep_fp)


def _peer_row(method: str, peer: PeerMethod) -> None:
    @register_method(method, peer.label)
    def build_row(bases: BaseModels, config: RunConfig, preset_name: str) -> Variant:
        check_peer_row(method, preset_name)  # fail before the FP row is sampled
        preset = preset_name.strip().upper()
        batch_size = config.calibration.batch_size
        keep_fp = kept_fp_layers(bases.model, fp_layer_roles(config.fp_layers))  # what tadq's rows keep in float
        quantize = _builder(method, peer, keep_fp)
        name = method_label(method) + (" (bits retargeted)" if preset in peer.retargeted else "")

        def describe(denoiser: nn.Module) -> dict[str, Any]:
            return {"peer": peer_report(denoiser).to_dict()}

        settings = {"method": method, "peer": peer.distribution, "version": tool_version(peer.distribution),
                    "setting": peer.setting, "preset": preset, "batch_size": batch_size}
        if keep_fp:  # only then: the settings (and cell keys) of runs without kept layers stay as they were
            settings["keep_fp"] = list(keep_fp)
        return Variant(name, preset, lambda: quantize(bases.model, bases.calibration, preset, batch_size), settings,
                       describe)


for _method, _peer in PEERS.items():
    _peer_row(_method, _peer)
