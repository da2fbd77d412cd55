"""The experiment harness: the main job (``tadq run``), its rows, the benchmark matrix and the peer tools.

A client of the public library API. Nothing in the library imports this package (``tests/test_import_graph.py``
checks it); only the CLI and the benchmarks do.
"""
