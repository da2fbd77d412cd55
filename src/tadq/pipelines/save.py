"""A quantized denoiser (UNet or transformer) saved with the rest of its pipeline: every FP component copied byte
for byte."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tadq.pipelines.components import PipelineFolderError, check_pipeline_folder, denoiser_component
from tadq.safefiles import read_json_file

if TYPE_CHECKING:
    from tadq.denoiser import QuantizedDenoiser
    from tadq.io.save import ArtefactSize
    from tadq.pipelines.components import PipelineLayout

__all__ = ["save_pipeline"]


def _plain(value: Any) -> Any:
    """A config value as JSON reads it back (tuples become lists), so an in-memory config compares with a file's."""
    return json.loads(json.dumps(value))


def check_denoiser_matches(qmodel: QuantizedDenoiser, layout: PipelineLayout) -> None:
    """``PipelineFolderError`` when ``qmodel``'s denoiser is not the one ``layout``'s folder holds (another class,
    or a config value that differs): the artefact would pair it with text encoders and a VAE it was not quantized
    with, written first and refused (or, worse, loaded) only later. Keys the model's config does not carry (ones
    diffusers ignores) are not compared; weights are not (the artefact holds only the quantized ones)."""
    component = denoiser_component(layout.class_name)
    config_file = layout.path / component / "config.json"
    saved = read_json_file(config_file, f"{component} config")
    model = getattr(qmodel, "model", None)
    config = getattr(model, "config", None)
    if not isinstance(saved, dict) or config is None:
        return  # check_pipeline_folder names a config that is not an object; a model without one is save's to refuse
    if saved.get("_class_name") not in (None, type(model).__name__):
        raise PipelineFolderError(f"{config_file} is a {saved.get('_class_name')}, but the quantized model is a "
                                  f"{type(model).__name__}: save it with the pipeline folder it was quantized from")
    differing = [key for key, value in sorted(saved.items())
                 if not key.startswith("_") and key in config and _plain(config[key]) != _plain(value)]
    if differing:
        key = differing[0]
        raise PipelineFolderError(f"{config_file} does not describe the quantized model ({len(differing)} config "
                                  f"value(s) differ, e.g. {key}: {saved[key]!r} in the folder, {config[key]!r} in the "
                                  "model): save it with the pipeline folder it was quantized from")


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
