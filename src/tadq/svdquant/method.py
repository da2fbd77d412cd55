"""``SVDQuantMethod``: SVDQuant (smoothing + low-rank FP branch + quantized residual) as a ``Recipe.method``.

Per quantized layer, on inputs recorded from the FP network along the calibration trajectories:

1. migration strength α from ``alpha_grid`` (and "no smoothing"), chosen by the layer's output MSE after
   quantization: s_j = max|x_j|^α / max|W_:j|^(1−α);
2. W̃ = W·diag(s)·Hᵀ (H when the activation scheme rotates), split as U·D + R by a randomized rank-r SVD;
3. R quantized at the weight bits (per-channel range search), x̃ = H·(x/s) at the activation scheme's granularity.

The structure (which layers carry ``smooth``, a rotation, a branch of which rank) comes from the schemes
(``QScheme.smoothing``, ``rotation``, ``lowrank_rank``) so loading rebuilds it; the values this module fits are
state tensors saved with the artefact. docs/methods/svdquant.md has the ablation that chose the defaults.
"""

from __future__ import annotations

import numbers
import time
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from tadq.calibration import CalibrationSet
from tadq.calibration.observers import RangeObserver
from tadq.config import ReconstructionConfig
from tadq.denoiser import QuantizedDenoiser
from tadq.quant.granularity import dynamic_fake_quantize
from tadq.quant.lowrank import lowrank_split
from tadq.quant.quantizer import Quantizer, quantizers_bypassed
from tadq.quant.ranges import estimate_range
from tadq.quant.rotation import fold_rotation, rotate_channels
from tadq.quant.smoothing import channel_absmax, smooth_input, smooth_weight, smoothing_factors, weight_input_absmax
from tadq.quant.transformed import TransformedQuantConv2d, TransformedQuantLayer
from tadq.sampling import check_seed

__all__ = ["SVDQuantMethod", "LayerFit", "apply_svdquant", "transformed_layers"]


@dataclass(frozen=True)
class SVDQuantMethod:
    """SVDQuant's fitting settings (the structure is in the schemes: ``lowrank_rank``, ``smoothing``, ``rotation``).

    Args:
        alpha_grid: migration strengths tried per layer (plus "no smoothing"); [RECON] SVDQuant searches α per
            layer, the grid is ours.
        search_samples: calibration inputs (spread over the kept steps) the per-layer search runs on.
        svd_niter: power iterations of the randomized SVD (``tadq.quant.lowrank``).
        svd_oversample: extra columns of its random sketch.
        seed: seeds the SVD sketch and the search's activation subsampling.
    """

    base_method: ClassVar[str] = "svdquant"
    alpha_grid: tuple[float, ...] = (0.2, 0.35, 0.5, 0.65, 0.8)
    search_samples: int = 128
    svd_niter: int = 4
    svd_oversample: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        grid = self.alpha_grid
        # a string was split into characters ("0.5" -> float(".") failed); None or a bool is no strength either
        if isinstance(grid, str) or not all(isinstance(a, numbers.Real) and not isinstance(a, bool) for a in grid):
            raise ValueError(f"SVDQuantMethod.alpha_grid must be a sequence of numbers in [0, 1], got {grid!r}")
        object.__setattr__(self, "alpha_grid", tuple(float(a) for a in grid))
        if not self.alpha_grid or any(not 0.0 <= a <= 1.0 for a in self.alpha_grid):
            raise ValueError(f"SVDQuantMethod.alpha_grid values must be in [0, 1], got {self.alpha_grid}")
        check_seed("SVDQuantMethod.seed", self.seed)
        for name in ("search_samples", "svd_niter", "svd_oversample"):  # 2.5 failed deep inside quantize before
            least, value = (1 if name == "search_samples" else 0), getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"SVDQuantMethod.{name} must be an int >= {least}, got {value!r}")

    @property
    def reconstruction(self) -> ReconstructionConfig:
        return ReconstructionConfig()  # unused; what QuantConfig records for a model without reconstruction


@dataclass(frozen=True)
class LayerFit:
    """What the search chose for one layer: α (``None``: no smoothing won), the branch rank, and the layer's
    quantized-output MSE on the search inputs without smoothing (``mse_plain``) and with the choice."""

    name: str
    alpha: float | None
    rank: int
    mse_plain: float
    mse_chosen: float

    def to_json(self) -> dict[str, object]:
        return {"name": self.name, "alpha": self.alpha, "rank": self.rank, "mse_plain": self.mse_plain,
                "mse_chosen": self.mse_chosen}


