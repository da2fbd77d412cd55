"""Swapping a model's layers for fake-quant layers (``tadq.quant.convert``, through ``build_quantized_structure``)."""

from __future__ import annotations

import torch
from tests.conftest import build_tiny_unet

from tadq.config import QuantConfig
from tadq.prepare import build_quantized_structure
from tadq.quant import QuantConv2d, QuantLinear
from tadq.quant.split import SplitQuantConv2d

HOOKED = {"conv_in": QuantConv2d, "time_embedding.linear_1": QuantLinear,
          "up_blocks.0.resnets.0.conv_shortcut": SplitQuantConv2d}


def test_forward_hooks_on_a_quantized_layer_move_to_its_replacement():
    """A user's forward and forward-pre hooks on a layer tadq swaps were dropped without a word (those on every
    module it does not swap were kept by the model's copy); they now run on the quantized layer."""
    model = build_tiny_unet()
    calls: list[tuple[str, str, type]] = []
    for name in HOOKED:
        layer = model.get_submodule(name)
        layer.register_forward_pre_hook(lambda module, args, name=name: calls.append(("pre", name, type(module))))
        layer.register_forward_hook(lambda module, args, out, name=name: calls.append(("post", name, type(module))))
    qmodel = build_quantized_structure(model, QuantConfig.from_preset("W8A16", split_shortcut=True))
    calls.clear()  # the build traces the model once (shortcut splits)
    with torch.no_grad():
        qmodel.model(torch.randn(1, 1, 8, 8), torch.tensor([3]))
    assert sorted(calls, key=str) == sorted([(kind, name, kind_of) for name, kind_of in HOOKED.items()
                                             for kind in ("pre", "post")], key=str)
