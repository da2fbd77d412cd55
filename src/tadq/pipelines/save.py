"""A quantized denoiser (UNet or transformer) saved with the rest of its pipeline: every FP component copied byte
for byte."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from tadq.pipelines.components import PipelineFolderError, check_pipeline_folder, denoiser_component

if TYPE_CHECKING:
    from tadq.denoiser import QuantizedDenoiser
    from tadq.io.save import ArtefactSize
    from tadq.pipelines.components import PipelineLayout

__all__ = ["save_pipeline"]


def check_denoiser_matches(qmodel: QuantizedDenoiser, layout: PipelineLayout) -> None:
    """``PipelineFolderError`` when ``qmodel``'s denoiser is not the one ``layout``'s folder holds (another class,
    or a config value that differs: ``tadq.io.save.config_mismatch``): the artefact would pair it with text
    encoders and a VAE it was not quantized with, written first and refused (or, worse, loaded) only later."""
    from tadq.io.save import config_mismatch

    model = getattr(qmodel, "model", None)
    if model is None:
        return  # not a quantized denoiser: save's to refuse
    reason = config_mismatch(model, layout.path / denoiser_component(layout.class_name) / "config.json")
    if reason is not None:
        raise PipelineFolderError(f"{reason}: save it with the pipeline folder it was quantized from")


def save_pipeline(qmodel: QuantizedDenoiser, source: str | Path, directory: str | Path, *, overwrite: bool = False,
                  force_foreign: bool = False) -> ArtefactSize:
    """Write the artefact of ``qmodel`` (quantized from ``source``'s UNet or transformer) into ``directory`` with
    ``source``'s ``model_index.json``, text encoders, tokenizers, VAE and scheduler unchanged, so
    ``tadq.load_pipeline`` (and diffusers' ``from_pretrained`` for each FP component) reads it. ``source`` is
    checked whole first, and its denoiser config must be ``qmodel``'s (``check_denoiser_matches``), before
    anything is written."""
    from tadq.io.save import save_quantized

    layout = check_pipeline_folder(source)
    check_denoiser_matches(qmodel, layout)
    return save_quantized(qmodel, directory, None, overwrite=overwrite, force_foreign=force_foreign,
                          pipeline_source=layout.path)
