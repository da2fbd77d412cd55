"""What every peer shares: a clear error when the tool is missing, the calibration forward loop, and a record of
what the tool actually quantized (tools differ a lot here: torchao leaves every Conv2d in FP)."""

from __future__ import annotations

import importlib
import importlib.metadata
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from tadq.calibration import CalibrationSet
    from tadq.sampling import Conditioning

__all__ = ["PeerNotInstalled", "PeerReport", "UnsupportedPreset", "calibration_batches", "check_kept_fp",
           "kept_fp_layers", "kept_fp_note", "layer_counts", "peer_report", "require", "tool_version"]

INSTALL_HINT = "pip install -e .[peers]"
_REPORT_ATTR = "tadq_peer_report"


class PeerNotInstalled(ImportError):
    """A peer tool (an optional benchmark extra) is not installed."""


class UnsupportedPreset(ValueError):
    """The tool has no setting close enough to this tadq preset; the message names what it supports."""


def require(module: str, distribution: str) -> ModuleType:
    """Import ``module`` of the optional extra, or raise ``PeerNotInstalled`` saying how to get it."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise PeerNotInstalled(
            f"{distribution} is not installed or not importable ({error}); it is an optional benchmark extra: "
            f"{INSTALL_HINT}"
        ) from error


def tool_version(distribution: str) -> str:
    """The installed version of ``distribution`` (recorded with every peer row)."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def layer_counts(model: nn.Module) -> tuple[int, int]:
    """(Conv2d count, Linear count) of ``model``: the layers tadq quantizes, the denominator of coverage."""
    convs = sum(isinstance(module, nn.Conv2d) for module in model.modules())
    linears = sum(isinstance(module, nn.Linear) for module in model.modules())
    return convs, linears


def kept_fp_layers(model: nn.Module, roles: tuple[str, ...]) -> tuple[str, ...]:
    """Qualified names of ``model``'s layers with an adapter role in ``roles`` (``tadq.config.fp_layer_roles``):
    what a peer leaves in floating point when tadq's rows keep those roles in float, so both compare like for
    like."""
    if not roles:
        return ()
    from tadq.registry import adapter_for

    return tuple(info.name for info in adapter_for(model).layers(model) if info.role in roles)


def kept_fp_note(count: int) -> str:
    """The report's words for ``count`` layers a peer left in float because tadq's rows keep them ("" for none)."""
    return f"{count} layers kept in FP as in tadq's rows" if count else ""


def check_kept_fp(model: nn.Module, names: tuple[str, ...]) -> None:
    """``ValueError`` for a name in ``names`` that is not a Conv2d/Linear of ``model`` (a typo would otherwise
    quantize the layer the caller meant to keep in float)."""
    layers = {name for name, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)}
    unknown = [name for name in names if name not in layers]
    if unknown:
        raise ValueError(f"keep_fp names {unknown} are not Conv2d/Linear layers of the model")


def calibration_batches(calibration_set: CalibrationSet, batch_size: int,
                        seed: int = 0) -> Iterator[tuple[Tensor, Tensor, Conditioning | None]]:
    """(x_t, t, cond) batches of the FP-trajectory calibration inputs in a fixed shuffled order.

    Shuffled because the set is stored noisiest step first and some tools (quanto) keep a running average of
    ranges: every batch then mixes all timesteps, as a user's shuffled data loader would. ``cond`` is what the
    network was told with each input (prompt embeddings, labels; under guidance both branches appear as rows), so
    a peer calibrates a conditional model on the activations it will see; ``None`` for unconditional models.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = torch.randperm(len(calibration_set), generator=torch.Generator().manual_seed(seed))
    for start in range(0, len(order), batch_size):
        index = order[start: start + batch_size]
        cond = calibration_set.cond.rows(index) if calibration_set.cond is not None else None
        yield calibration_set.x[index], calibration_set.t[index], cond


@dataclass(frozen=True)
class PeerReport:
    """What one tool did to the model: its version and setting, and how many Conv2d/Linear layers it quantized.

    ``weights``/``activations``: layers whose weights / inputs the tool quantizes; ``convs``/``linears``: how many of
    those quantized-weight layers are Conv2d / Linear; ``conv_total``/``linear_total``: the model's layers.
    """

    tool: str
    version: str
    setting: str
    weights: int
    activations: int
    convs: int
    linears: int
    conv_total: int
    linear_total: int
    notes: str = ""

    @property
    def total(self) -> int:
        return self.conv_total + self.linear_total

    @property
    def scope(self) -> str:
        """Which layer kinds were touched, in words."""
        if self.convs == 0 and self.linears > 0:
            return "Linear only"
        if self.linears == 0 and self.convs > 0:
            return "Conv2d only"
        if self.convs == self.conv_total and self.linears == self.linear_total:
            return "all Conv2d + Linear"
        return f"{self.convs} Conv2d + {self.linears} Linear"

    @property
    def summary(self) -> str:
        """One line for a table note, e.g. ``torchao 0.18.0 (...): 29 of 64 layers (Linear only)``."""
        line = f"{self.tool} {self.version} ({self.setting}): {self.weights} of {self.total} layers ({self.scope})"
        if self.activations != self.weights:
            line += f", inputs quantized in {self.activations}"
        return f"{line}; {self.notes}" if self.notes else line

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "total": self.total, "scope": self.scope, "summary": self.summary}


def attach_report(model: nn.Module, report: PeerReport) -> nn.Module:
    """Keep ``report`` on the quantized copy (a plain attribute: not a parameter, not in the state dict)."""
    setattr(model, _REPORT_ATTR, report)
    return model


def peer_report(model: nn.Module) -> PeerReport:
    """The ``PeerReport`` of a model returned by one of ``tadq.experiments.peers``' functions."""
    report = getattr(model, _REPORT_ATTR, None)
    if not isinstance(report, PeerReport):
        raise ValueError("this model was not quantized by tadq.experiments.peers (no peer report attached)")
    return report