def transformed_layers(qmodel: QuantizedDenoiser) -> dict[str, TransformedQuantLayer]:
    """Every transformed quantized layer, by qualified name."""
    return {name: m for name, m in qmodel.model.named_modules() if isinstance(m, TransformedQuantLayer)}


RECORD_BYTES = 1 << 31
"""At most about this many bytes of recorded layer inputs are held at once. All layers' inputs on 128 search
samples at once is tens of GB on a DiT-XL or an SD UNet, so the layers are recorded and fitted in groups that fit
this size, one pass over the search samples per group. The bypassed forward does not depend on the fits and the
fits are written into the layers only after every group is recorded, so any grouping gives the same network."""


def _search_rows(calibration: CalibrationSet, settings: SVDQuantMethod) -> Tensor:
    """The ``search_samples`` calibration rows the search runs on, spread over the set."""
    count = min(settings.search_samples, len(calibration))
    return torch.linspace(0, len(calibration) - 1, count).round().long()


@torch.no_grad()
def _record_inputs(qmodel: QuantizedDenoiser, layers: dict[str, TransformedQuantLayer], calibration: CalibrationSet,
                   rows: Tensor, batch_size: int) -> dict[str, Tensor]:
    """Each layer's FP input (before its transform) on the calibration ``rows``."""
    seen: dict[str, list[Tensor]] = {name: [] for name in layers}
    handles = [layer.register_forward_pre_hook(lambda m, args, name=name: seen[name].append(args[0].detach()))
               for name, layer in layers.items()]
    device = calibration.x.device
    try:
        with quantizers_bypassed(qmodel.model):
            for start in range(0, len(rows), batch_size):
                index = rows[start:start + batch_size].to(device)
                cond = None if calibration.cond is None else calibration.cond.rows(index)
                qmodel(calibration.x[index], calibration.t[index], cond)
    finally:
        for handle in handles:
            handle.remove()
    return {name: torch.cat(chunks) for name, chunks in seen.items() if chunks}


def _record_groups(qmodel: QuantizedDenoiser, layers: dict[str, TransformedQuantLayer], calibration: CalibrationSet,
                   rows: Tensor, limit: int) -> list[dict[str, TransformedQuantLayer]]:
    """The reached layers in groups whose inputs on ``rows`` take at most ``limit`` bytes (a layer over it alone
    is a group of its own), sized from the inputs of one row."""
    sizes = {name: x.numel() * x.element_size() * len(rows)
             for name, x in _record_inputs(qmodel, layers, calibration, rows[:1], 1).items()}
    groups: list[dict[str, TransformedQuantLayer]] = []
    used = 0
    for name, layer in layers.items():
        if name not in sizes:  # never called in the forward: nothing to fit it on
            continue
        if not groups or used + sizes[name] > limit:
            groups.append({})
            used = 0
        groups[-1][name] = layer
        used += sizes[name]
    return groups


def _apply(layer: TransformedQuantLayer, x: Tensor, weight: Tensor) -> Tensor:
    if isinstance(layer, TransformedQuantConv2d):
        return F.conv2d(x, weight, None, layer.stride, layer.padding, layer.dilation)
    return F.linear(x, weight)


def _quantize_activation(layer: TransformedQuantLayer, x: Tensor, seed: int) -> Tensor:
    scheme = layer.input_quantizer.scheme
    if not scheme.enabled:
        return x
    if scheme.dynamic:
        return dynamic_fake_quantize(x, scheme, layer.input_channel_dim)
    observer = RangeObserver(scheme, values_per_batch=65536, seed=seed)  # what calibration will estimate
    observer.observe(x)
    probe = Quantizer(scheme, kind="activation")
    probe.set_range(*observer.range())
    return probe(x)


def _quantize_weight(layer: TransformedQuantLayer, weight: Tensor) -> Tensor:
    scheme = layer.weight_quantizer.scheme
    if not scheme.enabled:
        return weight
    probe = Quantizer(scheme, num_channels=weight.shape[0], kind="weight", row_size=weight[0].numel())
    probe.set_range(*estimate_range(weight, scheme))
    return probe(weight)


