"""``TFMQCorrection``: TFMQ-DM's per-step state as a member of ``QuantizedDenoiser.corrections``.

TFMQ acts inside the network, not on the sampler's tensors, so every hook returns its input unchanged; the
correction owns the per-step tables (saved in ``corrections.safetensors``), puts them into the network in
``prepare`` (``StepQuantizer``s for FSC, ``CachedFeature`` hooks for cached temporal features). The sampler step
comes from the loop: the walker calls ``QuantizedDenoiser.set_step`` → ``TFMQCorrection.set_step`` before each
denoiser call and clears it after, so a network called outside a sampling step raises instead of reusing a stale
step.

The tables are keyed to the grid they were built for, (``sampler_key``, S, and the timestep of every step):
using them with another sampler raises ``ValueError`` (the authors' code silently assumes the calibration S and
uniform spacing, docs/methods/tfmq.md). They are not fitted on a ``TrajectoryPair`` (``keyed = False``): they come from
``tadq.tfmq.quantize_tfmq``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from tadq.corrections.base import Correction
from tadq.corrections.pair import TrajectoryPair
from tadq.registry import register_correction
from tadq.sampling import StepContext
from tadq.tfmq.cache import CachedFeature, LabelCapture, cache_bytes, dequantize_cache, quantize_cache
from tadq.tfmq.config import TFMQConfig
from tadq.tfmq.fsc import StepState, install_step_quantizers, remove_step_quantizers

__all__ = ["TFMQCorrection"]

TABLES: dict[str, torch.dtype] = {
    "grid_timesteps": torch.long,  # (S,) the timestep of every step
    "fsc_scale": torch.float32,  # (S, Q) Δ per step and FSC quantizer
    "fsc_zero_point": torch.float32,  # (S, Q)
    "cache_values": torch.float32,  # (S, [K,] ΣC) exact FP features of the cached blocks, concatenated
    "cache_codes": torch.uint8,  # (S, [K,] ΣC) the same, quantized per (step, block)
    "cache_scale": torch.float32,  # (S, B) Δ per step and cached block
    "cache_zero_point": torch.float32,  # (S, B)
}


@register_correction(TFMQConfig)
class TFMQCorrection(Correction):
    """TFMQ-DM's FSC ranges and temporal-feature cache for one quantized network (docs/methods/tfmq.md).

    Attributes:
        sampler_key: ``SamplerConfig.key`` of the grid the tables belong to (``None`` while empty).
        fsc_quantizers: qualified names of the per-step activation quantizers, in table-column order.
        cache_layers: ``(time projection, offset, channels)`` of each cached feature in the cache tables.
        cache_storage: ``"fp"``, ``"quantized"`` or ``None`` (no cache).
        num_labels: K for class-conditional tables (0 otherwise).
        report: JSON-ready results of quantization (TIAR losses, disturbance choices, cache size).
    """

    keyed: ClassVar[bool] = False

    def __init__(self, config: TFMQConfig) -> None:
        super().__init__(config)
        for name, dtype in TABLES.items():
            self.register_buffer(name, torch.zeros(0, dtype=dtype))
        self.sampler_key: str | None = None
        self.fsc_quantizers: list[str] = []
        self.cache_layers: list[tuple[str, int, int]] = []
        self.cache_storage: str | None = None
        self.num_labels = 0
        self.report: dict[str, Any] = {}
        self.state: StepState | None = None  # set by ``prepare``
        self._handles: list = []

    # -- building the tables (tadq.tfmq.pipeline) -----------------------------------------------------------------
    @property
    def num_steps(self) -> int:
        return int(self.grid_timesteps.numel())

    @property
    def active(self) -> bool:
        """Whether there are per-step tables to put into a network."""
        return self.sampler_key is not None and bool(self.fsc_quantizers or self.cache_layers)

    def set_grid(self, sampler_key: str, timesteps: Tensor) -> None:
        self.sampler_key = sampler_key
        self.grid_timesteps = timesteps.detach().long().clone()

    def set_fsc(self, names: list[str], scales: Tensor, zero_points: Tensor) -> None:
        """Per-step ranges (S, Q) of the quantizers ``names``."""
        if scales.shape != (self.num_steps, len(names)) or zero_points.shape != scales.shape:
            raise ValueError(f"FSC tables must be (S={self.num_steps}, Q={len(names)}), got {tuple(scales.shape)}")
        self.fsc_quantizers = list(names)
        self.fsc_scale, self.fsc_zero_point = scales.float().clone(), zero_points.float().clone()

    def set_cache(self, features: dict[str, Tensor], storage: str | None, bits: int, num_labels: int) -> None:
        """Cache ``features`` (time projection → (S, [K,] C)) as ``storage`` (``"fp"``/``"quantized"``)."""
        if features and storage == "quantized":
            self.set_quantized_cache({layer: quantize_cache(values, bits) for layer, values in features.items()},
                                     num_labels)
            return
        if features and storage != "fp":
            raise ValueError(f"cache storage must be 'fp' or 'quantized', got {storage!r}")
        self._clear_cache(features, "fp", num_labels)
        if features:
            self.cache_values = torch.cat([v.float() for v in features.values()], dim=-1)
            self.report["cache_bytes"] = self.cache_size_bytes()

    def set_quantized_cache(self, parts: dict[str, tuple[Tensor, Tensor, Tensor]], num_labels: int) -> None:
        """Cache features already quantized per step: time projection → ``quantize_cache``'s (codes, Δ, z), which
        ``apply_tfmq`` builds a few steps at a time rather than from every step's float features at once."""
        self._clear_cache({layer: codes for layer, (codes, _, _) in parts.items()}, "quantized", num_labels)
        if parts:
            self.cache_codes = torch.cat([codes for codes, _, _ in parts.values()], dim=-1)
            self.cache_scale = torch.stack([scale for _, scale, _ in parts.values()], dim=1)
            self.cache_zero_point = torch.stack([zero_point for _, _, zero_point in parts.values()], dim=1)
            self.report["cache_bytes"] = self.cache_size_bytes()

    def _clear_cache(self, features: dict[str, Tensor], storage: str, num_labels: int) -> None:
        """Empty cache tables, and the layout (layer, offset, channels) of ``features`` stored as ``storage``."""
        self.cache_layers, offset = [], 0
        for layer, values in features.items():
            self.cache_layers.append((layer, offset, int(values.shape[-1])))
            offset += int(values.shape[-1])
        self.cache_storage = storage if features else None
        self.num_labels = num_labels
        for name in ("cache_values", "cache_codes", "cache_scale", "cache_zero_point"):
            setattr(self, name, torch.zeros(0, dtype=TABLES[name]))

    def cached_features(self) -> dict[str, Tensor]:
        """Time projection → the feature the cache serves, (S, [K,] C) (dequantized for quantized storage)."""
        served = {}
        for position, (layer, offset, channels) in enumerate(self.cache_layers):
            if self.cache_storage == "fp":
                served[layer] = self.cache_values[..., offset: offset + channels]
            else:
                served[layer] = dequantize_cache(self.cache_codes[..., offset: offset + channels],
                                                 self.cache_scale[:, position], self.cache_zero_point[:, position])
        return served

    def cache_size_bytes(self) -> int:
        """Bytes the cache takes at its storage precision (codes packed at ``cache_bits``, plus (Δ, z) pairs)."""
        if self.cache_storage is None:
            return 0
        if self.cache_storage == "fp":
            return cache_bytes(self.cache_values.numel(), None, 0)
        return cache_bytes(self.cache_codes.numel(), self.config.cache_bits, self.cache_scale.numel())

    # -- structure ----------------------------------------------------------------------------------------------
    def prepare(self, model: nn.Module, adapter: Any) -> nn.Module:
        """Put the tables into ``model``: per-step quantizers and cached features (idempotent; no-op when empty)."""
        self.release(model)
        if not self.active:
            return model
        state = StepState(self.num_steps)
        if self.fsc_quantizers:
            install_step_quantizers(model, self.fsc_quantizers, self.fsc_scale, self.fsc_zero_point, state)
        for layer, values in self.cached_features().items():
            try:
                module = model.get_submodule(layer)
            except AttributeError:
                module = None
            if module is None or getattr(module, "out_features", values.shape[-1]) != values.shape[-1]:
                self.release(model)
                found = "no module" if module is None else f"a layer of {module.out_features} features"
                raise ValueError(f"TFMQ's cache holds {values.shape[-1]} features of {layer}, which is {found} of "
                                 f"this {type(model).__name__}: the tables belong to another network structure")
            self._handles.append(module.register_forward_hook(CachedFeature(values, state)))
        if self.cache_layers and self.num_labels:
            self._handles.append(model.register_forward_pre_hook(LabelCapture(state), with_kwargs=True))
        self.state = state
        return model

    def release(self, model: nn.Module) -> nn.Module:
        """Undo ``prepare`` on ``model``: single-range quantizers back, cache hooks removed."""
        remove_step_quantizers(model)
        for handle in self._handles:
            handle.remove()
        self._handles, self.state = [], None
        return model

    @contextmanager
    def at_step(self, index: int) -> Iterator[None]:
        """Call the prepared network directly at sampler step ``index`` (outside ``tadq.sample``)."""
        if self.state is None:
            raise RuntimeError("TFMQCorrection is not attached to a network: call prepare(model, adapter) first")
        with self.state.at(index):
            yield

    def check_grid(self, step: StepContext) -> None:
        """Raise ``ValueError`` unless ``step`` lies on the grid the tables were built for."""
        if step.sampler_key != self.sampler_key or step.num_steps != self.num_steps:
            raise ValueError(f"TFMQ's per-step tables were calibrated for {self.sampler_key} ({self.num_steps} steps) "
                             f"but are used with {step.sampler_key} ({step.num_steps} steps); rebuild them for "
                             "this sampler with tadq.tfmq.apply_tfmq (same weights, seconds), or sample with "
                             f"{self.sampler_key}")
        expected = int(self.grid_timesteps[step.index])
        if step.t != expected:
            raise ValueError(f"step {step.index} has timestep {step.t}, but TFMQ's tables were built for timestep "
                             f"{expected} there (another timestep spacing); rebuild them for this scheduler")

    def check_plan(self, steps: Sequence[StepContext]) -> None:
        """``check_grid`` for every step of a plan before the loop starts (the base class checks keyed tables
        only): a grid that agrees at its first steps (DDIM 50 'trailing' vs 'linspace': 999, 979, then 959 vs 958)
        was refused mid-walk, after the steps before had run."""
        if self.active:
            for step in steps:
                self.check_grid(step)

    # -- the step, from the walker; hooks stay identity on the sampler's tensors ---------------------------------
    def set_step(self, step: StepContext | None) -> None:
        """Point the network's per-step tables at ``step`` (``None`` clears it); called by the sampling walker
        through ``QuantizedDenoiser.set_step`` around every denoiser call, so the step comes from the loop."""
        if self.state is None:
            if self.active and step is not None:
                raise RuntimeError("TFMQCorrection has tables but no network: call prepare(model, adapter) first")
            return
        if step is None:
            self.state.index = None
            return
        self.check_grid(step)
        self.state.index = step.index

    def before_model(self, x: Tensor, step: StepContext) -> Tensor:
        if self.state is None and self.active:
            raise RuntimeError("TFMQCorrection has tables but no network: call prepare(model, adapter) first")
        if self.state is not None:
            self.check_grid(step)  # a wrong grid fails before the network runs
        return x

    def fit_tables(self, pair: TrajectoryPair) -> None:
        raise TypeError("TFMQ's tables are not fitted on a trajectory pair: build them with tadq.tfmq.quantize_tfmq")

    # -- serialisation ------------------------------------------------------------------------------------------
    def get_extra_state(self) -> dict[str, Any]:
        return {**super().get_extra_state(), "sampler_key": self.sampler_key, "fsc_quantizers": self.fsc_quantizers,
                "cache_layers": [list(entry) for entry in self.cache_layers], "cache_storage": self.cache_storage,
                "num_labels": self.num_labels, "report": self.report}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        super().set_extra_state(state)
        self.sampler_key = state.get("sampler_key")
        self.fsc_quantizers = list(state.get("fsc_quantizers", []))
        entries = state.get("cache_layers", [])
        self.cache_layers = [(str(name), int(offset), int(size)) for name, offset, size in entries]
        self.cache_storage = state.get("cache_storage")
        self.num_labels = int(state.get("num_labels", 0))
        self.report = dict(state.get("report", {}))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        for name in TABLES:  # empty placeholders take the saved shapes before the copy
            incoming = state_dict.get(prefix + name)
            if isinstance(incoming, Tensor):
                self._buffers[name] = torch.empty(incoming.shape, dtype=TABLES[name])
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if prefix + "_extra_state" in state_dict:  # tables and their layout both loaded (torch sets extra state last)
            self.check_tables()

    def check_tables(self) -> None:
        """Refuse tables and a layout ``quantize_tfmq`` cannot have written, before they reach a network.

        Loaded from ``corrections.safetensors``: an edited cache Δ (0, −1), zero point (7 or 1.5 on a 2-bit grid) or
        code (200), a ``cache_storage`` that is neither ``"fp"`` nor ``"quantized"``, or a layout whose offsets miss
        the table's columns loaded and sampled another model without a word. The FSC ranges are checked against each
        quantizer's grid when ``prepare`` installs them (``install_step_quantizers``).

        Raises:
            ValueError: the first inconsistency, naming the table or field.
        """
        steps = self.num_steps
        if self.sampler_key is not None and not isinstance(self.sampler_key, str):
            raise ValueError(f"TFMQ sampler_key is {self.sampler_key!r}, not a sampler key")
        names = self.fsc_quantizers
        wrong = [name for position, name in enumerate(names) if not isinstance(name, str) or name in names[:position]]
        if wrong:
            raise ValueError(f"TFMQ fsc_quantizers must be distinct module names; {wrong[:3]} repeat an earlier one "
                             "or are not names")
        for table in ("fsc_scale", "fsc_zero_point"):
            shape = list(getattr(self, table).shape)
            if (names or shape != [0]) and shape != [steps, len(names)]:
                raise ValueError(f"TFMQ table {table} is {shape}, but its {len(names)} quantizers on {steps} steps "
                                 f"need [{steps}, {len(names)}]")
        if self.cache_storage not in (None, "fp", "quantized"):
            raise ValueError(f"TFMQ cache_storage is {self.cache_storage!r}, not 'fp', 'quantized' or null")
        if bool(self.cache_layers) != (self.cache_storage is not None):
            raise ValueError(f"TFMQ cache_storage is {self.cache_storage!r} for {len(self.cache_layers)} cached "
                             "features")
        width = 0
        for layer, offset, channels in self.cache_layers:
            if offset != width or channels < 1:
                raise ValueError(f"TFMQ cache layout: {layer} at columns [{offset}, {offset + channels}) does not "
                                 f"follow the previous feature's end ({width})")
            width += channels
        used = {"fp": ("cache_values",), "quantized": ("cache_codes",), None: ()}[self.cache_storage]
        for table in ("cache_values", "cache_codes"):
            shape = list(getattr(self, table).shape)
            wanted = [steps, *([self.num_labels] if self.num_labels else []), width] if table in used else [0]
            if shape != wanted:
                raise ValueError(f"TFMQ table {table} is {shape}, but its cache layout ({self.cache_storage}, "
                                 f"{len(self.cache_layers)} features of {width} channels, {self.num_labels} labels, "
                                 f"{steps} steps) needs {wanted}")
        quantized = self.cache_storage == "quantized"
        for table in ("cache_scale", "cache_zero_point"):
            shape = list(getattr(self, table).shape)
            wanted = [steps, len(self.cache_layers)] if quantized else [0]
            if shape != wanted:
                raise ValueError(f"TFMQ table {table} is {shape}, but its cache layout needs {wanted}")
        if quantized:
            top = 2**self.config.cache_bits - 1
            scale, zero_point, codes = self.cache_scale, self.cache_zero_point, self.cache_codes
            valid = torch.isfinite(scale) & (scale > 0)
            if not bool(valid.all()):
                raise ValueError(f"TFMQ table cache_scale holds a step size {scale[~valid].reshape(-1)[0].item()}; "
                                 "every Δ must be finite and > 0")
            if not bool(((zero_point == zero_point.round()) & (zero_point >= 0) & (zero_point <= top)).all()):
                raise ValueError("TFMQ table cache_zero_point holds a zero point off the "
                                 f"{self.config.cache_bits}-bit cache grid (integers in [0, {top}])")
            if codes.numel() and int(codes.max()) > top:
                raise ValueError(f"TFMQ table cache_codes holds code {int(codes.max())}, beyond the "
                                 f"{self.config.cache_bits}-bit cache grid [0, {top}]")

    def extra_repr(self) -> str:
        if not self.active:
            return f"{self.config}, empty"
        return (f"{self.sampler_key}, FSC on {len(self.fsc_quantizers)} quantizers, {len(self.cache_layers)} cached "
                f"features ({self.cache_storage})")
