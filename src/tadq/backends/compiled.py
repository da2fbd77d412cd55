"""The ``int8-compiled`` backend: the ``int8`` layers, with the whole network compiled by ``torch.compile``.

Eager, every integer layer quantizes its input in separate passes after the float op that produced it (GroupNorm,
SiLU, a residual add), which costs about twice the int8 kernel itself on the shipped model (docs/backends.md).
Compiled by Inductor with freezing, the layers trace to pure ops (``traced_codes``): the activation quantization
(× 1/Δ, round half to even, + z, clamp, → uint8), the asymmetric-weight offset correction and the surrounding float
ops fuse into one generated C++ kernel per group, and the oneDNN ``qconv2d_pointwise`` / ``qlinear_pointwise`` ops
run as Inductor extern kernels on the frozen prepacked weights. The integer arithmetic is the ``int8`` backend's:
same codes from the same float input, same exact int32 sums, same float32 epilogue. Inductor may order the
*float* ops around them differently from eager (e.g. GroupNorm's reduction), which moves values by float rounding
only — the same kind of difference as between the eager integer and fake-quant models (docs/backends.md).

Compilation happens on the first call with each input shape (about 1–2 minutes on the shipped model with one
thread on the 2-core CPUs; the batch dimension becomes dynamic after a second batch size, so a sampling run
compiles at most twice). TFMQ-DM's per-step activation ranges and cached temporal features compile too: the step
index is a graph input read from a table (``StepState.traced_index``), so one graph serves every step; such
models compile with static shapes (one graph per batch size). What a compiled graph cannot follow is refused when
converting, by name:

* step-aware corrections without a ``StepState`` (they rewrite the network between steps in Python);
* guidance branch ranges (``QuantConfig.branch_ranges``): they rewrite the activation ranges in place between
  calls, which a graph frozen on the ranges would not see;
* per-label TFMQ caches (``LabelCapture``) and other forward hooks inside the network;
* a quantizer without a range (the graph does not check it at run time).

Those models run on ``int8`` (eager) unchanged. The cross-attention K/V memo of text-conditioned adapters is not
entered by a compiled model (``CompiledIntegerDenoiser._predict``): it compares tensors on the host, which a graph
cannot trace, and by design it only skips recomputing values it would return bit-identical.
"""

from __future__ import annotations

import contextlib
import logging
import unittest.mock
import warnings

import torch
from torch import Tensor, nn

from tadq.backends.activations import is_per_step
from tadq.backends.cpu_int8 import OneDNNConv2d, OneDNNLinear, OneDNNSplitConv2d
from tadq.backends.integer_denoiser import IntegerDenoiser
from tadq.quant.quantizer import Quantizer
from tadq.sampling import Conditioning, StepAware
from tadq.tfmq.cache import CachedFeature, LabelCapture
from tadq.tfmq.fsc import StepQuantizer, StepState

RECOMPILE_LIMIT = 64


def keep_identity_guards(entries) -> list[bool]:
    """Dynamo guard filter: of the guards on the network's module attributes keep only the identity checks.

    Before every call Dynamo re-checks each attribute the graph read from the network's modules (≈ 6000 guards on
    the shipped model: every integer layer's grid constants, flags, dict keys, hook dicts), ≈ 2–3 ms per call.
    Nothing in a converted model changes after it is compiled (ranges are final at conversion; freezing has made
    the weights graph constants, so a change would not be seen with or without these guards). The identity guards
    (``ID_MATCH``, pointer compares) stay: all compiled models of one class share their forward's graph cache, and
    without them a second model in the process ran the first model's graph (measured: its output was the other
    model's). Guards on the call's inputs (shapes, dtypes, devices) and on global state are not on modules and stay.
    """
    return [entry.guard_type == "ID_MATCH" or not entry.orig_guard.source.is_unspecialized_nn_module()
            for entry in entries]


GUARD_FILTER = keep_identity_guards

__all__ = ["INDUCTOR_SETTINGS", "CompiledIntegerDenoiser", "check_compilable", "compile_integer_model",
           "compile_like_integer_models", "frozen", "int8_convs_prefer_channels_last", "keep_identity_guards",
           "prime_grids", "step_states"]


INDUCTOR_SETTINGS = {"freezing": True, "cpp_wrapper": True, "force_layout_optimization": True}


@contextlib.contextmanager
def frozen():
    """The Inductor settings every call of a compiled integer model runs under (``INDUCTOR_SETTINGS``).

    Freezing: Inductor needs it to take the prepacked oneDNN weights as constants. Set around the call, not as a
    ``torch.compile`` option: passed as an option it did not reach the ``qlinear_pointwise`` lowering (its weight
    was not a constant; measured). The C++ wrapper: the code that calls the ≈ 140 generated kernels and oneDNN ops
    of a forward is compiled C++ instead of Python. Measured on AMX (``benchmarks/inductor_settings.py``,
    W8A8-WSYM, one model per process, fresh Inductor cache): per call 4.20 → 3.99 ms at batch 1, 12.2 → 10.3 ms at
    16, 35.6 → 32.1 ms at 64, for 97 → 135 s of compiling three batch sizes (docs/backends.md). Forced layout
    optimisation, with the int8 convs counted as convs: ``int8_convs_prefer_channels_last``."""
    import torch._inductor.config as inductor_config

    with inductor_config.patch(**INDUCTOR_SETTINGS), int8_convs_prefer_channels_last():
        yield


