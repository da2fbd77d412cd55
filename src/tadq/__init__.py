"""tadq: Timestep-Aware Diffusion Quantization."""

__version__ = "0.1.0"
