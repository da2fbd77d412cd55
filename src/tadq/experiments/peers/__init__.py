"""Side-by-side peers: the maintained quantization tools users would pick, run on the same model and data.

One module per tool (``quanto``, ``modelopt``, ``torchao``), each a function ``(model, calibration_set,
preset/config, batch_size) -> nn.Module`` returning a quantized deep copy. The tools are an optional extra
(``pip install -e .[peers]``) imported only inside those functions, so importing this package needs none of them.
``peer_report(qmodel)`` tells what a tool actually quantized. Rows of ``tadq run``: ``tadq.experiments.rows.peers``.
"""

from tadq.experiments.peers.base import (
           PeerNotInstalled,
           PeerReport,
           UnsupportedPreset,
           calibration_batches,
           peer_report,
)
from tadq.experiments.peers.modelopt import quantize_modelopt
from tadq.experiments.peers.quanto import quantize_quanto
from tadq.experiments.peers.torchao import quantize_torchao

__all__ = ["PeerNotInstalled", "PeerReport", "UnsupportedPreset", "calibration_batches", "peer_report",
           "quantize_modelopt", "quantize_quanto", "quantize_torchao"]
