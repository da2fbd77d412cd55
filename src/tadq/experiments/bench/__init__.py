"""``tadq bench``: methods × presets × samplers on one model, measured like the main job, reported as one
self-contained HTML page (plus Markdown and JSON)."""

from tadq.experiments.bench.config import (
           BEST_STACK,
           BenchConfig,
           default_methods,
           matrix,
           parse_sampler,
           quick_methods,
)
from tadq.experiments.bench.runner import UNSUPPORTED_ERRORS, Unsupported, run_bench, run_sampler

__all__ = ["BEST_STACK", "BenchConfig", "UNSUPPORTED_ERRORS", "Unsupported", "default_methods", "matrix",
           "parse_sampler", "quick_methods", "run_bench", "run_sampler"]
