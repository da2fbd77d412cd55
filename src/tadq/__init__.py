"""tadq: Timestep-Aware Diffusion Quantization."""

# First: an old torch/diffusers is named (ImportError) before the adapters import diffusers' classes and fail on it.
import tadq._requirements  # noqa: F401,I001
import importlib as _importlib
import importlib.util as _importlib_util
from typing import TYPE_CHECKING as _TYPE_CHECKING
from typing import Any as _Any

from tadq import registry
from tadq._version import __version__

if _TYPE_CHECKING:  # the names below are imported on first use (PEP 562): ``import tadq`` imports no diffusers
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

# public name → the module that defines it
_PUBLIC = {
    "quantize": "tadq.api", "sample": "tadq.api", "load": "tadq.api",
    "QuantConfig": "tadq.config", "CalibrationConfig": "tadq.config", "ReconstructionConfig": "tadq.config",
    "QuantizedDenoiser": "tadq.denoiser", "load_pipeline": "tadq.pipelines", "QScheme": "tadq.quant.qscheme",
    "Recipe": "tadq.recipe", "Deployment": "tadq.recipe", "NaiveMethod": "tadq.recipe",
    "QDiffusionMethod": "tadq.recipe", "load_recipe": "tadq.recipe", "SamplerConfig": "tadq.sampling",
    "TFMQMethod": "tadq.tfmq",
}


def _register_builtins() -> None:
    """What ``import tadq`` imported before its names were made lazy, so every lookup in ``tadq.registry`` (and
    ``tadq.recipe.method_handler``) sees the same registrations: the built-in adapters, corrections and TFMQ
    register themselves when imported, the quantization methods through ``tadq.api``."""
    import tadq.adapters  # noqa: F401
    import tadq.api  # noqa: F401
    import tadq.config  # noqa: F401
    import tadq.corrections  # noqa: F401
    import tadq.denoiser  # noqa: F401
    import tadq.pipelines  # noqa: F401
    import tadq.quant.qscheme  # noqa: F401
    import tadq.recipe  # noqa: F401
    import tadq.sampling  # noqa: F401
    import tadq.tfmq  # noqa: F401


registry.set_builtin_loader(_register_builtins)


def __getattr__(name: str) -> _Any:
    """A public name (``tadq.quantize``, ``tadq.QuantConfig``, …) or a module of the package (``tadq.adapters``),
    imported on first use; the built-in registrations come with it, as they did when ``import tadq`` imported
    everything."""
    module = _PUBLIC.get(name)
    if module is not None:
        value = getattr(_importlib.import_module(module), name)
    elif not name.startswith("__") and _importlib_util.find_spec(f"{__name__}.{name}") is not None:
        value = _importlib.import_module(f"{__name__}.{name}")
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    registry.load_builtins()
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
