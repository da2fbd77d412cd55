"""tadq: Timestep-Aware Diffusion Quantization."""

# First: an old torch/diffusers is named (ImportError) before the adapters import diffusers' classes and fail on it.
import tadq._requirements  # noqa: F401,I001
# The built-in adapters, corrections and TFMQ register themselves in tadq.registry (a leaf) when imported.
import tadq.adapters  # noqa: F401
import tadq.corrections  # noqa: F401
import tadq.tfmq  # noqa: F401
from tadq._version import __version__
from tadq.api import load, quantize, sample
from tadq.config import CalibrationConfig, QuantConfig, ReconstructionConfig
from tadq.denoiser import QuantizedDenoiser
from tadq.pipelines import load_pipeline
from tadq.quant.qscheme import QScheme
from tadq.recipe import Deployment, NaiveMethod, QDiffusionMethod, Recipe, load_recipe
from tadq.sampling import SamplerConfig
from tadq.tfmq import TFMQMethod

__all__ = [
    "__version__", "quantize", "sample", "load", "QuantConfig", "CalibrationConfig", "ReconstructionConfig",
    "QScheme", "SamplerConfig", "QuantizedDenoiser", "Recipe", "Deployment", "NaiveMethod", "QDiffusionMethod",
    "TFMQMethod", "load_recipe", "load_pipeline",
]
