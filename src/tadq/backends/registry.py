"""Execution backends and ``to_backend``: the same calibrated model, simulated (``fake``) or run in integers.

A converted model is still a ``QuantizedDenoiser`` (same ``forward(x, t)``, adapter, config, plans and correction
stack), so ``tadq.sample`` and every sampler-level correction (PTQD, TAC, TCEC, TFMQ's per-step tables) run on it
unchanged.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import nn

from tadq.backends import capability
from tadq.backends.capability import int8_compiled_missing, int8_cpu_missing, int8_cuda_missing
from tadq.backends.convert import LayerFactory, convert_layers
from tadq.backends.integer_denoiser import IntegerDenoiser
from tadq.backends.placement import refuse_placement
from tadq.config import QuantConfig
from tadq.denoiser import QuantizedDenoiser
from tadq.quant.qscheme import QScheme

__all__ = ["Backend", "BACKENDS", "BackendUnavailableError", "IntegerDenoiser", "to_backend", "check_backend",
           "check_config",
           "check_placement", "check_weight_grid", "check_activation_format", "check_layer_transforms",
           "held_weight_bytes"]


class BackendUnavailableError(RuntimeError, ValueError):
    """The requested backend cannot run on this machine (the message says why); nothing is substituted.

    Also a ``ValueError``, so the CLI reports it as a one-line input error.
    """


@dataclass(frozen=True)
class Backend:
    """A named way to execute a quantized model.

    Args:
        name: what ``to_backend``, ``tadq.load(..., backend=)`` and ``tadq sample --backend`` take.
        description: one line for help texts.
        missing: why it cannot run here (``None`` when it can).
        factory: fake-quant layer → integer layer (``None`` for the ``fake`` backend, which converts nothing).
        check: raises ``ValueError`` for a model the backend cannot run, before anything is converted.
        finish: applied to the converted ``IntegerDenoiser`` last (``int8-compiled``: compile it; ``int8-cuda``:
            move it to the GPU).
        device_type: the only device type its kernels run on (``None``: any, the simulation).
    """

    name: str
    description: str
    missing: Callable[[], str | None]
    factory: LayerFactory | None
    check: Callable[[QuantizedDenoiser], None] | None = None
    finish: Callable[[QuantizedDenoiser], None] | None = None
    device_type: str | None = None
    moves_model: bool = False  # ``finish`` moves the converted model to ``device_type`` (int8-cuda), from any device


def _cpu_factory() -> LayerFactory:
    from tadq.backends.cpu_int8 import cpu_int8_layer

    return cpu_int8_layer


def _check_compilable(qmodel: QuantizedDenoiser) -> None:
    from tadq.backends.compiled import check_compilable

    check_compilable(qmodel)


def _compile(qmodel: QuantizedDenoiser) -> None:
    from tadq.backends.compiled import compile_integer_model

    compile_integer_model(qmodel)


def _to_gpu(qmodel: QuantizedDenoiser) -> None:
    qmodel.to(torch.device("cuda"))  # the current CUDA device: the kernels exist there only


def _cuda_factory() -> LayerFactory:
    from tadq.backends.cuda_int8 import int_mm_layer

    return int_mm_layer


BACKENDS: dict[str, Backend] = {
    "fake": Backend("fake", "float simulation of the integer arithmetic (the reference)", lambda: None, None),
    "int8": Backend("int8", "oneDNN u8·s8 convolutions and linears on x86 CPUs (without "
                    "VNNI/AMX: weight codes within ±64 only)", int8_cpu_missing,
                    _cpu_factory(), device_type="cpu"),
    "int8-compiled": Backend("int8-compiled", "the int8 layers with the network compiled by torch.compile (Inductor, "
                             "freezing): activation quantization fused into the preceding float ops; compiles on "
                             "the first call (minutes)", int8_compiled_missing, _cpu_factory(), _check_compilable,
                             _compile, device_type="cpu"),
    "int8-cuda": Backend("int8-cuda", "torch._int_mm linears and im2col convolutions on CUDA (measured on an "
                         "H200: agrees with fake-quant, slower than bf16 on small models)", int8_cuda_missing,
                         _cuda_factory(), finish=_to_gpu, device_type="cuda", moves_model=True),
}


def _known(name: str) -> Backend:
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {sorted(BACKENDS)}")
    return BACKENDS[name]


def check_backend(name: str) -> Backend:
    """The backend called ``name``; raises ``ValueError`` (unknown) or ``BackendUnavailableError`` (not here)."""
    backend = _known(name)
    reason = backend.missing()
    if reason is not None:
        raise BackendUnavailableError(f"backend {name!r} is not available on this machine: {reason}. It is not "
                                      "replaced by the float simulation; choose backend='fake' explicitly")
    return backend


def check_placement(name: str, device: torch.device, dtype: torch.dtype) -> None:
    """Refuse running backend ``name`` on ``device`` in ``dtype`` when its kernels cannot, before anything is loaded.

    Integer kernels exist on one device type only (oneDNN's on the CPU, ``_int_mm``'s on CUDA), and the float work
    around them is float32, the calibrated arithmetic: another compute dtype would change every result, so it is
    refused rather than applied to part of the model (the ``fake`` backend runs in any dtype).

    Raises:
        ValueError: the device type or the dtype does not fit the backend (the message says which to use).
    """
    backend = _known(name)  # whether it is available here is check_backend's question, asked when loading
    refuse_placement(name, backend.device_type, backend.factory is not None, device, dtype)


def check_weight_grid(name: str, scheme: QScheme, layer_bits: tuple[tuple[str, int, int | None], ...] = ()) -> None:
    """Refuse, before anything is loaded, a weight grid whose codes backend ``name``'s kernels do not sum exactly here.

    Only the oneDNN CPU kernels have such a limit (±64 without VNNI/AMX, ``capability.int8_cpu_weight_bound``).
    ``layer_bits`` (``QuantConfig.layer_bits``) gives layers their own weight bits on the same grid kind (mixed
    precision raises chosen layers to 8 bits), so each is checked too, by name; each layer is checked again when it
    is converted. Block-wise weights (``per_block``) are refused on every integer backend: their kernels take one
    weight step per output channel.
    """
    backend = _known(name)
    if backend.factory is not None and scheme.enabled and scheme.granularity == "per_block":
        raise ValueError(f"backend {name!r} runs int8 kernels with one weight step per output channel; this model's "
                         f"weights have one per block of {scheme.group_size} weights ({scheme.describe()}), which "
                         "needs a group-wise kernel tadq does not have: use backend='fake' (the simulation)")
    if backend.factory is None or backend.device_type != "cpu" or backend.missing() is not None:
        return  # the simulation, the CUDA kernels (exact int32 GEMMs), or refused by check_backend anyway
    from tadq.backends.weights import weight_code_peak

    bound = capability.int8_cpu_weight_bound()
    for layer, bits in (("", scheme.bits), *((entry[0], entry[1]) for entry in layer_bits)):
        if bits is None:
            continue  # weights off: no codes to bound (conversion refuses such a layer by name)
        layer_scheme = scheme if bits == scheme.bits else replace(scheme, bits=bits)
        peak = weight_code_peak(layer_scheme)
        if peak > bound:
            whose = f"layer {layer}'s" if layer else "the model's"
            raise ValueError(f"backend {name!r}: {whose} {bits}-bit weights have codes up to ±{peak}, but "
                             f"{capability.weight_bound_reason(bound)}")


def check_activation_format(name: str, scheme: QScheme) -> None:
    """Refuse, before anything is loaded or copied, activations an integer backend's kernels do not take: fp8
    (``QScheme.format``: its kernels take int8 codes, and no backend runs fp8 matmuls, which need a GPU with fp8
    units; the ``fake`` backend simulates the format), and dynamic ranges (``per_token`` / ``per_group``: one scale
    per token or group measured at run time, where the kernels take one static scale per tensor). Each layer's input
    quantizer is checked again when it is converted."""
    backend = _known(name)
    if backend.factory is None or not scheme.enabled:
        return
    if scheme.fp8:
        raise ValueError(f"backend {name!r} runs int8 kernels; this model's activations are {scheme.format} (fp8), "
                         "which no tadq backend runs in hardware: use backend='fake' (the fp8 simulation)")
    if scheme.dynamic:
        raise ValueError(f"backend {name!r} runs int8 kernels with one static activation scale per tensor; this "
                         f"model's activations are quantized {scheme.granularity} at run time ({scheme.describe()}), "
                         "which needs per-row or group-wise rescaling tadq's kernels do not have: use "
                         "backend='fake' (the simulation)")


def check_layer_transforms(name: str, weights: QScheme, activations: QScheme) -> None:
    """Refuse, before anything is loaded or copied, schemes that make every quantized layer a transformed one
    (``QScheme.transforms``: SVDQuant's smoothing, a Hadamard rotation, a low-rank FP branch): the integer backends
    run plain convs and linears and refuse those layers by class when converting, rather than drop the branch or the
    input transform. Found after the whole artefact had been built and read (or the model deep-copied)."""
    backend = _known(name)
    if backend.factory is None or not (weights.transforms or activations.transforms):
        return
    parts = [what for what, on in (("smoothing", activations.smoothing),
                                   (f"a {activations.rotation} rotation", activations.rotation != "none"),
                                   (f"a rank-{weights.lowrank_rank} low-rank branch", weights.lowrank_rank > 0)) if on]
    raise ValueError(f"backend {name!r} runs plain int8 convs and linears; this model's quantized layers have "
                     f"{' and '.join(parts)} (transformed layers, SVDQuant), which tadq's integer kernels do not run: "
                     "use backend='fake' (the simulation)")


def _refuse_model_placement(qmodel: QuantizedDenoiser, backend: Backend) -> None:
    """``to_backend`` on a model already cast or moved where the kernels do not run (``tadq.load(..., dtype=
    torch.bfloat16)`` then ``to_backend``): its weight grids were rounded to that dtype and its float layers would
    feed the integer ones bf16, so the conversion is refused as ``check_placement`` refuses it before loading."""
    parameter = next((p for p in qmodel.parameters() if p.is_floating_point() and p.dtype != torch.float32), None)
    first = next(qmodel.parameters(), None)
    device = torch.device("cpu") if first is None else first.device
    dtype = torch.float32 if parameter is None else parameter.dtype
    try:
        refuse_placement(backend.name, None if backend.moves_model else backend.device_type, True, device, dtype)
    except ValueError as error:
        raise ValueError(f"to_backend: the model's parameters are {dtype} on {device}: {error}") from error


def _refuse_shared_network(qmodel: QuantizedDenoiser) -> None:
    """``inplace=True`` on a model whose network another live model runs too (``fit_corrections`` returns a view on
    the base's network) would silently turn that model's layers into integer kernels as well."""
    from tadq.corrections.attach import models_sharing

    others = [model for model in models_sharing(qmodel.model) if model is not qmodel]
    if others:
        raise ValueError(f"inplace=True: this model shares its network with {len(others)} other live model(s) "
                         "(fit_corrections / with_corrections share the base model's layers), which would run the "
                         "integer kernels too while still claiming the fake backend; convert a copy (inplace=False) "
                         "or drop the other models first")


def check_config(name: str, config: QuantConfig) -> Backend:
    """Backend ``name``, once a model quantized with ``config`` is known to run on it here; refused otherwise.

    One list of checks for ``to_backend`` and ``load_quantized`` (they were spelled out in both, in two orders):
    what no integer backend runs on any machine (the activation format, SVDQuant's transformed layers, block-wise
    weights), then whether the backend runs on this machine, then the weight codes its kernels sum exactly here
    (``check_weight_grid``, each mixed-precision layer by name). ``load_quantized`` asks for the backend once more
    before it reads the folder, so an artefact is not opened for a backend this machine lacks.
    """
    check_activation_format(name, config.activations)
    check_layer_transforms(name, config.weights, config.activations)
    if config.weights.granularity == "per_block":
        check_weight_grid(name, config.weights)
    backend = check_backend(name)
    check_weight_grid(name, config.weights, config.layer_bits)
    return backend


def to_backend(qmodel: QuantizedDenoiser, name: str, *, inplace: bool = False) -> QuantizedDenoiser:
    """``qmodel`` executed by backend ``name``: ``fake`` returns it as is; integer backends convert its layers.

    Args:
        qmodel: a calibrated (or loaded) fake-quant ``QuantizedDenoiser``.
        name: a key of ``BACKENDS``.
        inplace: convert ``qmodel`` itself (its fake-quant layers and float weights are dropped, which is what keeps
            a loaded model small); otherwise a copy is converted and ``qmodel`` stays usable.

    Raises:
        BackendUnavailableError: the backend cannot run on this machine.
        ValueError: a layer the backend cannot run in integers (the message names it), an unknown backend, a model
            cast to a dtype other than float32 or on a device the kernels do not run on (``check_placement``), or
            ``inplace=True`` on a network another live model shares (``fit_corrections``' result and its base).
    """
    if not isinstance(qmodel, QuantizedDenoiser):
        check_backend(name)  # an unknown or unavailable backend is named first, whatever was passed
        raise TypeError(f"to_backend takes a QuantizedDenoiser, got {type(qmodel).__name__}")
    backend = check_config(name, qmodel.config)  # before the copy, not layer by layer
    if isinstance(qmodel, IntegerDenoiser):
        raise ValueError(f"the model already runs on backend {qmodel.backend!r}; convert its fake-quant original")
    if backend.factory is None:
        return qmodel
    _refuse_model_placement(qmodel, backend)
    if inplace:
        _refuse_shared_network(qmodel)
    if backend.check is not None:
        backend.check(qmodel)
    target = qmodel if inplace else copy.deepcopy(qmodel)
    layers = convert_layers(target.model, backend.factory, name)
    target.__class__ = IntegerDenoiser
    target.backend, target.layers, target.device_type = name, layers, backend.device_type
    if backend.finish is not None:
        backend.finish(target)
    return target


def held_weight_bytes(module: nn.Module) -> int:
    """Bytes of every parameter, buffer and prepacked int8 weight a model holds (what it keeps in memory)."""
    tensors = {id(t): t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers())}
    packed = sum(getattr(m, "packed_bytes", 0) for m in module.modules())
    return sum(tensors.values()) + packed
