"""tadq: Timestep-Aware Diffusion Quantization."""

__version__ = "0.1.0"  # before the imports: artefact writers read it through tadq.utils.library_versions

from tadq.api import quantize, sample
from tadq.config import CalibrationConfig, QuantConfig, ReconstructionConfig
from tadq.denoiser import QuantizedDenoiser
from tadq.io import load_quantized as load
from tadq.quant.qscheme import QScheme
from tadq.sampling import SamplerConfig

__all__ = [
    "__version__", "quantize", "sample", "load", "QuantConfig", "CalibrationConfig", "ReconstructionConfig",
    "QScheme", "SamplerConfig", "QuantizedDenoiser",
]
