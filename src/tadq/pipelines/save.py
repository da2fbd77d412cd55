"""A quantized denoiser (UNet or transformer) saved with the rest of its pipeline: every FP component copied byte
for byte."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from tadq.pipelines.components import check_pipeline_folder

if TYPE_CHECKING:
    from tadq.denoiser import QuantizedDenoiser
    from tadq.io.save import ArtefactSize

__all__ = ["save_pipeline"]


def save_pipeline(qmodel: QuantizedDenoiser, source: str | Path, directory: str | Path, *, overwrite: bool = False,
                  force_foreign: bool = False) -> ArtefactSize:
    """Write the artefact of ``qmodel`` (quantized from ``source``'s UNet or transformer) into ``directory`` with
    ``source``'s ``model_index.json``, text encoders, tokenizers, VAE and scheduler unchanged, so
    ``tadq.load_pipeline`` (and diffusers' ``from_pretrained`` for each FP component) reads it. ``source`` is
    checked whole first."""
    from tadq.io.save import save_quantized

    layout = check_pipeline_folder(source)
    return save_quantized(qmodel, directory, None, overwrite=overwrite, force_foreign=force_foreign,
                          pipeline_source=layout.path)