INT8_CONV_OPS = ("qconv2d_pointwise.default", "qconv_pointwise.tensor")  # the ops ``_ConvKernel`` calls


def int8_convs_prefer_channels_last():
    """Let Inductor's layout optimisation count the oneDNN int8 convs as convs (a context for compiling).

    Inductor lays out in channels-last the tensors that feed a conv, directly or through float ops, when they are
    stored (``GraphLowering.find_nodes_prefer_channels_last``), but it recognises only float convs there, by the
    function ``torch._inductor.graph.is_mkldnn_conv``. Without this, a tensor stored between int8 convs took
    Inductor's default NCHW layout, and each int8 conv's channels-last codes were written through 16×16 transposes
    — most of all the up blocks' skip concatenations after a W8A8 conv's offset correction (its output is a
    multiply-add, not the conv's own channels-last buffer). Measured on AMX, batch 64, one thread (two fresh
    processes each, ``benchmarks/profile_compiled.py``): W8A8 41.6 → 36.6 ms per forward, W8A8-WSYM 31.6 → 31.2 ms
    (docs/backends.md). ``INDUCTOR_SETTINGS`` forces the optimisation on: Inductor's own decision reads float convs'
    arguments and would not see the int8 ones. Layout moves float rounding only where a reduction's order follows
    it (GroupNorm), as between eager and compiled. A torch without the function or the ops compiles as before
    (NCHW)."""
    import torch._inductor.graph as inductor_graph

    recognised = getattr(inductor_graph, "is_mkldnn_conv", None)
    targets = {getattr(getattr(torch.ops.onednn, op, None), overload, None)
               for op, overload in (name.split(".") for name in INT8_CONV_OPS)} - {None}
    if recognised is None or not targets:  # nothing to extend, or a torch without oneDNN's int8 convs
        return contextlib.nullcontext()

    def is_conv(node) -> bool:
        return node.target in targets or recognised(node)

    return unittest.mock.patch.object(inductor_graph, "is_mkldnn_conv", is_conv)


SIMULATED_OPS = ("aten._fake_quantize", "aten.fake_quantize")
"""Name prefixes of the fake-quant ops an integer model keeps: the per-tensor ones of the attention operands
(``aten._fake_quantize_per_tensor_affine_cachemask_tensor_qparams``) and the per-row softmax quantizer's
``torch.fake_quantize_per_channel_affine`` (``aten.fake_quantize_per_channel_affine_cachemask``, no underscore)."""


class _FakeQuantShimFilter(logging.Filter):
    """Drops Inductor's "aten._fake_quantize_… is missing a c-shim implementation" warning, one line per simulated
    op and compile (15 on a W4A8 model with quantized attention operands): those ops are the parts an integer model
    keeps simulated by design (attention matmul operands and the per-row softmax, docs/backends.md), which the C++
    wrapper calls through its proxy executor. Every other Inductor warning passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (isinstance(record.msg, str) and record.msg.startswith("%s is missing a c-shim") and record.args
                    and str(record.args[0]).startswith(SIMULATED_OPS))


_SHIM_FILTER = _FakeQuantShimFilter()


def _quiet_fake_quant_shim_warnings() -> None:
    logger = logging.getLogger("torch._inductor.ir")
    if _SHIM_FILTER not in logger.filters:
        logger.addFilter(_SHIM_FILTER)


def compile_like_integer_models() -> None:
    """Set ``INDUCTOR_SETTINGS`` process-wide, so a float model compiled for comparison (the benchmarks' compiled FP
    baselines) gets the same Inductor treatment as an ``int8-compiled`` model: kernel against kernel."""
    import torch._inductor.config as inductor_config

    for setting, value in INDUCTOR_SETTINGS.items():
        setattr(inductor_config, setting, value)


def _quantizers(model: nn.Module):
    """(layer name, kernel with a grid cache, its input quantizer) for every integer layer of ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, OneDNNConv2d):
            yield name, module.kernel, module.input_quantizer
        elif isinstance(module, OneDNNSplitConv2d):
            yield f"{name} (deep half)", module.deep, module.input_quantizer_deep
            yield f"{name} (skip half)", module.skip, module.input_quantizer_skip
        elif isinstance(module, OneDNNLinear):
            yield name, module, module.input_quantizer


