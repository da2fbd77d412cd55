"""Artefacts: integer weight codes in safetensors beside an untouched diffusers layout (``save``), and the way back
(``load``). Split in two so that ``QuantizedDenoiser.save_pretrained`` can reach the writer without an import cycle
(the reader rebuilds a ``QuantizedDenoiser``)."""

from tadq.io.load import is_quantized_artefact, load_quantized
from tadq.io.save import (
    CONFIG_FILE,
    FORMAT_VERSION,
    QUANT_MAP_FILE,
    WEIGHTS_FILE,
    ArtefactSize,
    pack_codes,
    save_quantized,
    unpack_codes,
)

__all__ = [
    "ArtefactSize", "save_quantized", "load_quantized", "is_quantized_artefact", "pack_codes", "unpack_codes",
    "FORMAT_VERSION", "CONFIG_FILE", "QUANT_MAP_FILE", "WEIGHTS_FILE",
]
