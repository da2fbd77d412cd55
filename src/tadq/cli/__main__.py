"""``python -m tadq.cli``: the same commands as the ``tadq`` script (also what ``torchrun -m tadq.cli`` runs)."""

from tadq.cli.app import main

main()
