"""`tadq analyze` of a TFMQ artefact: the per-step ranges and cache are part of the analysed network (the walker
sets their step on every call), so the command does not report TFMQ as a correction it left out."""

from __future__ import annotations

import json

from diffusers import DDPMPipeline
from tests.conftest import build_tiny_unet
from tests.tfmq.common import scheduler
from typer.testing import CliRunner

from tadq.cli.app import app
from tadq.io import save_quantized


def test_analyze_counts_tfmq_as_part_of_the_network(build_tfmq, tmp_path) -> None:
    artefact, fp = tmp_path / "tfmq", tmp_path / "fp"
    save_quantized(build_tfmq(), artefact, scheduler())
    DDPMPipeline(unet=build_tiny_unet(), scheduler=scheduler()).save_pretrained(fp)
    result = CliRunner().invoke(app, ["analyze", str(artefact), "--fp-model", str(fp), "--num-samples", "2",
                                      "--steps", "8", "--threads", "1", "--out", str(tmp_path / "analysis")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "analysis" / "analysis.json").read_text())
    assert report["settings"]["corrections_not_applied"] == []
    assert "not applied" not in result.output
