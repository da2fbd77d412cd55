"""``python -m tadq``: the same commands as the ``tadq`` script, for an environment whose scripts are not on PATH."""

from tadq.cli.app import main

main()