def _candidate(layer: TransformedQuantLayer, x: Tensor, weight: Tensor, factors: Tensor, settings: SVDQuantMethod
               ) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor]:
    """(residual, up, down, transformed input) of one smoothing candidate."""
    transformed_weight = smooth_weight(weight, factors)
    transformed_x = smooth_input(x, factors, layer.input_channel_dim)
    if layer.rotate:
        transformed_weight = fold_rotation(transformed_weight)
        transformed_x = rotate_channels(transformed_x, layer.input_channel_dim)
    if not layer.rank:
        return transformed_weight, None, None, transformed_x
    up, down, residual = lowrank_split(transformed_weight, layer.rank, niter=settings.svd_niter,
                                       oversample=settings.svd_oversample, seed=settings.seed)
    return residual, up, down, transformed_x


@dataclass(frozen=True)
class _Choice:
    """A layer's fitted state, written into it by ``_write`` once every layer is fitted."""

    fit: LayerFit
    factors: Tensor
    residual: Tensor
    up: Tensor | None
    down: Tensor | None


@torch.no_grad()
def _fit_layer(name: str, layer: TransformedQuantLayer, x: Tensor, settings: SVDQuantMethod) -> _Choice:
    """The best smoothing of one layer on its inputs ``x``, and its split; the layer itself is left unchanged."""
    current = layer.weight.detach()
    weight = fold_rotation(current) if layer.rotate else current  # the rotation is its own inverse
    reference = _apply(layer, x, weight)
    act_max, weight_max = channel_absmax(x, layer.input_channel_dim), weight_input_absmax(weight)
    alphas: list[float | None] = [None, *(settings.alpha_grid if layer.smooth is not None else ())]
    best: tuple[float, float | None, Tensor, tuple] | None = None
    plain = float("nan")
    for alpha in alphas:
        factors = torch.ones_like(act_max) if alpha is None else smoothing_factors(act_max, weight_max, alpha)
        residual, up, down, transformed_x = _candidate(layer, x, weight, factors, settings)
        output = _apply(layer, _quantize_activation(layer, transformed_x, settings.seed),
                        _quantize_weight(layer, residual))
        if up is not None:
            output = output + _branch(layer, transformed_x, up, down)
        error = float((output - reference).pow(2).mean())
        if alpha is None:
            plain = error
        if best is None or error < best[0]:
            best = (error, alpha, factors, (residual, up, down))
    assert best is not None
    error, alpha, factors, (residual, up, down) = best
    return _Choice(LayerFit(name, alpha, layer.rank, plain, error), factors, residual, up, down)


@torch.no_grad()
def _write(layer: TransformedQuantLayer, choice: _Choice) -> None:
    """Smoothing, residual, branch and the residual's weight range into the layer."""
    if layer.smooth is not None:
        layer.smooth.copy_(choice.factors)
    # through the parameter (no_grad), not ``.data``: its version counter moves, which the caches keyed on it (the
    # cross-attention K/V memo) need to see; ``.data.copy_`` writes without moving it
    layer.weight.copy_(choice.residual)
    if choice.up is not None:
        layer.lowrank_up.copy_(choice.up)
        layer.lowrank_down.copy_(choice.down)
    layer.init_weight_range()


def _branch(layer: TransformedQuantLayer, x: Tensor, up: Tensor, down: Tensor) -> Tensor:
    """U·(D·x̃): D with the layer's kernel geometry, U pointwise (as the layer's ``lowrank_branch``)."""
    if isinstance(layer, TransformedQuantConv2d):
        return F.conv2d(F.conv2d(x, down, None, layer.stride, layer.padding, layer.dilation), up[:, :, None, None])
    return F.linear(F.linear(x, down), up)


def apply_svdquant(qmodel: QuantizedDenoiser, calibration: CalibrationSet, settings: SVDQuantMethod,
                   batch_size: int = 128) -> tuple[list[LayerFit], float]:
    """Fit smoothing, branch and residual of every transformed layer in place; (per-layer fits, seconds).

    Activation ranges (static schemes) are left unset: calibrate them next, on the transformed inputs.
    """
    start = time.perf_counter()
    layers = transformed_layers(qmodel)
    rows = _search_rows(calibration, settings)
    choices: dict[str, _Choice] = {}
    for group in _record_groups(qmodel, layers, calibration, rows, RECORD_BYTES):
        inputs = _record_inputs(qmodel, group, calibration, rows, batch_size)
        choices |= {name: _fit_layer(name, layer, inputs[name], settings) for name, layer in group.items()}
        del inputs  # before the next group's are recorded
    for name, choice in choices.items():  # after every recording: the fits never see each other
        _write(layers[name], choice)
    return [choice.fit for choice in choices.values()], time.perf_counter() - start
