"""Whole diffusers text-to-image pipelines (Stable Diffusion, SDXL): load a local folder with every component
checked first, turn prompts into per-sample ``Conditioning``, save a quantized artefact that keeps the pipeline
layout, and load it back as a diffusers pipeline object that samples with tadq's loop (docs/pipelines.md)."""

from tadq.pipelines.components import (
    PIPELINE_COMPONENTS,
    PipelineFolderError,
    PipelineLayout,
    check_pipeline_folder,
    is_pipeline_folder,
    load_fp_pipeline,
)
from tadq.pipelines.prompts import PromptConditions, PromptEncoder
from tadq.pipelines.quantized import TadqPipelineMixin, load_pipeline
from tadq.pipelines.save import save_pipeline

__all__ = [
    "PIPELINE_COMPONENTS", "PipelineFolderError", "PipelineLayout", "PromptConditions", "PromptEncoder",
    "TadqPipelineMixin", "check_pipeline_folder", "is_pipeline_folder", "load_fp_pipeline", "load_pipeline",
    "save_pipeline",
]