def check_compilable(qmodel) -> None:
    """Raise ``ValueError`` naming what a compiled graph cannot follow (see the module docstring)."""
    hint = "; run this model on backend 'int8' (eager, same arithmetic)"
    aware = [type(member).__name__ for member in qmodel.corrections
             if isinstance(member, StepAware) and not isinstance(getattr(member, "state", None), StepState)]
    if aware:
        raise ValueError(f"int8-compiled: the correction(s) {aware} change the network at every sampler step "
                         f"without a StepState a graph can read the step from{hint}")
    if getattr(qmodel, "branch_ranges", None) is not None:
        raise ValueError("int8-compiled: the model has guidance branch ranges, rewritten in place between calls, "
                         f"which a frozen graph does not see{hint}")
    for name, module in qmodel.model.named_modules():
        if isinstance(module, Quantizer) and module.enabled and not bool(module.initialized):
            raise ValueError(f"int8-compiled: quantizer {name} has no range (the graph does not check it at run "
                             "time); calibrate the model before converting")
        where = name or "the network"
        if any(isinstance(hook, LabelCapture) for hook in module._forward_pre_hooks.values()):
            raise ValueError(f"int8-compiled: {where} captures class labels for a per-label TFMQ cache, which is "
                             f"not traced{hint}")
        if module._forward_pre_hooks or any(not isinstance(hook, CachedFeature)
                                            for hook in module._forward_hooks.values()):
            raise ValueError(f"int8-compiled: {where} has forward hooks{hint}")


def step_states(model: nn.Module) -> list[StepState]:
    """Every ``StepState`` the network reads a step from (per-step quantizers, cached-feature hooks), once each."""
    found: dict[int, StepState] = {}
    for module in model.modules():
        readers = [module, *module._forward_hooks.values()]
        for reader in readers:
            if isinstance(reader, (StepQuantizer, CachedFeature)):
                found.setdefault(id(reader.state), reader.state)
    return list(found.values())


def prime_grids(model: nn.Module) -> None:
    """Fill every integer layer's grid cache now, so the traced graph reads the ranges as Python constants."""
    for _, kernel, quantizer in _quantizers(model):
        if not is_per_step(quantizer):  # a per-step range is read from its table at the traced step index
            kernel.grid(quantizer)


def compile_integer_model(qmodel) -> None:
    """Prime and compile ``qmodel.model`` in place (lazily: Inductor compiles on the first call); ``to_backend``
    has run ``check_compilable`` on the fake-quant model before converting it."""
    prime_grids(qmodel.model)
    # Every compiled model of one class shares its forward's code object, and so torch's per-code-object limit of
    # graphs (8): a process holding a few compiled models (the speed benchmark) would silently fall back to eager.
    import torch._dynamo.config as dynamo_config

    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, RECOMPILE_LIMIT)
    # A prepacked weight is a plain tensor attribute of its layer (not a parameter or buffer, whose shapes Dynamo keeps
    # static), so when a second model of the same class recompiles the shared forward with another size at the same
    # place (W8A8-WSYM after W8A8, whose convs carry one more channel), automatic dynamic shapes made its channel count
    # a symbol, which Inductor's C++ wrapper then failed to declare (compile error on the shipped t2i UNet, torch 2.13)
    for module in qmodel.model.modules():
        packed = getattr(module, "packed", None)
        if isinstance(packed, Tensor):
            torch._dynamo.mark_static(packed)
    qmodel.step_states = step_states(qmodel.model)
    # torch 2.13's oneDNN lowering copy-constructs the weight zero point with torch.tensor(tensor) and warns about it
    # at every compile; it is torch's own code, nothing a user can act on, so that one message is silenced there
    warnings.filterwarnings("ignore", message="To copy construct from a tensor", category=UserWarning,
                            module=r"torch\._inductor\.mkldnn_lowerings")
    _quiet_fake_quant_shim_warnings()
    options = {} if GUARD_FILTER is None else {"options": {"guard_filter_fn": GUARD_FILTER}}
    # per-step grids: static shapes, one graph per batch size (a sampling run has at most two). With a dynamic batch
    # Inductor's lowering of the per-step conv (qconv_pointwise.tensor) expected a contiguous output where oneDNN
    # writes channels-last, and the graph failed its stride check at the second batch size (torch 2.13)
    qmodel.model.compile(**options, **({"dynamic": False} if qmodel.step_states else {}))
    qmodel.__class__ = CompiledIntegerDenoiser


class CompiledIntegerDenoiser(IntegerDenoiser):
    """An ``IntegerDenoiser`` whose network is compiled; every call runs with Inductor freezing on and without
    autograd (freezing needs it, and integer kernels have no gradient anyway)."""

    def _predict(self, x: Tensor, t: Tensor, cond: Conditioning | None) -> Tensor:
        """The network without the adapter's inference cache (the cross-attention K/V memo): the memo decides on
        the host (``torch.equal`` on the text embedding), which would break the graph at every cross-attention, and
        what it serves is bit-identical to recomputing (``CrossAttentionKVCache``). Integer projections are not
        memoised anyway (their kernels are not in its cacheable set); float ones are recomputed every call."""
        return self.adapter.predict_eps(self.model, x, t, cond)

    def forward(self, x: Tensor, t: Tensor, cond: Conditioning | None = None) -> Tensor:
        for state in self.step_states:  # the graph reads the step from a tensor and cannot check it was set
            state.require_index()
        with torch.no_grad(), frozen():
            return super().forward(x, t, cond)
