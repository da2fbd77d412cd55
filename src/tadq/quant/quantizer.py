"""``Quantizer``: one tensor's fake-quantizer with explicit phases (observe → set range → quantize).

A plain forward never changes calibration state: ranges are only written by ``set_range`` (called by the
``Calibrate`` context or by weight initialisation), and observation only happens while an observer is attached.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Literal, Protocol

import torch
from torch import Tensor, nn

from tadq.quant.fake_quant import MIN_SCALE, fake_quantize, fp8_fake_quantize, grid_step, kernel_fake_quantize
from tadq.quant.granularity import dynamic_fake_quantize
from tadq.quant.qscheme import QScheme

__all__ = ["Quantizer", "Observer", "bypassing", "quantizers_bypassed"]


class Observer(Protocol):
    """Receives the tensors a quantizer sees while calibrating."""

    def observe(self, x: Tensor) -> None: ...


class Quantizer(nn.Module):
    """Fake-quantizer for one tensor.

    Args:
        scheme: bit-width, symmetry, granularity and range method.
        num_channels: number of output channels (dim 0 of the tensor) for per-channel and per-block schemes;
            1 otherwise.
        kind: ``"weight"`` (range set from the weight itself) or ``"activation"`` (range set by calibration
            data, inside the ``Calibrate`` phase).
        channel_dim: the dimension a dynamic (``per_token`` / ``per_group``) activation scheme groups along: 1 for
            a conv input (B, C, H, W), -1 for a linear input (..., C). Unused by static schemes.
        row_size: weights per output row (``weight[0].numel()``): a ``per_block`` weight scheme keeps
            ``num_channels × block_count(row_size)`` steps, and needs it.

    A dynamic scheme has no range to calibrate: its quantizer is initialized at construction, ``set_range`` leaves
    it alone, and every forward quantizes with the min/max of each token or group.
    """

    # what a forward derived from the buffers, kept with each buffer's identity and version counter (``_unchanged``)
    _ready_seen: tuple | None = None  # (initialized, its version) when it last read true
    _kernel_seen: tuple | None = None  # ((zero_point, version), (scale, version), (z, Δ) of the fused kernels)

    def __init__(self, scheme: QScheme, num_channels: int = 1, kind: Literal["weight", "activation"] = "activation",
                 channel_dim: int = -1, row_size: int | None = None) -> None:
        super().__init__()
        if kind not in ("weight", "activation"):
            raise ValueError(f"kind must be 'weight' or 'activation', got {kind!r}")
        if scheme.dynamic and kind != "activation":
            raise ValueError(f"{scheme.granularity} is an activation granularity; weights are per_channel or "
                             "per_tensor")
        if scheme.fp8 and kind != "activation":
            raise ValueError(f"{scheme.format} is an activation format: fp8 weights are not implemented; quantize "
                             "weights on the integer grid (format 'int')")
        blocked = scheme.granularity == "per_block"
        if blocked and kind != "weight":
            raise ValueError("per_block is a weight granularity (static blocks of each output row); an activation "
                             "is quantized per_tensor, or dynamically per_token / per_group")
        if blocked and (isinstance(row_size, bool) or not isinstance(row_size, int) or row_size < 1):
            raise ValueError(f"a per_block weight quantizer needs row_size, the weights per output row, got "
                             f"{row_size!r}")
        self.scheme = scheme
        self.kind = kind
        self.channel_dim = channel_dim
        self.row_size = row_size if blocked else None
        shape = (num_channels, scheme.block_count(row_size)) if blocked else (
            num_channels if scheme.granularity == "per_channel" else 1,)
        self.register_buffer("scale", torch.ones(shape, dtype=torch.float32))  # whatever default dtype is set
        self.register_buffer("zero_point", torch.zeros(shape, dtype=torch.float32))
        self.register_buffer("initialized", torch.tensor(scheme.dynamic))
        self._observer: Observer | None = None
        self.bypass = False  # set only by the ``quantizers_bypassed`` context (reconstruction's weight phase)
        self.rounding: nn.Module | None = None  # learned rounding (AdaRound) while a weight is being reconstructed
        self.register_state_dict_post_hook(_record_grid)
        self._register_load_state_dict_pre_hook(_refuse_off_grid_state, with_module=True)

    @property
    def enabled(self) -> bool:
        return self.scheme.enabled

    def attach_observer(self, observer: Observer | None) -> None:
        """Route the next forwards to ``observer`` (values pass through unquantized); ``None`` detaches."""
        self._observer = observer

    @torch.no_grad()
    def set_range(self, low: Tensor, high: Tensor) -> None:
        """Fix Δ and z from a clipping range (shape (C,) per channel or (1,) per tensor); a no-op for a dynamic
        scheme, whose ranges come from each tensor."""
        if not self.enabled or self.scheme.dynamic:
            return
        scale, zero_point = grid_step(low.float(), high.float(), self.scheme)
        bad = ~torch.isfinite(scale.reshape(-1))
        if bool(bad.any()):  # an inf/NaN Δ fake-quantizes every value to NaN or 0, silently
            grid = f"{self.scheme.format} scale" if self.scheme.fp8 else f"{self.scheme.bits}-bit step"
            first = int(bad.nonzero()[0])
            where = f"channel {first} of {scale.numel()}" if scale.numel() > 1 else "the tensor"
            if self.scheme.granularity == "per_block":  # (rows, blocks) flattened: name the row and its weights
                row, block = divmod(first, self.scale.shape[1])
                start = block * self.scheme.group_size
                stop = min(start + self.scheme.group_size, self.row_size)
                where = f"the block of weights {start}..{stop - 1} of output row {row} of {self.scale.shape[0]}"
            raise ValueError(f"{self.kind} range [{float(low.reshape(-1)[first]):.6g}, "
                             f"{float(high.reshape(-1)[first]):.6g}] "
                             f"of {where} has no finite {grid} (inf/NaN values, or a span beyond float32): check "
                             "the model's weights and calibration inputs, or exclude the layer")
        if scale.numel() != self.scale.numel():
            raise ValueError(f"range has {scale.numel()} entries, quantizer expects {self.scale.numel()}")
        self.scale.copy_(scale.reshape(self.scale.shape))
        self.zero_point.copy_(zero_point.reshape(self.zero_point.shape))
        self.initialized.fill_(True)

    def __getstate__(self) -> dict:
        """The module's state without the memos of ``_check_ready``/``_kernel_range``: a copy's (deepcopy, pickle)
        buffers are new tensors whose version counters start again, at 1, which a carried memo could match although
        the buffer was written after it was taken; the copy reads its own buffers once instead."""
        state = super().__getstate__()
        state.pop("_ready_seen", None)
        state.pop("_kernel_seen", None)
        return state

    def _broadcast(self, t: Tensor, x: Tensor) -> Tensor:
        if self.scheme.granularity == "per_channel":
            return t.reshape(-1, *([1] * (x.dim() - 1)))  # (C, 1, ...)
        if self.scheme.granularity == "per_block":  # each block's value repeated over its weights: x's shape
            rows = self._block_rows(x)
            return t.reshape(rows, -1).repeat_interleave(self._block_size, dim=1)[:, :self.row_size].reshape(x.shape)
        return t.reshape(())

    @property
    def _block_size(self) -> int:
        """Weights per block as laid out in memory: ``group_size``, or the row when one block holds it all (the same
        blocks; a block of 4096 over a row of 36 weights was materialized at 4096, 114x the weight, per forward)."""
        return min(self.scheme.group_size, self.row_size)

    def _block_rows(self, x: Tensor) -> int:
        """The output rows of a weight this ``per_block`` quantizer can quantize (refused: any other shape)."""
        rows = self.scale.shape[0]
        if x.dim() == 0 or x.shape[0] != rows or x[0].numel() != self.row_size:
            raise ValueError(f"a per_block quantizer of {rows} rows × {self.row_size} weights cannot quantize a "
                             f"tensor of shape {tuple(x.shape)}")
        return rows

    def forward(self, x: Tensor) -> Tensor:
        if not self.enabled or self.bypass:
            return x
        if self._observer is not None:
            self._observer.observe(x)
            return x
        return self._quantize(x)

    def _quantize(self, x: Tensor) -> Tensor:
        """Fake-quantize ``x`` on this quantizer's grid (``forward`` has handled bypass and observation)."""
        # a compiled graph cannot branch on a tensor's value (graph break); int8-compiled checks every quantizer of
        # the network before it compiles (tadq.backends.compiled.check_compilable)
        if not torch.compiler.is_compiling():
            self._check_ready()
        if self.scheme.dynamic:
            return dynamic_fake_quantize(x, self.scheme, self.channel_dim)
        if self.scheme.fp8:  # no fused kernel: cast to the fp8 dtype and back, in float32 (its own dtype handling)
            return fp8_fake_quantize(x, self._broadcast(self.scale, x), self.scheme.fp8_dtype, self.scheme.fp8_max)
        if self.rounding is None and not (torch.is_grad_enabled() and (x.requires_grad or self.scale.requires_grad)):
            return self._fused(x)
        # a Δ cast to float16 may have flushed to 0 (see _fused): widened and floored, the result cast back
        cast = self.scale.dtype in (torch.float16, torch.bfloat16)
        step = self.scale.float().clamp_min(MIN_SCALE) if cast else self.scale
        scale, zero_point = self._broadcast(step, x), self._broadcast(self.zero_point, x)
        if self.rounding is not None:
            quantized = self.rounding(x, scale, zero_point, self.scheme.qmin, self.scheme.qmax)
        else:
            quantized = fake_quantize(x, scale, zero_point, self.scheme.qmin, self.scheme.qmax)
        return quantized.to(x.dtype) if cast else quantized

    def _fused(self, x: Tensor) -> Tensor:
        """torch's fused fake-quant kernels: the same grid and round-half-even, about 2x faster than the composed
        ops; used whenever no gradient is needed (sampling, calibration forwards). The kernels take a float32 scale
        only (a model cast to bfloat16/float16 has its Δ cast too: widened back here). float16 flushes a Δ below
        6e-8 to 0 (an all-zero weight channel or input has Δ = MIN_SCALE = 1e-8), and the kernel turned that
        channel into NaN: the floor set_range applies is applied again. Compiled, a float32 input takes the
        kernels' arithmetic as pure ops (``kernel_fake_quantize``, bit-identical): the ops have no fake-tensor
        implementation for a dynamic batch, which broke ``int8-compiled``'s graph at the attention operands."""
        zero_point, scale = self._kernel_range()
        if torch.compiler.is_compiling() and x.dtype == torch.float32:
            return kernel_fake_quantize(x, self._broadcast(scale, x), self._broadcast(zero_point, x),
                                        self.scheme.qmin, self.scheme.qmax)
        if self.scheme.granularity == "per_block":  # rows of blocks, one per-channel row each (zero-padded tail)
            rows, size = self._block_rows(x), self._block_size
            flat = x.reshape(rows, self.row_size)
            padding = scale.shape[1] * size - self.row_size
            blocks = torch.nn.functional.pad(flat, (0, padding)).reshape(-1, size)
            quantized = torch.fake_quantize_per_channel_affine(blocks, scale.reshape(-1), zero_point.reshape(-1), 0,
                                                               self.scheme.qmin, self.scheme.qmax)
            return quantized.reshape(rows, -1)[:, :self.row_size].reshape(x.shape)
        if self.scheme.granularity == "per_channel":
            return torch.fake_quantize_per_channel_affine(x, scale, zero_point, 0, self.scheme.qmin, self.scheme.qmax)
        return torch.fake_quantize_per_tensor_affine(x, scale.reshape(()), zero_point.reshape(()),
                                                     self.scheme.qmin, self.scheme.qmax)

    def _check_ready(self) -> None:
        """Raise unless a range is set. ``bool(initialized)`` is a read back to the host, on a GPU a device sync in
        every layer of every forward; a true answer is remembered with the buffer's identity and version counter,
        which every write moves (``set_range``, ``load_state_dict``, ``copy_``/``fill_``; ``.to()`` makes a new
        tensor), so the next forward after any of them reads the buffer again. A write through ``.data`` moves no
        counter, nor does a fused optimizer step (``torch.optim.Adam(..., fused=True)``, measured on torch 2.13);
        nothing in tadq writes the buffers that way (learned steps use the default Adam and ``clamp_`` after each
        step)."""
        initialized = self.initialized
        if _unchanged(self._ready_seen, initialized):
            return
        if not bool(initialized):
            raise RuntimeError(
                "quantizer used before its range was set: calibrate the model first "
                "(tadq.quantize, or the tadq.calibration.Calibrate context)"
            )
        self.__dict__["_ready_seen"] = _version_of(initialized)  # not nn.Module.__setattr__: µs per call

    def _kernel_range(self) -> tuple[Tensor, Tensor]:
        """(z as int32, Δ as float32 floored at ``MIN_SCALE``) for the fused kernels: two small ops per call
        otherwise, so kept while ``scale`` and ``zero_point`` are the same, unwritten tensors (as ``_check_ready``).
        Not kept when compiling, nor in inference mode (what it makes there are inference tensors, which some uses
        outside it refuse)."""
        zero_point, scale = self.zero_point, self.scale
        keep = not (torch.compiler.is_compiling() or torch.is_inference_mode_enabled())
        seen = self._kernel_seen
        if keep and seen is not None and _unchanged(seen[0], zero_point) and _unchanged(seen[1], scale):
            return seen[2]
        kernel = zero_point.to(torch.int32), scale.float().clamp_min(MIN_SCALE)
        if keep:
            snapshots = _version_of(zero_point), _version_of(scale)
            self.__dict__["_kernel_seen"] = None if None in snapshots else (*snapshots, kernel)
        return kernel

    def extra_repr(self) -> str:
        return f"{self.kind}: {self.scheme.describe()}"


