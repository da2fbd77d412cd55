"""optimum-quanto alone beside the FP model (kept for the README's earlier command): ``benchmarks/peers.py``
restricted to the ``quanto`` rows at W8A8, W4A8 and weight-only W8A16. Run:

    python benchmarks/peer_quanto.py [--samples 1000] [--threads 1] [--out runs/bench/peers]

Any flag of ``benchmarks/peers.py`` works here and overrides these defaults.
"""

from __future__ import annotations

import sys

from peers import main

if __name__ == "__main__":
    main(["--methods", "quanto", "--presets", "W8A8,W4A8,W8A16", "--samples", "256", "--out", "runs/bench/peers",
          *sys.argv[1:]])
