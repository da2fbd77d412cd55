"""Rows of the main job's table: a registry of methods, each turning (base models, run config, preset) into a
``Variant``, so a new method adds its rows without touching ``tadq.experiments.run``.

Correction rows reuse the base row's quantized network through ``BaseModels``, which builds each base config once
and keeps it on disk (an interrupted run does not redo a reconstruction).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from tadq.api import quantize
from tadq.config import QuantConfig, config_to_dict
from tadq.corrections.fp_cache import FPTrajectoryCache
from tadq.denoiser import QuantizedDenoiser
from tadq.fsguard import mark_output
from tadq.io import load_quantized, save_quantized
from tadq.recipe import NaiveMethod, QDiffusionMethod, Recipe
from tadq.safefiles import finite_float
from tadq.sampling import ConditionSource
from tadq.tfmq import TFMQMethod, tfmq_tag
from tadq.utils import atomic_write_json

if TYPE_CHECKING:
    from tadq.experiments.run import RunConfig

logger = logging.getLogger(__name__)
# the methods whose every setting is in the QuantConfig: the base-model key needs nothing more of them
_QUANT_CONFIG_METHODS = (NaiveMethod, QDiffusionMethod)

__all__ = ["BaseModels", "MethodBuilder", "Variant", "method_label", "method_names", "register_method", "row_for"]


@dataclass(frozen=True)
class Variant:
    """One row of the table: a name, bit label and how to build its denoiser (``None`` = the FP model)."""

    name: str
    bits: str
    build: Callable[[], nn.Module] | None
    settings: dict[str, Any]
    describe: Callable[[nn.Module], dict[str, Any]] | None = None  # extra results kept with the cell


class BaseModels:
    """Quantized base models, built once per config and kept on disk (``out/models``) so that correction rows
    reuse exactly the base row's weights, also after an interrupted run."""

    def __init__(self, model, scheduler, calibration, fingerprint: str, folder: Path, *,
                 conditions: ConditionSource | None = None, pipeline_source: Path | None = None) -> None:
        self.model, self.scheduler, self.calibration = model, scheduler, calibration
        self.fingerprint, self.folder = fingerprint, folder
        self.conditions = conditions  # of the correction fits (the calibration prompts or labels)
        # the FP pipeline folder whose other components (VAE, text encoders) each saved base keeps, as `tadq
        # quantize` writes it, so `tadq sample` runs the base; None: a denoiser-only artefact
        self.pipeline_source = pipeline_source
        # every correction row of the run fits on the same calibration noise: its FP side is walked once
        self.fp_trajectories = FPTrajectoryCache(model)

    def get(self, spec: Recipe | QuantConfig, build: Callable[[], QuantizedDenoiser] | None = None, tag: str = "",
            cache_dir: str | None = None) -> QuantizedDenoiser:
        """The model of ``spec`` (a base recipe, or a bare ``QuantConfig``): loaded from disk, or built (``build``,
        default ``tadq.quantize``) and saved.

        ``tag`` names a different construction of the same ``QuantConfig`` (a TFMQ recipe tags itself with
        ``tfmq_tag``); it enters the key.
        """
        quant_config = spec.quant_config() if isinstance(spec, Recipe) else spec
        if isinstance(spec, Recipe) and isinstance(spec.method, TFMQMethod) and not tag:
            tag = tfmq_tag(spec.method.tfmq)
        fields = {"model": self.fingerprint, "quant": config_to_dict(quant_config),
                  "calibration": self.calibration.key}
        if tag:
            fields["tag"] = tag
        if isinstance(spec, Recipe) and not isinstance(spec.method, _QUANT_CONFIG_METHODS):
            # settings the QuantConfig does not hold (SVDQuant's α grid and seed, a TFMQ base's SVDQuant settings):
            # another value builds another network, which must not be read back from the old one's folder
            fields["method"] = config_to_dict(spec.method)
        payload = json.dumps(fields, sort_keys=True)
        key = hashlib.sha256(payload.encode()).hexdigest()[:16]
        path = self.folder / f"{quant_config.method}-{quant_config.label}-{key}"
        # beside the artefact, not in it: a file added after its manifest would make `tadq verify` call it damaged
        timing = self.folder / f"timing-{path.name}.json"
        if (path / "tadq_config.json").exists():
            qmodel = self._load_kept(path, timing)
            if qmodel is not None:
                return qmodel
        t0 = time.perf_counter()
        if build is None:
            reconstructs = quant_config.method == "qdiffusion"  # the only method with a checkpoint to resume
            qmodel = quantize(self.model, self.scheduler, spec, calibration=self.calibration, cache_dir=cache_dir,
                              checkpoint=self.folder / f"recon-{key}.pt" if reconstructs else None,
                              conditions=self.conditions)
        else:
            qmodel = build()
        elapsed = time.perf_counter() - t0
        self.folder.mkdir(parents=True, exist_ok=True)
        mark_output(self.folder, "base-models")  # so `tadq bench --models-dir` may fill it again
        save_quantized(qmodel, path, self.scheduler, overwrite=True, pipeline_source=self.pipeline_source)
        atomic_write_json({"quantize_s": elapsed}, timing)
        (self.folder / f"recon-{key}.pt").unlink(missing_ok=True)
        return qmodel

    @staticmethod
    def _load_kept(path: Path, timing: Path) -> QuantizedDenoiser | None:
        """The model an earlier run kept at ``path``, or ``None`` (a warning said why) when it is damaged or
        incomplete: it is rebuilt then, never used."""
        try:
            qmodel = load_quantized(path)[0]
        except (ValueError, OSError) as error:  # ArtefactDamaged, DamagedFileError, a missing file, a bad config
            logger.warning("the base model %s kept by an earlier run cannot be used (%s); building it again", path,
                           str(error).splitlines()[0][:300])
            return None
        older = path / "tadq_run_timing.json"  # where a tadq before this one wrote it: moved beside the artefact
        if older.exists() and not timing.exists():
            atomic_write_json({"quantize_s": _recorded_seconds(older)}, timing)
        older.unlink(missing_ok=True)
        # reported, not re-spent (NaN: saved by an older tadq that did not record it, or an unreadable record)
        qmodel.recorded_quantize_s = _recorded_seconds(timing) if timing.exists() else math.nan
        return qmodel