def _version_of(tensor: Tensor) -> tuple[Tensor, int] | None:
    """``tensor`` with its version counter (``None`` for an inference tensor, which keeps none)."""
    try:
        return tensor, tensor._version
    except RuntimeError:
        return None


def _unchanged(seen: tuple[Tensor, int] | None, buffer: Tensor) -> bool:
    """Whether a ``_version_of`` snapshot still describes ``buffer``: the same tensor, not written since."""
    return seen is not None and seen[0] is buffer and seen[1] == buffer._version


def zero_point_bounds(scheme: QScheme) -> tuple[int, int]:
    """[low, high] of a calibrated zero point: 0 when symmetric, the code range otherwise."""
    return (0, 0) if scheme.symmetric else (scheme.qmin, scheme.qmax)


def off_grid_zero_point(zero_point: Tensor, scheme: QScheme) -> float | None:
    """The first zero point that is not an integer in ``zero_point_bounds(scheme)`` (``None`` if all are): what
    loading an artefact and ``load_state_dict`` refuse."""
    low, high = zero_point_bounds(scheme)
    on_grid = torch.isfinite(zero_point) & (zero_point == zero_point.round()) & (zero_point >= low) & (
        zero_point <= high)
    return None if bool(on_grid.all()) else zero_point[~on_grid].reshape(-1)[0].item()


