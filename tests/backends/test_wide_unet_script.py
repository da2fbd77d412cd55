"""benchmarks/wide_unet.py: the widened digits UNet computes the digits model's ε at every width it writes, so the
quality and agreement columns of a speed table on it keep their meaning."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DModel

from tadq.models import load_pipeline_parts

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "wide_unet.py"


@pytest.fixture(scope="module")
def wide_unet():
    with pytest.MonkeyPatch.context() as patch:  # the script imports benchmarks/arguments.py as its neighbour
        patch.syspath_prepend(str(SCRIPT.parent))
        spec = importlib.util.spec_from_file_location("wide_unet", SCRIPT)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("width", [2, 3])
def test_the_widened_model_computes_the_digits_models_eps(wide_unet, width):
    narrow, _ = load_pipeline_parts(None)
    wide = wide_unet.wide_digits_unet(width, seed=0)
    assert list(wide.config.block_out_channels) == [width * c for c in narrow.config.block_out_channels]
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(3, 1, 16, 16, generator=generator)
    t = torch.tensor([3, 480, 997])
    with torch.no_grad():
        reference, widened = narrow(x, t).sample, wide(x, t).sample
    assert float((widened - reference).abs().max() / reference.abs().max()) <= wide_unet.TOLERANCE
    random = wide_unet.wide_digits_unet(width, seed=0, init="random")  # untrained: another function
    with torch.no_grad():
        assert float((random(x, t).sample - reference).abs().max() / reference.abs().max()) > 0.1


def test_a_widening_that_breaks_the_function_is_refused(wide_unet, monkeypatch):
    """The check is what makes the folder trustworthy: without the query's 1/√w the attention logits grow by √w."""
    widened = wide_unet.widened_state

    def unscaled_query(narrow, wide, width):
        return {name: value * width**0.5 if ".to_q." in name else value
                for name, value in widened(narrow, wide, width).items()}

    monkeypatch.setattr(wide_unet, "widened_state", unscaled_query)
    with pytest.raises(RuntimeError, match="differs from the digits model"):
        wide_unet.wide_digits_unet(2, seed=0)


def test_the_script_writes_a_loadable_folder_and_refuses_an_existing_one(wide_unet, tmp_path, monkeypatch, capsys):
    out = tmp_path / "wide"
    monkeypatch.setattr(sys, "argv", ["wide_unet.py", "--width", "2", "--out", str(out)])
    wide_unet.main()
    assert json.loads(capsys.readouterr().out)["block_out_channels"] == [64, 128, 128]
    assert UNet2DModel.from_pretrained(out / "unet").config.attention_head_dim == 32  # 4 heads, as the digits model
    assert (out / "scheduler" / "scheduler_config.json").is_file() and (out / "model_index.json").is_file()
    with pytest.raises(SystemExit):
        wide_unet.main()