def _recorded_seconds(path: Path) -> float:
    """``quantize_s`` of a timing record; NaN when it is not a finite number (a damaged or foreign file)."""
    try:
        value = json.loads(path.read_text(encoding="utf-8")).get("quantize_s")
    except (OSError, ValueError, AttributeError):
        return math.nan
    return float(value) if finite_float(value) else math.nan


MethodBuilder = Callable[[BaseModels, "RunConfig", str], Variant]
_METHODS: dict[str, tuple[str, MethodBuilder]] = {}


def register_method(name: str, label: str) -> Callable[[MethodBuilder], MethodBuilder]:
    """Register ``builder(bases, run_config, preset) -> Variant`` as method ``name`` (shown as ``label``)."""

    def decorate(builder: MethodBuilder) -> MethodBuilder:
        if name in _METHODS:
            raise ValueError(f"method {name!r} is already registered")
        _METHODS[name] = (label, builder)
        return builder

    return decorate


def method_names() -> tuple[str, ...]:
    """Every registered method, in registration order."""
    return tuple(_METHODS)


def method_label(name: str) -> str:
    """The table label of method ``name``."""
    return _METHODS[name][0]


def row_for(name: str, bases: BaseModels, config: RunConfig, preset_name: str) -> Variant:
    """The ``Variant`` of method ``name`` at ``preset_name``."""
    if name not in _METHODS:
        raise ValueError(f"unknown method {name!r}; choose from {sorted(_METHODS)}")
    return _METHODS[name][1](bases, config, preset_name)