GRID_METADATA = "tadq_grid"
"""Key of a quantizer's grid (``state_grid``) in its ``state_dict`` metadata (``state_dict._metadata[name]``)."""


def state_grid(scheme: QScheme) -> str:
    """What a quantizer's calibrated state is only valid for: bits, symmetry, granularity (group size) and the
    input transform its layer folds into the weight (not the range method, whose ranges any grid can hold)."""
    if not scheme.enabled:
        return "off"
    grid = scheme.format if scheme.fp8 else f"int{scheme.bits}"
    parts = [grid, "sym" if scheme.symmetric else "asym", scheme.granularity]
    if scheme.granularity in ("per_group", "per_block"):
        parts.append(str(scheme.group_size))
    if scheme.smoothing:
        parts.append("smooth")
    if scheme.rotation != "none":
        parts.append(scheme.rotation)
    return "-".join(parts)


def _record_grid(quantizer: Quantizer, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """``state_dict`` hook: record the quantizer's grid in the state's metadata (kept by ``torch.save``; not a
    tensor, so the keys, the values and what hashes them are unchanged), for ``_refuse_off_grid_state``."""
    local_metadata[GRID_METADATA] = state_grid(quantizer.scheme)


def _refuse_off_grid_state(quantizer: Quantizer, state_dict: dict, prefix: str, local_metadata: dict,
                           *args) -> None:
    """``load_state_dict`` hook: a calibrated zero point off this quantizer's grid (an integer in [qmin, qmax], 0
    when symmetric) is refused naming the quantizer, before anything is copied. The state of another preset's model
    (W8A8 into W4A8: same keys and shapes) loaded without a word and failed at the first forward inside torch's
    fake-quant kernel (``zero_point must be between quant_min and quant_max``). A state that records its grid
    (``_record_grid``) is refused for any other grid: a symmetric 8-bit state (z = 0) loaded into a symmetric 4-bit
    model silently clipped every weight to 7/127 of its range."""
    where = f"quantizer {prefix.rstrip('.') or '(root)'}"
    zero_point, initialized = state_dict.get(prefix + "zero_point"), state_dict.get(prefix + "initialized")
    scheme = quantizer.scheme
    calibrated = zero_point is not None and quantizer.enabled and not scheme.dynamic and (
        initialized is None or bool(initialized))
    bad = off_grid_zero_point(zero_point, scheme) if calibrated else None
    if bad is not None:
        low, high = zero_point_bounds(scheme)
        raise ValueError(f"{where} ({scheme.describe()}): the state's zero point "
                         f"z = {bad}; z must be an integer in [{low}, {high}]: the state is damaged, or was taken "
                         "from a model quantized with another QuantConfig (bit width, symmetry) that this model "
                         "cannot hold")
    recorded, expected = local_metadata.get(GRID_METADATA), state_grid(scheme)
    if recorded is not None and recorded != expected:
        raise ValueError(f"{where} is {expected}, but the state was saved from one that is {recorded}: it was taken "
                         "from a model quantized with another QuantConfig (bit width, symmetry, granularity); load "
                         "it into a model built with that config")


@contextlib.contextmanager
def quantizers_bypassed(model: nn.Module, kind: Literal["weight", "activation"] | None = None) -> Iterator[None]:
    """Temporarily pass quantizers of ``kind`` (all if ``None``) through unquantized; restored on exit.

    Used by reconstruction's weight phase (activations off) and by structural traces that run before any range is
    set. Explicit and scoped: nothing else toggles ``bypass``.
    """
    with bypassing([m for m in model.modules() if isinstance(m, Quantizer) and (kind is None or m.kind == kind)]):
        yield


@contextlib.contextmanager
def bypassing(quantizers: Sequence[Quantizer]) -> Iterator[None]:
    """Temporarily pass exactly ``quantizers`` through unquantized; each one's previous state restored on exit."""
    previous = [q.bypass for q in quantizers]
    for quantizer in quantizers:
        quantizer.bypass = True
    try:
        yield
    finally:
        for quantizer, state in zip(quantizers, previous, strict=True):
            quantizer.bypass = state
